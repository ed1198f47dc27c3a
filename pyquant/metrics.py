"""Metrics for comparing a quantized model with its FP32 reference, and a linear probe for
embeddings. All computed in float64 on the CPU, so results do not depend on the device or dtype."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .sim.compare_report import sqnr_db  # noqa: F401 (re-exported: one SQNR for the metrics and compare)


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a metric looks at: the output itself, a `logits` field, or the first tensor of a
    tuple/list/dict output."""
    if torch.is_tensor(out):
        return out
    logits = getattr(out, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if isinstance(out, dict):
        if torch.is_tensor(out.get("logits")):
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for v in out:
            if torch.is_tensor(v):
                return v
    raise TypeError(f"the model returned {type(out).__name__}; a metric needs a tensor (or a tuple/dict "
                    f"holding one)")


def _logits(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, classes], got shape {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float64)


def top1_agreement(
    ref_logits: torch.Tensor, logits: torch.Tensor, confident: Optional[float] = 0.5
) -> tuple[float, int]:
    """``(fraction, count)``: how often ``logits`` picks the reference's top-1 class, over the
    ``count`` samples whose reference softmax max exceeds ``confident`` (all samples when None).

    Samples the FP32 model itself is unsure of are left out: their top-1 flips on noise and says
    little about quantization. The fraction is NaN when no sample qualifies.
    """
    ref = _logits(ref_logits, "ref_logits")
    out = _logits(logits, "logits")
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: {tuple(ref.shape)} vs {tuple(out.shape)}")
    keep = torch.ones(len(ref), dtype=torch.bool)
    if confident is not None:
        keep = ref.softmax(1).amax(1) > confident
    count = int(keep.sum())
    if count == 0:
        return math.nan, 0
    agree = (ref[keep].argmax(1) == out[keep].argmax(1)).sum().item()
    return agree / count, count


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over samples of KL(softmax(ref) || softmax(logits)), in nats."""
    ref = _logits(ref_logits, "ref_logits")
    out = _logits(logits, "logits")
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: {tuple(ref.shape)} vs {tuple(out.shape)}")
    logp = ref.log_softmax(1)
    logq = out.log_softmax(1)
    # p * (log p - log q), with 0 * log 0 = 0 where the reference probability underflows
    kl = torch.where(logp.isneginf(), 0.0, logp.exp() * (logp - logq)).sum(1)
    return kl.mean().item()


def logistic_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    l2: float = 1e-3,
    max_iter: int = 500,
) -> float:
    """Test accuracy of a multinomial logistic regression fitted on ``(train_x, train_y)``.

    Features are standardised with the training statistics; the fit is full-batch L-BFGS (strong
    Wolfe line search) in float64 from zero weights, with an L2 penalty ``l2 * ||W||^2 / 2`` on the
    weights (not the bias) — deterministic, and the same with or without scikit-learn installed.
    """
    xtr = train_x.detach().to("cpu", torch.float64).flatten(1)
    xte = test_x.detach().to("cpu", torch.float64).flatten(1)
    ytr = train_y.detach().to("cpu", torch.int64)
    yte = test_y.detach().to("cpu", torch.int64)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("features and labels differ in length")
    if len(xtr) == 0 or len(xte) == 0:
        raise ValueError("empty training or test set")
    classes = int(max(ytr.max().item(), yte.max().item())) + 1
    mean = xtr.mean(0)
    std = xtr.std(0, unbiased=False).clamp_min(1e-12)
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std

    w = torch.zeros(xtr.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xte @ w + b).argmax(1)
    return (pred == yte).double().mean().item()


@torch.no_grad()
def perplexity(model: torch.nn.Module, token_windows: torch.Tensor, batch_size: int = 1,
               progress: Optional[bool] = None) -> float:
    """exp of the mean negative log-likelihood of every next token of every window ([windows, length]
    int64), the model seeing each window from its start (no context carried over): what a decoder LM
    scores on held-out text. `model(input_ids)` returns logits (or an output with `.logits`)."""
    from ._progress import Progress

    if token_windows.dim() != 2 or token_windows.dtype != torch.int64 or token_windows.shape[1] < 2:
        raise ValueError(f"token_windows must be int64 [windows, length >= 2], got {token_windows.dtype} "
                         f"{tuple(token_windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    if int(token_windows.min()) < 0:
        raise ValueError(f"token_windows holds a negative token id ({int(token_windows.min())})")
    nll, count = 0.0, 0
    bar = Progress(len(token_windows), "perplexity", progress)
    for i in range(0, len(token_windows), batch_size):
        ids = token_windows[i:i + batch_size].to(device)
        try:
            out = model(ids)
        except (IndexError, RuntimeError) as exc:
            if "index" in str(exc).lower() and "out of" in str(exc).lower():
                raise ValueError(f"token id {int(ids.max())} is beyond the model's embedding table ({exc}): the "
                                 "token windows come from another tokenizer than the model's") from exc
            raise
        logits = getattr(out, "logits", out)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if int(ids.max()) >= logits.shape[-1]:  # the model cannot predict its own input tokens
            raise ValueError(f"token id {int(ids.max())} is beyond the model's vocabulary of {logits.shape[-1]} "
                             "logits: the token windows come from another tokenizer than the model's")
        lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll -= float(lp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum())
        count += ids[:, 1:].numel()
        bar.update(len(ids))
    bar.close()
    return math.exp(nll / count)
