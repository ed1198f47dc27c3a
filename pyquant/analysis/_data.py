"""What the analyses share besides the batching helpers (pyquant._batches) and the output a metric reads
(the shared `_outputs` module), both re-exported here: JSON-safe numbers."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._batches import Batch, as_batches, batch_args, call, reusable  # noqa: F401 (re-exported)
from .._outputs import output_tensor  # noqa: F401 (re-exported)


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
