"""Locating the offline evaluation assets (pip packages that ship weights, Debian data packages).

Nothing here downloads: an asset that is not installed raises :class:`AssetMissingError` whose message
gives the exact command that installs it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
from pathlib import Path
from typing import Optional


class AssetMissingError(ImportError):
    """An offline asset (pip package or system data file) is not installed.

    ``install`` holds the command that installs it; the message contains it verbatim. An
    ``ImportError`` so that ``except ImportError`` treats it like any missing optional dependency.
    """

    def __init__(self, what: str, install: str, detail: str = "") -> None:
        self.what = what
        self.install = install
        msg = f"{what} is not installed; install it with: {install}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


def require_module(module: str, install: str, what: Optional[str] = None) -> None:
    """Raise AssetMissingError unless ``module`` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise AssetMissingError(what or f"Python package '{module}'", install)


def distribution_file(dist: str, name: str, package: str, install: str) -> Path:
    """Path of the installed file ``name`` (a basename) shipped by pip distribution ``dist``.

    Reads the distribution's file list (RECORD) so the package's own code never runs; falls back to
    ``importlib.resources`` on ``package`` when the distribution has no RECORD.
    """
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise AssetMissingError(f"pip package '{dist}'", install) from None
    for f in d.files or ():
        if f.name == name:
            p = Path(d.locate_file(f))
            if p.is_file():
                return p.resolve()
    try:
        for p in _walk(importlib.resources.files(package)):
            if p.name == name and p.is_file():
                return Path(str(p)).resolve()
    except (ModuleNotFoundError, TypeError):
        pass
    raise AssetMissingError(
        f"'{name}' from pip package '{dist}'", install, "the package is installed but the file is missing; reinstall it"
    )


def _walk(root):
    for p in root.iterdir():
        if p.is_dir():
            yield from _walk(p)
        else:
            yield p


def sha256_prefix_ok(path: Path, prefix: str) -> bool:
    """True when the file's SHA-256 starts with ``prefix`` (torchvision names checkpoints this way)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest().startswith(prefix)
