"""Post-training techniques."""
from .adaround import AdaroundResult, LayerReport, adaround
from .bias_correction import correct_bias, correct_bias_analytical
from .bn_fold import FoldedPairs, fold_batchnorms, fold_batchnorms_to_scale
from .qat import reestimate_batchnorm
from .cle import EqualizationReport, equalize

__all__ = ["reestimate_batchnorm", "adaround", "AdaroundResult", "LayerReport", "fold_batchnorms", "fold_batchnorms_to_scale", "FoldedPairs", "equalize", "EqualizationReport",
           "correct_bias", "correct_bias_analytical"]
