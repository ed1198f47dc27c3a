"""Post-training techniques."""
from .bn_fold import fold_batchnorms
from .cle import EqualizationReport, equalize

__all__ = ["fold_batchnorms", "equalize", "EqualizationReport"]
