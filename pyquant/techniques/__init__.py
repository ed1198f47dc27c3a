"""Post-training techniques."""
from .bias_correction import correct_bias, correct_bias_analytical
from .bn_fold import fold_batchnorms
from .cle import EqualizationReport, equalize

__all__ = ["fold_batchnorms", "equalize", "EqualizationReport", "correct_bias", "correct_bias_analytical"]
