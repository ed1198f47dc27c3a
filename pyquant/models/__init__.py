"""Models for offline accuracy checks: MobileNetV2 (ImageNet weights from a pip package), a small
Fashion-MNIST CNN (trained once, cached), all-MiniLM-L6-v2 (sentence embeddings) and Gemma-3-270M (a
decoder LM, from a GGUF file).

Nothing is downloaded; a missing package raises :class:`AssetMissingError` with its install command.
"""
from __future__ import annotations

from .._assets import AssetMissingError
from .fashion_cnn import FashionCNN, fashion_cnn
from .gemma import gemma3_270m, gemma3_270m_path
from .minilm import mean_pooled_embeddings, minilm
from .mobilenet_v2 import MobileNetV2, mobilenet_v2, mobilenet_v2_weights_path

__all__ = [
    "AssetMissingError",
    "MobileNetV2", "mobilenet_v2", "mobilenet_v2_weights_path",
    "FashionCNN", "fashion_cnn",
    "minilm", "mean_pooled_embeddings",
    "gemma3_270m", "gemma3_270m_path",
]
