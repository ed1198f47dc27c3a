"""A labelled text set from the Debian package ``fortunes``: one class per fortune category.

Each file ``/usr/share/games/fortunes/<category>`` holds entries separated by lines containing a
single ``%``. ``PYQUANT_FORTUNES_DIR`` or the ``root`` argument point elsewhere.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .._assets import AssetMissingError

DEFAULT_ROOT = "/usr/share/games/fortunes"
INSTALL = "apt-get install fortunes"

# "c\b" overstrikes (old terminal bold/underline) and other control characters carry no text
_OVERSTRIKE = re.compile(r".\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

PathLike = Union[str, os.PathLike]


def _root(root: Optional[PathLike]) -> Path:
    return Path(root if root is not None else os.environ.get("PYQUANT_FORTUNES_DIR", DEFAULT_ROOT))


def parse_fortunes(text: str) -> list[str]:
    """Split a fortune file into entries (separator: a line that is exactly ``%``); empty entries
    are dropped, overstrike sequences and control characters removed, trailing blanks stripped."""
    entries: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.rstrip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    out = []
    for e in entries:
        e = _CONTROL.sub("", _OVERSTRIKE.sub("", e)).strip()
        if e:
            out.append(e)
    return out


def fortune_categories(root: Optional[PathLike] = None) -> list[str]:
    """Sorted category names: the plain files of the fortunes directory (no ``.dat``/``.u8``)."""
    r = _root(root)
    if not r.is_dir():
        raise AssetMissingError(f"fortunes directory '{r}'", INSTALL)
    names = sorted(
        p.name for p in r.iterdir()
        if p.is_file() and not p.is_symlink() and "." not in p.name
    )
    if not names:
        raise AssetMissingError(f"fortune files in '{r}'", INSTALL)
    return names


def fortunes_dataset(
    categories: Optional[Sequence[str]] = None,
    max_per_category: Optional[int] = None,
    seed: int = 0,
    root: Optional[PathLike] = None,
) -> tuple[list[str], torch.Tensor, list[str]]:
    """``(texts, labels int64 [N], category names)``; ``labels[i]`` indexes the names.

    ``categories`` defaults to all of them (sorted); ``max_per_category`` keeps a subset of each
    category drawn with ``seed`` (kept in file order, so the result is deterministic).
    """
    r = _root(root)
    if not r.is_dir():
        raise AssetMissingError(f"fortunes directory '{r}'", INSTALL)
    names = list(categories) if categories is not None else fortune_categories(r)
    g = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        path = r / name
        if not path.is_file():
            raise AssetMissingError(f"fortune category file '{path}'", INSTALL)
        entries = parse_fortunes(path.read_text(encoding="utf-8", errors="replace"))
        if max_per_category is not None and len(entries) > max_per_category:
            keep = torch.randperm(len(entries), generator=g)[:max_per_category].sort().values
            entries = [entries[i] for i in keep.tolist()]
        texts += entries
        labels += [label] * len(entries)
    return texts, torch.tensor(labels, dtype=torch.int64), names
