"""What the analyses share besides the batching helpers (pyquant._batches, re-exported here): a
model's output as one tensor, and JSON-safe numbers."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .._batches import Batch, as_batches, batch_args, call, reusable  # noqa: F401 (re-exported)


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a metric looks at: the output itself, a `logits` field, or the first tensor of a
    tuple/list/dict output."""
    if torch.is_tensor(out):
        return out
    logits = getattr(out, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if isinstance(out, dict):
        if torch.is_tensor(out.get("logits")):
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for v in out:
            if torch.is_tensor(v):
                return v
    raise TypeError(f"the model returned {type(out).__name__}; a metric needs a tensor (or a tuple/dict "
                    f"holding one)")


def finite(x: Optional[float], digits: int = 6) -> Optional[float]:
    """A float for JSON: rounded to `digits` significant digits; inf and NaN become None."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def floats(t: torch.Tensor, digits: int = 5) -> list[Optional[float]]:
    return [finite(v, digits) for v in t.detach().flatten().double().tolist()]
