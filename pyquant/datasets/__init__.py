"""Offline evaluation data: real photos (ImageNet-style crops), Fashion-MNIST, fortune texts and
Wikipedia summaries.

Nothing is downloaded; a missing package raises :class:`AssetMissingError` with its install command.
"""
from __future__ import annotations

from .._assets import AssetMissingError
from .fashion_mnist import fashion_mnist, fashion_mnist_tensors, read_idx
from .images import PHOTOS, imagenet_calibration_set, imagenet_eval_set, imagenet_photo, load_photo
from .text import fortune_categories, fortunes_dataset, parse_fortunes
from .wiki import token_windows, wiki_text

__all__ = [
    "AssetMissingError",
    "PHOTOS", "imagenet_eval_set", "imagenet_calibration_set", "imagenet_photo", "load_photo",
    "fashion_mnist", "fashion_mnist_tensors", "read_idx",
    "fortunes_dataset", "fortune_categories", "parse_fortunes",
    "wiki_text", "token_windows",
]
