"""AutoQuant: one call that applies the post-training techniques in order until an accuracy target is
met, resumable from a cache, within an optional time budget, with a JSON and an HTML report."""
from .cache import AutoQuantCacheError
from .flow import DEFAULT_SCHEMES, AutoQuant, AutoQuantError
from .result import AutoQuantResult, StepRecord

__all__ = ["AutoQuant", "AutoQuantResult", "StepRecord", "AutoQuantError", "AutoQuantCacheError", "DEFAULT_SCHEMES"]
