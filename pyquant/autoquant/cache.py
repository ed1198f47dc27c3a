"""AutoQuant's step cache: one JSON record per finished step and the simulation state of the best one,
each written atomically (temporary file + rename), under the fingerprint of the run's inputs
(pyquant._fingerprint) so that a cache made for another model, data set, setting or pyquant version is
refused instead of silently reused."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .._dirlock import LOCK_FILE
from .._fingerprint import differences
from .._io import atomic_write_text
from .result import StepRecord

__all__ = ["AutoQuantCacheError", "StepCache"]

FORMAT = 3  # 2: the fingerprint covers pyquant's version; 3: the simulations add Conv/Gemm biases on the
#              int32 grid as integer targets do (steps cached by format 2 were measured with float biases)
_META = "autoquant_cache.json"


class AutoQuantCacheError(ValueError):
    """cache_dir holds the steps of a run with other inputs or settings."""


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
            diff = differences(saved.get("fingerprint", {}), self.fp)
            if diff:
                raise AutoQuantCacheError(
                    f"cache_dir {str(self.root)!r} holds the steps of a run with different inputs: "
                    f"{'; '.join(diff)}. Pass another cache_dir, or delete this one to start over")
            return
        # a run killed while writing the record below left that write's temporary file, which would make
        # the folder look foreign: it is removed (one run uses a cache_dir at a time)
        for p in self.root.glob(f".{_META}.*.tmp"):
            p.unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        if any(p for p in self.root.iterdir() if p.name not in ("steps", "states", LOCK_FILE)):
            # refuse to scatter the cache among a user's files (an output folder is fine once ours)
            stray = sorted(p.name for p in self.root.iterdir() if p.name != LOCK_FILE)[:5]
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

    def layerwise_dir(self, method: str) -> Path:
        """The checkpoint folder of a layer-wise method ("seq_mse", "gptq", "range_search")."""
        return self.root / method
