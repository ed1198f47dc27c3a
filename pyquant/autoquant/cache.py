"""AutoQuant's step cache: one JSON record per finished step and the simulation state of the best one,
each written atomically (temporary file + rename), under a fingerprint of the run's inputs so that a
cache made for another model, data set or setting is refused instead of silently reused."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from .._io import atomic_write_text
from .result import StepRecord

__all__ = ["AutoQuantCacheError", "StepCache", "fingerprint"]

FORMAT = 1
_META = "autoquant_cache.json"


class AutoQuantCacheError(ValueError):
    """cache_dir holds the steps of a run with other inputs or settings."""


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


def _digest(obj: Any) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()[:20]


def _model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    # the module types matter as much as the weights (a ReLU6 swapped for a ReLU keeps the state dict)
    h.update(repr([(n, type(m).__qualname__) for n, m in model.named_modules()]).encode())
    _feed(h, dict(model.state_dict()))
    return h.hexdigest()[:20]


def _callable_digest(fn: Callable) -> str:
    """The function's name and compiled code (not the data it captures: see AutoQuant's docstring)."""
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
    # process finds its cache
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            _feed_code(h, c)
        elif isinstance(c, frozenset):
            h.update(repr(sorted(map(repr, c))).encode())
        else:
            h.update(repr(c).encode())


def fingerprint(model: nn.Module, dummy_input: Any, batches: list, eval_fn: Callable,
                settings: Mapping[str, Any]) -> dict[str, Any]:
    """What a cached step depends on: digests of the model, the dummy input, the calibration data and
    eval_fn's code, and the settings themselves (so a mismatch can name the setting)."""
    return {"model": _model_digest(model), "dummy_input": _digest(dummy_input), "data": _digest(batches),
            "eval_fn": _callable_digest(eval_fn), "settings": json.loads(json.dumps(settings, default=str))}


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", key)


class StepCache:
    """Records and best-state files under `root`; `root` is created on first use."""

    def __init__(self, root: Union[str, os.PathLike], fp: Mapping[str, Any]):
        self.root = Path(root)
        self.fp = dict(fp)
        self._check_or_init()

    def _check_or_init(self) -> None:
        meta = self.root / _META
        if meta.exists():
            try:
                saved = json.loads(meta.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise AutoQuantCacheError(f"cache_dir {str(self.root)!r}: {_META} cannot be read ({e}); delete the "
                                          f"folder or pass another cache_dir") from e
            if saved.get("format") != FORMAT:
                raise AutoQuantCacheError(f"cache_dir {str(self.root)!r} was written by another version of AutoQuant "
                                          f"(format {saved.get('format')!r}, this one writes {FORMAT}); delete it or "
                                          f"pass another cache_dir")
            diff = _differences(saved.get("fingerprint", {}), self.fp)
            if diff:
                raise AutoQuantCacheError(
                    f"cache_dir {str(self.root)!r} holds the steps of a run with different inputs: "
                    f"{'; '.join(diff)}. Pass another cache_dir, or delete this one to start over")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if any(p for p in self.root.iterdir() if p.name not in ("steps", "states")):
            # refuse to scatter the cache among a user's files (an output folder is fine once ours)
            stray = sorted(p.name for p in self.root.iterdir())[:5]
            raise AutoQuantCacheError(f"cache_dir {str(self.root)!r} is not empty and is not an AutoQuant cache "
                                      f"(it holds {stray}); pass an empty or new folder")
        atomic_write_text(meta, json.dumps({"format": FORMAT, "fingerprint": self.fp}, indent=2, sort_keys=True))

    # ---- step records ----------------------------------------------------------------------
    def _record_path(self, key: str) -> Path:
        return self.root / "steps" / f"{_safe(key)}.json"

    def get(self, key: str) -> Optional[StepRecord]:
        p = self._record_path(key)
        if not p.exists():
            return None
        try:
            return StepRecord.from_json(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError):
            return None  # unreadable: the step is simply recomputed

    def put(self, rec: StepRecord) -> None:
        p = self._record_path(rec.key)
        p.parent.mkdir(parents=True, exist_ok=True)
        d = rec.to_json()
        d["cached"] = False
        atomic_write_text(p, json.dumps(d, indent=2, sort_keys=True, allow_nan=False))

    # ---- the best simulation's state -----------------------------------------------------------
    def state_path(self, key: str) -> Path:
        return self.root / "states" / f"{_safe(key)}.pt"

    def save_state(self, key: str, sim) -> None:
        p = self.state_path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        sim.save_checkpoint(p, step=key)  # atomic

    def keep_only_state(self, key: str) -> None:
        """Drops the states of steps that are no longer the best (written before this record was)."""
        folder = self.root / "states"
        if folder.is_dir():
            for p in folder.glob("*.pt"):
                if p.name != f"{_safe(key)}.pt":
                    p.unlink(missing_ok=True)

    @property
    def adaround_dir(self) -> Path:
        return self.root / "adaround"


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    for k in ("model", "dummy_input", "data", "eval_fn"):
        if old.get(k) != new.get(k):
            out.append({"model": "the model (weights or module types) differs",
                        "dummy_input": "dummy_input differs", "data": "the calibration data differs",
                        "eval_fn": "eval_fn's code differs"}[k])
    so, sn = old.get("settings", {}), new.get("settings", {})
    for k in sorted(set(so) | set(sn)):
        if so.get(k) != sn.get(k):
            out.append(f"{k}: cached {so.get(k)!r}, now {sn.get(k)!r}")
    return out
