"""ImageNet-style evaluation and calibration images cut from real photos that ship with
scikit-image (``skimage.data``) and scikit-learn (``load_sample_images``).

The photos are unlabelled for ImageNet purposes: the evaluation set measures agreement of a quantized
model with its FP32 self (see :mod:`pyquant.metrics`). Each photo gives many square crops at several
scales and positions, some mirrored, resized to 224x224 (bilinear, antialiased) and normalised with
the ImageNet mean/std. Evaluation and calibration crops come from one deterministic, duplicate-free
sequence per photo — evaluation takes the even positions, calibration the odd ones — so the two sets
never share a crop for the same ``seed``.
"""
from __future__ import annotations

import functools
import math
import zlib
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .._assets import AssetMissingError

INSTALL = "pip install scikit-image scikit-learn"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = 224
CENTER_FRACTION = 224 / 256  # the usual "resize to 256, centre-crop 224" evaluation transform

# Colour natural photos only (no synthetic, microscopy, medical or astronomy images); the stereo
# pair's right view is left out as a near-copy of the left one.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "china", "flower")

# Crop side as a fraction of the photo's short side.
_MIN_FRACTION = 0.45
_MAX_FRACTION = 1.0


def _skimage(name: str) -> Callable[[], object]:
    def load():
        try:
            import skimage.data as d
        except ImportError:
            raise AssetMissingError("scikit-image", INSTALL) from None
        if name == "motorcycle":
            return d.stereo_motorcycle()[0]
        return getattr(d, name)()
    return load


def _sklearn(index: int) -> Callable[[], object]:
    def load():
        try:
            from sklearn.datasets import load_sample_images
        except ImportError:
            raise AssetMissingError("scikit-learn", INSTALL) from None
        return load_sample_images().images[index]
    return load


_LOADERS = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle": _skimage("motorcycle"),
    "china": _sklearn(0),
    "flower": _sklearn(1),
}


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> torch.Tensor:
    img = torch.tensor(np.asarray(_LOADERS[name]()))  # a copy: the loaders may return read-only arrays
    if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"photo {name!r}: expected uint8 HxWx3, got {img.dtype} {tuple(img.shape)}")
    return img.contiguous()


def load_photo(name: str) -> torch.Tensor:
    """The photo ``name`` (one of PHOTOS) as a uint8 tensor [H, W, 3]."""
    if name not in _LOADERS:
        raise ValueError(f"unknown photo {name!r}; choose from {PHOTOS}")
    return _photo(name).clone()


# A crop: (top, left, side, flip) in pixels of the original photo.
Crop = tuple[int, int, int, bool]


def _center_crop(h: int, w: int) -> Crop:
    side = round(min(h, w) * CENTER_FRACTION)
    return ((h - side) // 2, (w - side) // 2, side, False)


def _crop_sequence(name: str, h: int, w: int, n: int, seed: int) -> list[Crop]:
    """The first ``n`` distinct crops of photo ``name`` for ``seed``; the centre crop comes first."""
    # a per-photo stream, so adding a photo does not shift the others' crops
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    short = min(h, w)
    crops = [_center_crop(h, w)]
    seen = set(crops)
    while len(crops) < n:
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        # scale uniform in log space: small and large crops equally represented
        frac = math.exp(math.log(_MIN_FRACTION) + u[0] * (math.log(_MAX_FRACTION) - math.log(_MIN_FRACTION)))
        side = max(16, min(short, round(short * frac)))
        crop = (int(u[1] * (h - side + 1)), int(u[2] * (w - side + 1)), side, u[3] < 0.5)
        if crop not in seen:
            seen.add(crop)
            crops.append(crop)
    return crops[:n]


def _render(img: torch.Tensor, crops: list[Crop]) -> torch.Tensor:
    """Cut, resize (bilinear, antialiased) and normalise ``crops`` of a uint8 HxWx3 photo."""
    chw = img.permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    out = torch.empty(len(crops), 3, SIZE, SIZE)
    for i, (top, left, side, flip) in enumerate(crops):
        patch = chw[:, top:top + side, left:left + side].unsqueeze(0)
        patch = F.interpolate(patch, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)[0]
        if flip:
            patch = patch.flip(-1)
        # bilinear with antialiasing can overshoot [0, 1] slightly; a real camera pipeline cannot
        out[i] = (patch.clamp_(0.0, 1.0) - mean) / std
    return out


def imagenet_photo(name: str) -> torch.Tensor:
    """The standard evaluation view of one photo (centre 224/256 of the short side), [3, 224, 224]."""
    img = load_photo(name)
    return _render(img, [_center_crop(img.shape[0], img.shape[1])])[0]


def _crops_per_photo(plan: tuple[tuple[str, int], ...], seed: int, parity: int) -> list[tuple[str, list[Crop]]]:
    """``k`` crops per ``(photo, k)`` of ``plan`` from the ``parity`` positions (0: evaluation,
    1: calibration) of the photo's crop sequence."""
    out = []
    for name, k in plan:
        img = _photo(name)
        seq = _crop_sequence(name, img.shape[0], img.shape[1], 2 * k + parity, seed)
        out.append((name, seq[parity::2][:k]))
    return out


def _names(photos: Optional[tuple[str, ...]]) -> tuple[str, ...]:
    names = tuple(photos) if photos is not None else PHOTOS
    unknown = [p for p in names if p not in _LOADERS]
    if unknown or not names:
        raise ValueError(f"unknown photos {unknown}; choose from {PHOTOS}")
    return names


def imagenet_eval_set(n_per_image: int = 64, seed: int = 0, photos: Optional[tuple[str, ...]] = None) -> torch.Tensor:
    """float32 [len(photos) * n_per_image, 3, 224, 224], ImageNet-normalised, photo-major in the
    order of ``photos`` (default: all of PHOTOS); each photo's first image is its centre view
    (``imagenet_photo``). Deterministic for a given seed; a larger ``n_per_image`` extends a smaller
    one. About 0.6 MB per image (448 images, 270 MB, by default)."""
    if n_per_image < 1:
        raise ValueError(f"n_per_image must be >= 1, got {n_per_image}")
    names = _names(photos)
    return torch.cat([_render(_photo(name), crops)
                      for name, crops in _crops_per_photo(tuple((p, n_per_image) for p in names), seed, 0)])


def imagenet_calibration_set(n: int = 64, seed: int = 0, photos: Optional[tuple[str, ...]] = None) -> torch.Tensor:
    """float32 [n, 3, 224, 224]: ``n`` crops spread evenly over the photos, none of which appears in
    ``imagenet_eval_set(..., seed=seed)`` (whatever its ``n_per_image``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    names = _names(photos)
    counts = [n // len(names) + (1 if i < n % len(names) else 0) for i in range(len(names))]
    plan = tuple((p, k) for p, k in zip(names, counts) if k > 0)
    return torch.cat([_render(_photo(name), crops) for name, crops in _crops_per_photo(plan, seed, 1)])
