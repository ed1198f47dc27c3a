"""What the examples share: the `--quick` switch and the models and data they run on.

Each example uses pyquant's offline assets when they are installed (MobileNetV2 with its ImageNet weights
and real photos, all-MiniLM-L6-v2 with fortune texts) and otherwise falls back, with a printed note, to a
small random model of the same kind, so that every example runs anywhere. `--quick` (or the environment
variable PYQUANT_EXAMPLES_QUICK=1) keeps each run to seconds: fewer samples, fewer iterations, and the
small models where the real ones would take minutes.

In your own code, replace these helpers with your model and a few hundred samples of your data.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Optional

import torch
from torch import nn

QUICK_ENV = "PYQUANT_EXAMPLES_QUICK"
NO_ASSETS_ENV = "PYQUANT_EXAMPLES_NO_ASSETS"   # =1: the small random models even where the assets are installed


def require_assets() -> None:
    """Raises AssetMissingError when NO_ASSETS_ENV asks for the small random models."""
    from pyquant.models import AssetMissingError

    if os.environ.get(NO_ASSETS_ENV, "") not in ("", "0"):
        raise AssetMissingError("the offline assets (disabled by " + NO_ASSETS_ENV + ")", f"unset {NO_ASSETS_ENV}")


def parse_args(description: str, extra: Optional[Callable[[argparse.ArgumentParser], None]] = None
               ) -> argparse.Namespace:
    """The examples' command line: `--quick` (also set by PYQUANT_EXAMPLES_QUICK=1) and `--out`, the folder
    for the files an example writes (default: examples_out/ in the current directory)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", default=os.environ.get(QUICK_ENV, "") not in ("", "0"),
                   help=f"a run of seconds: fewer samples and iterations, small models (also {QUICK_ENV}=1)")
    p.add_argument("--out", default="examples_out", help="folder for the files the example writes")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    torch.manual_seed(0)
    return args


class SmallCNN(nn.Module):
    """A small image classifier with the layer kinds of a real one: Conv-BN-ReLU, a depthwise-separable
    block, a residual add, pooling and a Linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                                nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.dw(x)
        return self.fc(self.pool(self.head(x)).flatten(1))


def small_cnn(seed: int = 0) -> SmallCNN:
    """A SmallCNN with random weights and batch-norm statistics like a trained network's (not all ones)."""
    g = torch.Generator().manual_seed(seed)
    m = SmallCNN()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
        m.stem[0].weight[5] *= 6.0  # one wide channel, as trained stems have: per-tensor weights suffer
    return m.eval()


def image_model(quick: bool, calib: int = 64, evaluation: int = 8, quick_evaluation: int = 1
                ) -> tuple[str, nn.Module, torch.Tensor, torch.Tensor]:
    """(name, FP32 model, calibration images, evaluation images): MobileNetV2 with ImageNet weights on real
    photo crops when its assets are installed, else SmallCNN on random images. `evaluation` is crops per
    photo for MobileNetV2 (`quick_evaluation` with `quick`)."""
    from pyquant.models import AssetMissingError

    try:
        from pyquant.datasets import imagenet_calibration_set, imagenet_eval_set
        from pyquant.models import mobilenet_v2

        require_assets()
        model = mobilenet_v2()
        n_cal = min(calib, 8) if quick else calib
        return ("MobileNetV2", model, imagenet_calibration_set(n_cal),
                imagenet_eval_set(n_per_image=quick_evaluation if quick else evaluation))
    except AssetMissingError as exc:
        print(f"note: {exc}; using a small random CNN instead")
    g = torch.Generator().manual_seed(1)
    n_cal = 16 if quick else calib
    return "SmallCNN", small_cnn(), torch.randn(n_cal, 3, 32, 32, generator=g), torch.randn(32, 3, 32, 32, generator=g)


def tiny_decoder(layers: int = 2, vocab: int = 256) -> nn.Module:
    """A random transformers LlamaForCausalLM (hidden 64, grouped-query attention): the shape of a decoder
    language model in a few hundred kilobytes."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def token_batches(vocab: int, count: int, length: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` batches of one random token window each, as dicts of keyword inputs."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (1, length), generator=g)} for _ in range(count)]


def text_encoder(quick: bool, texts: int = 64) -> tuple[str, Any, nn.Module, list[str]]:
    """(name, tokenizer, encoder, texts): all-MiniLM-L6-v2 on fortune texts when installed, else a tiny
    random BERT with a word-hashing tokenizer on generated sentences."""
    from pyquant.models import AssetMissingError

    n = min(texts, 16) if quick else texts
    try:
        from pyquant.datasets import fortunes_dataset
        from pyquant.models import minilm

        require_assets()
        tok, model = minilm(attn_implementation="eager")
        all_texts, _, _ = fortunes_dataset(max_per_category=max(2, n // 4))
        return "all-MiniLM-L6-v2", tok, model, all_texts[:n]
    except AssetMissingError as exc:
        print(f"note: {exc}; using a tiny random BERT instead")
    import transformers

    cfg = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    words = "the a quantized model keeps its accuracy when every range fits data well and outliers are rare".split()
    g = torch.Generator().manual_seed(2)
    sentences = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (8,), generator=g)) for _ in range(n)]
    return "tiny BERT", HashTokenizer(cfg.vocab_size), transformers.BertModel(cfg).eval(), sentences


class HashTokenizer:
    """Stands in for a real tokenizer: one id per word (hashed), padding to the longest text."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, texts, padding=True, truncation=True, max_length=64, return_tensors="pt"):
        ids = [[101] + [200 + sum(map(ord, w)) % (self.vocab - 200) for w in t.split()][:max_length - 2]
               + [102] for t in texts]
        width = max(len(i) for i in ids)
        return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}
