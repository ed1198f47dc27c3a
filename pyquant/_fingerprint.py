"""The fingerprint of a resumable job: digests of everything that determines its result -- every byte of
every weight and of every batch of data, the model's module types, the settings and pyquant's version
-- so that a checkpoint or cache made for other inputs is never resumed, and a refusal can name what
differs. AdaRound's checkpoints and AutoQuant's step cache both use it."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ._version import __version__

__all__ = ["digest", "model_digest", "modules_digest", "callable_digest", "fingerprint", "differences"]

# what each entry is, and the verb of "... differ(s)"
_WHAT = {"weights": ("the model's weights", "differ"), "modules": ("the model's module types", "differ"),
         "data": ("the calibration data", "differs"), "dummy_input": ("dummy_input", "differs"),
         "eval_fn": ("eval_fn's code", "differs"), "pyquant": ("pyquant's version", "differs")}


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    """Hashes tensors (dtype, shape and every byte), containers and plain values."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in obj:
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def digest(obj: Any) -> str:
    """A digest of tensors (every byte), containers of them and plain values."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()[:20]


def model_digest(model: nn.Module) -> str:
    """A digest of every tensor of the model's state and of its module types (a ReLU6 swapped for a
    ReLU keeps the state dict)."""
    h = hashlib.sha256()
    h.update(modules_digest(model).encode())
    h.update(digest(dict(model.state_dict())).encode())
    return h.hexdigest()[:20]


def modules_digest(model: nn.Module) -> str:
    """A digest of the model's module names and types."""
    return hashlib.sha256(repr([(n, type(m).__qualname__) for n, m in model.named_modules()]).encode()).hexdigest()[:20]


def callable_digest(fn: Callable) -> str:
    """The function's name and compiled code (not the data it captures)."""
    target = fn if hasattr(fn, "__code__") else getattr(type(fn), "__call__", fn)
    code = getattr(target, "__code__", None)
    name = getattr(fn, "__qualname__", type(fn).__qualname__)
    h = hashlib.sha256(name.encode())
    if code is not None:
        _feed_code(h, code)
    return h.hexdigest()[:20]


def _feed_code(h: "hashlib._Hash", code: Any) -> None:
    # nested code objects (lambdas, comprehensions) print with their address, and frozensets in an
    # order that depends on the process's hash seed: both are hashed by content, so a rerun in a new
    # process finds its checkpoint
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            _feed_code(h, c)
        elif isinstance(c, frozenset):
            h.update(repr(sorted(map(repr, c))).encode())
        else:
            h.update(repr(c).encode())


def fingerprint(*, model: Optional[nn.Module] = None, data: Any = None, settings: Optional[Mapping[str, Any]] = None,
                **parts: Any) -> dict[str, Any]:
    """What a resumable result depends on: digests of `model` (every byte of its state dict, and its module
    types), of `data` (every byte of every batch), of any further `parts`
    (callables by their code, anything else by value), the `settings` themselves (JSON, so a mismatch
    can name the setting) and pyquant's version."""
    fp: dict[str, Any] = {"pyquant": __version__}
    if model is not None:  # two entries, so that a refusal says which of them changed
        fp["weights"] = digest(dict(model.state_dict()))
        fp["modules"] = modules_digest(model)
    if data is not None:
        fp["data"] = digest(data)
    for k, v in parts.items():
        fp[k] = callable_digest(v) if callable(v) and not isinstance(v, (nn.Module, torch.Tensor)) else digest(v)
    fp["settings"] = json.loads(json.dumps(dict(settings or {}), sort_keys=True, default=str))
    return fp


def differences(old: Mapping[str, Any], new: Mapping[str, Any], then: str = "cached") -> list[str]:
    """What differs between two fingerprints, one phrase each (empty: they match); `then` names the
    old one's state ("cached", "saved")."""
    out = []
    for k in sorted((set(old) | set(new)) - {"settings"}):
        if old.get(k) != new.get(k):
            what, verb = _WHAT.get(k, (k, "differs"))
            if k not in old or k not in new:  # a fingerprint of another form (older pyquant, other job)
                out.append(f"{what}: {'not recorded' if k not in old else 'recorded'} in the {then} fingerprint"
                           f"{'' if k not in old else ', not in this one'}")
            elif k == "pyquant":
                out.append(f"{what}: {then} {old.get(k)!r}, now {new.get(k)!r}")
            else:
                out.append(f"{what} {verb}")
    so, sn = old.get("settings", {}), new.get("settings", {})
    for k in sorted(set(so) | set(sn)):
        if so.get(k) != sn.get(k):
            out.append(f"{k}: {then} {so.get(k)!r}, now {sn.get(k)!r}")
    return out
