"""No memory growth over many op calls: fake quantization forward and backward through the native kernels,
and calibration observers updating their statistics. The resident size of the process (VmRSS) after a
warm-up and after 10,000 more calls may differ by a few MiB at most (allocator noise), not by what a leaked
buffer, tensor or Python object per call would add up to."""
from __future__ import annotations

import gc
import sys

import pytest
import torch

from pyquant.quant import MinMax, QuantizeDequantize, TfEnhanced

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

BOUND_MIB = 5.0


def rss_mib() -> float:
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def growth(step, calls: int, warmup: int = 300) -> float:
    for i in range(warmup):
        step(i)
    before = rss_mib()
    for i in range(calls):
        step(i)
    return rss_mib() - before


def fake_quant_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g) * 2
    scale = torch.rand(16, 1, generator=g) * 0.05 + 0.01
    offset = torch.full((16, 1), -100.0)
    return x, scale, offset


def test_native_fake_quant_calls_do_not_grow_memory():
    """10,000 forward and 10,000 backward kernel calls (the registered ops, no autograd around them)."""
    x, scale, offset = fake_quant_inputs()
    op = torch.ops.pyquant

    def step(i):
        y = op.quantize_dequantize(x, scale, offset, 0, 255)
        op.quantize_dequantize_backward(y, x, scale, offset, 0, 255, 1.0, [True, True, True])

    grown = growth(step, 10_000)
    assert grown < BOUND_MIB, f"resident size grew by {grown:.1f} MiB over 10,000 forward+backward calls"


def test_fake_quant_under_autograd_does_not_grow_memory():
    """The autograd node keeps x, scale and offset per call: 2,000 steps that leaked them would add 8 MiB."""
    x, scale, offset = (t.clone().requires_grad_() for t in fake_quant_inputs())
    op = torch.ops.pyquant.quantize_dequantize

    def step(i):
        op(x, scale, offset, 0, 255).square().sum().backward()
        x.grad = scale.grad = offset.grad = None

    grown = growth(step, 2_000)
    assert grown < BOUND_MIB, f"resident size grew by {grown:.1f} MiB over 2,000 training steps"


@pytest.mark.parametrize("observer,calls", [("minmax_quantizer", 10_000), ("histogram", 2_000)])
def test_calibration_observers_do_not_grow_memory(observer, calls):
    """A quantizer observing 10,000 batches (min/max kernel per call); a histogram analyzer updating 2,000
    times (min/max and histogram kernels, range growth and re-binning in torch)."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 16, generator=g) * (1 + k) for k in range(8)]
    if observer == "minmax_quantizer":
        q = QuantizeDequantize((16,), 8, False, encoding_analyzer=MinMax((16,)))
        with q.compute_encodings():
            grown = growth(lambda i: q(batches[i % 8]), calls)
        assert q.has_encoding
    else:
        a = TfEnhanced((16,))
        grown = growth(lambda i: a.update_stats(batches[i % 8]), calls)
        assert int(a.counts.sum()) == (calls + 300) * batches[0].numel()
    assert grown < BOUND_MIB, f"resident size grew by {grown:.1f} MiB over {calls} observer updates"
