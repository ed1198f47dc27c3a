"""Post-training techniques and QAT helpers."""
from .adaround import AdaroundResult, AdaroundSettings, LayerReport, adaround
from .bias_correction import BiasCorrectionReport, correct_bias, correct_bias_analytical
from .bn_fold import FoldedPairs, fold_batchnorms, fold_batchnorms_to_scale
from .cle import EqualizationReport, equalize
from .gptq import GptqResult, gptq, gptq_weight
from .layerwise import LayerError
from .mixed_precision import MixedPrecisionResult, MixPoint, mixed_precision
from .mixed_precision_groups import Candidate, QuantizerGroup, parse_candidates, quantizer_groups
from .qat import reestimate_batchnorm
from .range_search import RangeChoice, RangeSearchResult, search_activation_ranges
from .seq_mse import SeqMseResult, seq_mse, seq_mse_encoding
from .smoothing import SmoothedPair, SmoothingResult, smooth_activations, smoothing_pairs

__all__ = ["fold_batchnorms", "fold_batchnorms_to_scale", "FoldedPairs", "equalize", "EqualizationReport",
           "correct_bias", "correct_bias_analytical", "BiasCorrectionReport", "adaround", "AdaroundResult",
           "AdaroundSettings", "LayerReport", "reestimate_batchnorm", "seq_mse", "seq_mse_encoding", "SeqMseResult",
           "gptq", "gptq_weight", "GptqResult", "LayerError", "smooth_activations", "smoothing_pairs",
           "SmoothingResult", "SmoothedPair", "search_activation_ranges", "RangeSearchResult", "RangeChoice",
           "mixed_precision", "MixedPrecisionResult", "MixPoint", "Candidate", "QuantizerGroup", "parse_candidates",
           "quantizer_groups"]
