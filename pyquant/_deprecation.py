"""Old public names kept working for a while, with a DeprecationWarning that names the new one."""
from __future__ import annotations

import warnings
from typing import Any

_UNSET: Any = object()
"""Default of a deprecated keyword: tells "not given" apart from any value."""


def renamed(old: str, new: str, old_value: Any, new_value: Any, default: Any, *, where: str,
            stacklevel: int = 3) -> Any:
    """The value of argument `new`, taking `old` (deprecated) when only that was given."""
    if old_value is _UNSET:
        return default if new_value is _UNSET else new_value
    if new_value is not _UNSET:
        raise TypeError(f"{where}: give {new!r} only ({old!r} is its deprecated name)")
    warnings.warn(f"{where}: {old!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=stacklevel)
    return old_value
