"""A resumable job's state file: written atomically after each unit of work, read back only when the
fingerprint it was saved under (pyquant._fingerprint) matches the job's, and read as tensors and plain
values only (no code runs from the file: one holding other objects raises `UnsafeFileError`)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ._fingerprint import differences
from ._io import atomic_torch_save
from ._safe_load import check_plain, load_plain

__all__ = ["Checkpoint"]


class Checkpoint:
    """`path`: the state file; `fingerprint`: what the job's result depends on."""

    def __init__(self, path: Union[str, os.PathLike], fingerprint: Mapping[str, Any]):
        self.path = Path(path)
        self.fingerprint = dict(fingerprint)

    def load(self) -> tuple[Optional[dict[str, Any]], list[str]]:
        """(state, []) from a matching file; (None, what differs) from another job's; (None, []) when there
        is none. A file holding anything but tensors and plain values raises `UnsafeFileError`, before any
        object in it is created."""
        if not self.path.exists():
            return None, []
        saved = load_plain(self.path, "checkpoint")
        old = saved.get("fingerprint") if isinstance(saved, dict) else None
        if not isinstance(old, dict):
            return None, ["the file holds no fingerprint (written by another program)"]
        diff = differences(old, self.fingerprint, then="saved")
        if diff:
            return None, diff
        return {k: v for k, v in saved.items() if k != "fingerprint"}, []

    def resume(self, fresh: dict[str, Any], job: str) -> dict[str, Any]:
        """The saved state when it matches, else `fresh`; a file of another job is named in a warning
        (what differs) and then overwritten by this one's first save."""
        saved, diff = self.load()
        if saved is not None:
            return saved
        if diff:
            warnings.warn(f"{job}: the checkpoint in {self.path.parent} was made with other settings, model or data "
                          f"({'; '.join(diff)}); starting over", stacklevel=3)
        return fresh

    def save(self, state: Mapping[str, Any]) -> None:
        """Writes `state` (tensors, numbers, strings, lists and dicts of them; its keys beside the
        fingerprint's) atomically."""
        if "fingerprint" in state:
            raise ValueError("state: the key 'fingerprint' is the checkpoint's own")
        check_plain(dict(state), "checkpoint state")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({**state, "fingerprint": self.fingerprint}, self.path)
