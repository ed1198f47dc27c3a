"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files, gzip-compressed).

The directory defaults to ``/usr/share/datasets/fashion-mnist``; ``PYQUANT_FASHION_MNIST_DIR`` or the
``root`` argument point elsewhere (plain or ``.gz`` IDX files).
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Union

import torch

from .._assets import AssetMissingError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install dataset-fashion-mnist"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Training-set pixel statistics of [0, 1] images (the customary Fashion-MNIST constants).
MEAN = 0.2860
STD = 0.3530

_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08

PathLike = Union[str, os.PathLike]


def read_idx(path: PathLike) -> torch.Tensor:
    """Read an unsigned-byte IDX file (optionally gzip-compressed) into a uint8 tensor.

    Format: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions ``d``, then
    ``d`` big-endian uint32 sizes and the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    code, ndim = data[2], data[3]
    if code != _IDX_UBYTE:
        raise ValueError(f"{path}: IDX type code 0x{code:02x} not supported (only 0x08, unsigned byte)")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    n = 1
    for s in shape:
        n *= s
    if len(data) - header != n:
        raise ValueError(f"{path}: {len(data) - header} data bytes, expected {n} for shape {shape}")
    # bytearray: torch.frombuffer wants a writable buffer
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _root(root: Optional[PathLike]) -> Path:
    return Path(root if root is not None else os.environ.get("PYQUANT_FASHION_MNIST_DIR", DEFAULT_ROOT))


def _find(root: Path, base: str) -> Path:
    for name in (base + ".gz", base):
        if (root / name).is_file():
            return root / name
    raise AssetMissingError(f"Fashion-MNIST file '{root / base}.gz'", INSTALL)


@functools.lru_cache(maxsize=4)
def _load(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(_find(Path(root), _FILES[(split, "images")]))
    labels = read_idx(_find(Path(root), _FILES[(split, "labels")]))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split}: images {tuple(images.shape)} "
                         f"do not match labels {tuple(labels.shape)}")
    return images, labels


def fashion_mnist(split: str = "train", root: Optional[PathLike] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 28, 28], labels uint8 [N])``; N = 60000 (train) or 10000 (test)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _load(str(_root(root)), split)
    return images.clone(), labels.clone()  # the cached copies stay untouched


def fashion_mnist_tensors(
    split: str = "train", root: Optional[PathLike] = None, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images float32 [N, 1, 28, 28], labels int64 [N])``, scaled to [0, 1] and then, with
    ``normalize``, standardised with the training-set MEAN/STD."""
    images, labels = fashion_mnist(split, root)
    x = images.unsqueeze(1).to(torch.float32).div_(255.0)
    if normalize:
        x.sub_(MEAN).div_(STD)
    return x, labels.to(torch.int64)
