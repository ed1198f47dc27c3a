"""A model's output as the one tensor a metric or a loss reads."""
from __future__ import annotations

from typing import Any

import torch


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
