"""A small CNN with batch norms for Fashion-MNIST, trained once on the real training set and cached.

Three conv-BN-ReLU-pool blocks and a two-layer head (~99k parameters, ~2M multiply-adds per image):
big enough to reach ~90% test accuracy in three CPU epochs, small enough to train in about a minute.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_torch_save
from .._safe_load import load_plain
from ..datasets.fashion_mnist import fashion_mnist_tensors

# Bump when the architecture or the training recipe changes: old caches are then ignored.
RECIPE = "fashion_cnn-v1"
SEED = 0
EPOCHS = 3
BATCH = 128
LR = 3e-3
WEIGHT_DECAY = 1e-4


class FashionCNN(nn.Module):
    """1x28x28 -> [conv3x3-bn-relu -> maxpool2] x3 (16, 32, 64 channels; 28->14->7->3)
    -> linear(576, 128) -> relu -> linear(128, 10). Input normalised with Fashion-MNIST MEAN/STD."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 3 * 3, 128)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.pool3(self.relu3(self.bn3(self.conv3(x))))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu4(self.fc1(x)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on normalised images ``x`` and int labels ``y``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    model.train(was_training)
    return correct / len(x)


def train_fashion_cnn(
    epochs: int = EPOCHS, seed: int = SEED, max_steps: Optional[int] = None, log: bool = False
) -> tuple[FashionCNN, dict]:
    """Train a FashionCNN on the 60k training images (AdamW, one-cycle LR, seeded init and order).

    Returns the model in eval mode and ``{"test_accuracy", "train_seconds", "steps"}``.
    ``max_steps`` cuts the schedule short (for tests).
    """
    x, y = fashion_mnist_tensors("train")
    xt, yt = fashion_mnist_tensors("test")
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = FashionCNN()
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / BATCH)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=total, pct_start=0.25)
    t0 = time.perf_counter()
    step = 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), BATCH):
            if step >= total:
                break
            idx = order[i:i + BATCH]
            xb = x[idx]
            # random horizontal flips: garments are left-right symmetric; a cheap regulariser
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb[flip] = xb[flip].flip(-1)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        if log:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test {evaluate(model, xt, yt):.4f}, "
                  f"{time.perf_counter() - t0:.1f}s")
    seconds = time.perf_counter() - t0
    model.eval()
    return model, {"test_accuracy": evaluate(model, xt, yt), "train_seconds": seconds, "steps": step}


def _cache_path(cache_dir: Optional[Union[str, os.PathLike]]) -> Path:
    root = Path(cache_dir) if cache_dir is not None else Path(
        os.environ.get("PYQUANT_CACHE", Path.home() / ".cache" / "pyquant"))
    return root / f"{RECIPE}.pt"


def fashion_cnn(pretrained: bool = True, cache_dir: Optional[Union[str, os.PathLike]] = None) -> FashionCNN:
    """A FashionCNN in eval mode; ``pretrained`` loads ``<cache_dir>/fashion_cnn-v1.pt``, training it
    first (about a minute on 2 cores; needs ``apt-get install dataset-fashion-mnist``) if absent.

    ``cache_dir`` defaults to ``$PYQUANT_CACHE`` or ``~/.cache/pyquant``. The accuracy and training
    time of the cached model are in ``model.train_info``.
    """
    if not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return FashionCNN().eval()
    path = _cache_path(cache_dir)
    if path.is_file():
        blob = load_plain(path, "cached model")
        if blob.get("recipe") == RECIPE:
            model = FashionCNN()
            model.load_state_dict(blob["state_dict"], strict=True)
            model.train_info = blob["info"]
            return model.eval()
    model, info = train_fashion_cnn()
    blob = {"recipe": RECIPE, "state_dict": model.state_dict(), "info": info}
    path.parent.mkdir(parents=True, exist_ok=True)
    # written atomically: readers never see a half-written cache, and two processes training at once
    # simply both replace it with the same result
    atomic_torch_save(blob, path)
    model.train_info = info
    return model.eval()
