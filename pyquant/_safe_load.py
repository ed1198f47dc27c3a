"""Reading the .pt files pyquant itself writes (simulation checkpoints, AutoQuant's cached states, the
state files of resumable jobs, bundled model weights) without running code from them: they are read as
tensors, numbers, strings, lists, tuples and dicts only (`torch.load(weights_only=True)`), so a file that
came from elsewhere and holds any other object is refused before that object exists. What is saved is
checked to be of those kinds too, so that every file pyquant writes reads back under the same rule."""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Union

import torch

__all__ = ["UnsafeFileError", "load_plain", "check_plain"]

PathLike = Union[str, "os.PathLike[str]"]

_PLAIN_SCALARS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size)


class UnsafeFileError(ValueError):
    """A file pyquant was asked to read holds objects other than tensors and plain values (numbers,
    strings, lists, tuples, dicts). Unpickling such objects can run any code, so pyquant refuses the file
    without creating them."""


def load_plain(path: PathLike, what: str) -> Any:
    """The contents of a torch file at `path`, read as tensors and plain values only, on the CPU.

    Raises `UnsafeFileError` (naming `what`, the path and the first object that was refused) when the
    file holds anything else, and `ValueError` when it is not a readable torch file."""
    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global:?)\s*(?:GLOBAL\s*)?([\w.]+)", str(e), re.I)
        which = f" (it refers to {found.group(1)})" if found else ""
        raise UnsafeFileError(
            f"{what} {path!r} holds objects other than tensors, numbers, strings, lists and dicts{which}; pyquant "
            f"does not unpickle them, since unpickling can run code. Use files written by pyquant; a file saved "
            f"with other objects must be loaded where it is trusted and saved again as tensors and plain "
            f"values") from None
    except (RuntimeError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{what} {path!r} cannot be read as a torch file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def check_plain(obj: Any, what: str) -> None:
    """Raises TypeError, naming where in `what` it sits, when `obj` holds anything but tensors and plain
    values (so that a file written from it reads back with `load_plain`)."""
    stack = [(obj, what)]
    while stack:
        o, where = stack.pop()
        if isinstance(o, torch.Tensor):
            if type(o) is not torch.Tensor and not isinstance(o, torch.nn.Parameter):
                raise TypeError(f"{where}: a {type(o).__name__} (a tensor subclass) cannot be saved; save a plain "
                                f"tensor")
        elif isinstance(o, dict):
            for k, v in o.items():
                if not isinstance(k, (str, int, float, bool, type(None))):
                    raise TypeError(f"{where}: key {k!r} ({type(k).__name__}) cannot be saved; use a string or "
                                    f"number")
                stack.append((v, f"{where}[{k!r}]"))
        elif isinstance(o, (list, tuple)):
            if isinstance(o, tuple) and type(o) is not tuple and not isinstance(o, torch.Size):
                raise TypeError(f"{where}: a {type(o).__name__} (a named tuple) cannot be saved; use a tuple, list "
                                f"or dict")
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(o))
        elif not isinstance(o, _PLAIN_SCALARS):
            raise TypeError(f"{where}: a {type(o).__name__} cannot be saved (only tensors, numbers, strings, "
                            f"lists, tuples and dicts are, so that the file reads back without running code)")
