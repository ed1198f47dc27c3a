"""Post-training techniques and QAT helpers."""
from .adaround import AdaroundResult, AdaroundSettings, LayerReport, adaround
from .bias_correction import BiasCorrectionReport, correct_bias, correct_bias_analytical
from .bn_fold import FoldedPairs, fold_batchnorms, fold_batchnorms_to_scale
from .cle import EqualizationReport, equalize
from .qat import reestimate_batchnorm
from .smoothing import SmoothedPair, SmoothingResult, smooth_activations, smoothing_pairs

__all__ = ["fold_batchnorms", "fold_batchnorms_to_scale", "FoldedPairs", "equalize", "EqualizationReport",
           "correct_bias", "correct_bias_analytical", "BiasCorrectionReport", "adaround", "AdaroundResult",
           "AdaroundSettings", "LayerReport", "reestimate_batchnorm", "smooth_activations",
           "smoothing_pairs", "SmoothingResult", "SmoothedPair"]
