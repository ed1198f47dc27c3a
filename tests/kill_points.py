"""Child-process side of the kill-and-resume tests: patches that SIGKILL the process at a chosen point.

A job script calls `install()` first, and `arm()` when the resumable work starts (building and calibrating
its inputs is not part of it): only progress steps and writes after `arm()` count. `install()` reads

* ``PYQUANT_TEST_KILL_DIR``: the job's folder; only writes to files under it are counted;
* ``PYQUANT_TEST_KILL_AT``: ``progress:N`` (killed just after the N-th progress step of the whole process,
  any bar) or ``write:N`` (killed in the middle of the N-th file write under the folder: half of the
  bytes reach the file being written, then the process dies, as a power cut or an OOM kill would leave it);
  absent: never killed;
* ``PYQUANT_TEST_KILL_COUNT``: where to write, at a normal exit, how many progress steps and writes the
  run made (JSON), so that the parent can draw kill points inside the run.

The patches sit on the primitives (`Progress.update`, `torch.save`, `open` for writing), not on pyquant's
atomic writer: a file that pyquant wrote in place, without a temporary file, is then found half written."""
from __future__ import annotations

import atexit
import builtins
import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch

from pyquant import _progress

_REAL_OPEN = builtins.open
_REAL_SAVE = torch.save
_counts = {"progress": 0, "write": 0}
_armed = [False]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _under(path: Any, folder: Path) -> bool:
    if isinstance(path, int) or not isinstance(path, (str, bytes, os.PathLike)):
        return False  # file descriptors and file objects: not a named file of the job
    p = Path(os.fsdecode(path)).resolve()
    return p == folder or folder in p.parents


class _HalfWriter:
    """A file open for writing whose first write lands half-way, then the process dies."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: max(len(data) // 2, 1)])
        self._f.flush()
        os.fsync(self._f.fileno())
        _die()

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def install() -> None:
    folder = Path(os.environ["PYQUANT_TEST_KILL_DIR"]).resolve()
    kind, _, n = os.environ.get("PYQUANT_TEST_KILL_AT", "none:0").partition(":")
    at = int(n or 0)
    if kind not in ("none", "progress", "write"):
        raise ValueError(f"PYQUANT_TEST_KILL_AT: progress:N or write:N, got {kind!r}")

    def counts_write() -> bool:
        """True when this write is the one to die in."""
        if not _armed[0]:
            return False
        _counts["write"] += 1
        return kind == "write" and _counts["write"] == at

    real_update = _progress.Progress.update

    def update(self, *args, **kw):
        real_update(self, *args, **kw)
        if not _armed[0]:
            return
        _counts["progress"] += 1
        if kind == "progress" and _counts["progress"] == at:
            _die()

    def save(obj, f, *args, **kw):
        if not _under(f, folder) or not counts_write():
            return _REAL_SAVE(obj, f, *args, **kw)
        buf = io.BytesIO()
        _REAL_SAVE(obj, buf, *args, **kw)
        data = buf.getvalue()
        with _REAL_OPEN(f, "wb") as out:
            _HalfWriter(out).write(data)

    def open_(file, mode="r", *args, **kw):
        f = _REAL_OPEN(file, mode, *args, **kw)
        if any(c in mode for c in "wax") and _under(file, folder) and counts_write():
            return _HalfWriter(f)
        return f

    _progress.Progress.update = update
    torch.save = save
    builtins.open = open_
    io.open = open_  # pathlib's write_text and open go through io.open

    where = os.environ.get("PYQUANT_TEST_KILL_COUNT")
    if where:
        atexit.register(lambda: Path(where).write_text(json.dumps(_counts)))


def arm() -> None:
    """From here on, progress steps and writes count towards the kill point."""
    _armed[0] = True


def save_result(path: str, tensors: dict[str, torch.Tensor], **texts: str) -> None:
    """The job's final result (uncounted, never killed): tensors and texts, for a byte comparison."""
    _REAL_SAVE({"tensors": {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, "texts": texts}, path)
