"""Post-training techniques."""
from .bn_fold import fold_batchnorms

__all__ = ["fold_batchnorms"]
