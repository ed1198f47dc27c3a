"""Atomic file writes: a temporary file in the destination folder, flushed to disk, then renamed over
the destination, so a reader never sees half a file and a failure leaves the old file intact."""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from typing import Any, Iterator, Type, Union

PathLike = Union[str, "os.PathLike[str]"]


def _process_umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path`; once the block has written it, it replaces `path`
    (keeping an existing file's permissions). On any exception the temporary file is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_process_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_json(path: PathLike, error: Type[Exception]) -> Any:
    """A JSON file's document; text that is not UTF-8 JSON within Python's nesting and integer-digit
    limits raises `error` naming the file (an unreadable file raises OSError)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer literal longer than Python's digit limit
        raise error(f"{path}: not valid JSON: {e}") from None
