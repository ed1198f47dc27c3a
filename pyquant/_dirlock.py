"""One process at a time in a cache or checkpoint directory: an exclusive, non-blocking `flock` on a lock
file in the directory, held while a job uses it. Two jobs writing the same state files would resume from
each other's half-finished work; the second is refused instead, with the holder's pid. The kernel drops
the lock when the holder's last descriptor closes, so a job that was killed (even with SIGKILL) leaves
no stale lock behind: the lock file may remain, but nothing holds it."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional, Union

try:
    import fcntl
except ImportError:  # no flock on this platform: directories are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = ["DirectoryInUseError", "DirectoryLock", "LOCK_FILE"]

LOCK_FILE = ".pyquant.lock"


class DirectoryInUseError(RuntimeError):
    """Another running job (another process, or another job in this one) holds the directory's lock."""


class DirectoryLock:
    """The lock of `directory` (created if missing), for the argument called `what` in errors. Use as a
    context manager, or `acquire()` and `release()`."""

    def __init__(self, directory: Union[str, "os.PathLike[str]"], what: str):
        self.directory = Path(directory)
        self.what = what
        self._fd: Optional[int] = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    def acquire(self) -> "DirectoryLock":
        """Takes the lock, or raises DirectoryInUseError naming the directory and the holder's pid."""
        if self._fd is not None:
            raise RuntimeError(f"the lock of {str(self.directory)!r} is already held by this DirectoryLock")
        self.directory.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self
        # no O_TRUNC: the holder's pid must stay readable until the lock is ours
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            if holder == os.getpid():
                who = "another job in this process"
            else:
                who = f"process {holder}" if holder is not None else "another process (pid not yet written)"
            raise DirectoryInUseError(
                f"{self.what} {str(self.directory)!r} is in use by {who}; two jobs in one directory would "
                f"overwrite each other's state. Wait for it to finish, or give this job another "
                f"{self.what}") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drops the lock (the lock file stays: removing it could let a third process lock a new file while
        a second still waits on the old one)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
