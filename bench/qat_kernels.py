"""The pieces of a fused QAT step (QuantSim(..., fuse_activations=True)), each timed against the ops it
replaces, interleaved in one process:

1. max pooling by window (pyquant::max_pool2d_window and its backward) vs aten's max_pool2d_with_indices,
   on the Fashion-MNIST CNN's three pooled activations (batch 128);
2. ReLU -> quantizer -> 2x2 max pool as one native pass (quantize_dequantize_max_pool2d) vs torch.relu,
   pyquant's fake quantization and aten's pool as separate ops, forward;
3. a ReLU6 clamped inside the fake-quant kernel vs F.relu6 then fake quantization, forward + backward
   with range learning, on a MobileNetV2-sized activation (32x144x56x56);
4. the single-channel input quantizer + conv node vs the two modules, forward + backward with range
   learning (128x1x28x28 into a 3x3 conv with 16 channels);
5. one quantizer's training step (forward + backward), W4, range learning: pyquant min/max and scale/offset
   vs torch's learnable fake-quant op, on a 64x16 tensor (the per-call cost alone) and a 64x16x16x16 one;
   and the floor of any Python-side node: an identity torch.autograd.Function with the same inputs;
   a conv's int32 bias (scale from the two encodings, then the int32 grid) vs the same op by op in torch;
6. a small model's whole QAT step: a 3-conv CNN on 16x16 inputs (batch 64), W4A4 with range learning and
   fuse_activations=True, forward + backward + SGD step, vs the same step of the FP32 model.

    python -m bench.qat_kernels [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from pyquant.quant import QuantizeDequantize
from pyquant.quant.input_conv import quantized_input_conv

from bench._harness import interleaved_times, report, require_native, write_results

COLUMNS = ["case", "shape", "pyquant_ms", "baseline", "baseline_ms", "speedup"]
op = torch.ops.pyquant


def _row(case: str, shape, fns: list[Callable[[], Any]], baseline: str, reps: int) -> dict[str, Any]:
    ours, base = (statistics.median(t) for t in interleaved_times(fns, warmup=3, reps=reps))
    return dict(case=case, shape="x".join(map(str, shape)), pyquant_ms=1e3 * ours, baseline=baseline,
                baseline_ms=1e3 * base, speedup=base / ours)


def _quantizer(shape=(), mode="minmax", x=None) -> QuantizeDequantize:
    q = QuantizeDequantize(shape, 8, False, range_params=mode)
    with q.compute_encodings():
        q(x)
    return q


def pools(reps: int) -> list[dict[str, Any]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for shape in [(128, 16, 28, 28), (128, 32, 14, 14), (128, 64, 7, 7)]:
        x = torch.randn(shape, generator=g)
        out, arg = op.max_pool2d_window(x, [2, 2])
        _, idx = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])
        gy = torch.randn(out.shape, generator=g)
        rows.append(_row("2x2 max pool, forward", shape,
                         [lambda: op.max_pool2d_window(x, [2, 2]),
                          lambda: torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])],
                         "aten max_pool2d_with_indices", reps))
        rows.append(_row("2x2 max pool, backward", shape,
                         [lambda: op.max_pool2d_window_backward(gy, arg, [2, 2], list(shape)),
                          lambda: torch.ops.aten.max_pool2d_with_indices_backward(gy, x, [2, 2], [2, 2], [0, 0],
                                                                                  [1, 1], False, idx)],
                         "aten max_pool2d_with_indices_backward", reps))
        s, o = torch.full((1, 1, 1, 1), 0.02), torch.zeros(1, 1, 1, 1)

        def separate():
            y = op.quantize_dequantize(torch.relu(x), s, o, 0, 255)
            return torch.ops.aten.max_pool2d_with_indices(y, [2, 2], [2, 2])

        rows.append(_row("ReLU -> quantizer -> 2x2 max pool, forward", shape,
                         [lambda: op.quantize_dequantize_max_pool2d(x, s, o, 0, 255, [2, 2], True, 0.0, None),
                          separate], "torch.relu, pyquant fake quant, aten pool", reps))
    return rows


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def run():
        xr = x.detach().requires_grad_(True)
        y = fn(xr)
        y.backward(torch.ones_like(y))
    return run


def fused_activation(reps: int, quick: bool) -> list[dict[str, Any]]:
    shape = (8, 144, 56, 56) if quick else (32, 144, 56, 56)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    q = _quantizer(x=F.relu6(x))
    q.min.requires_grad_(True), q.max.requires_grad_(True)
    return [_row("ReLU6 + quantizer, forward + backward (range learning)", shape,
                 [_fwd_bwd(lambda t: q(t, (0.0, 6.0)), x), _fwd_bwd(lambda t: q(F.relu6(t)), x)],
                 "F.relu6, then the quantizer", reps)]


def input_conv(reps: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    x = torch.randn(128, 1, 28, 28)
    conv = nn.Conv2d(1, 16, 3, padding=1)
    q = _quantizer(x=x)

    def step(fn):
        def run():
            y = fn()
            y.backward(torch.ones_like(y))
        return run

    return [_row("input quantizer + 1-channel conv, forward + backward (range learning)", tuple(x.shape),
                 [step(lambda: quantized_input_conv(q, conv, x)), step(lambda: conv(q(x)))],
                 "the quantizer, then the conv (input gradient)", reps)]


def small_quantizer(reps: int) -> list[dict[str, Any]]:
    rows = []
    s = torch.tensor([0.02], requires_grad=True)
    zp = torch.tensor([8.0], requires_grad=True)

    def torch_learnable(t):
        return torch._fake_quantize_learnable_per_tensor_affine(t, s, zp, 0, 15, 1.0)

    for shape, n in (((64, 16), reps * 20), ((64, 16, 16, 16), reps * 4)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        for mode in ("minmax", "scale_offset"):
            q = QuantizeDequantize((), 4, False, range_params=mode)
            with q.compute_encodings():
                q(x)
            q.set_range_learning(True)
            rows.append(_row(f"one W4 quantizer's training step, {mode.replace('minmax', 'min/max')} (per call)",
                             shape, [_fwd_bwd(q, x), _fwd_bwd(torch_learnable, x)],
                             "torch._fake_quantize_learnable_per_tensor_affine", n))
        if len(shape) == 2:  # what any Python-side autograd node costs before its kernels run
            rows.append(_row("floor: an identity torch.autograd.Function with the quantizer's inputs (per call)",
                             shape, [_fwd_bwd(lambda t: _Identity.apply(t, *q.encoding_parameters()), x),
                                     _fwd_bwd(torch_learnable, x)],
                             "torch._fake_quantize_learnable_per_tensor_affine", n))
    return rows


class _Identity(torch.autograd.Function):
    """A node that does nothing (a copy forward, the gradient passed back): the fixed cost of a Python
    autograd node, which a quantizer's node pays before any kernel."""

    @staticmethod
    def forward(ctx, x, a, b):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class SmallCNN(nn.Module):
    """Three 3x3 convolutions with ReLUs, two 2x2 max pools, a linear head: a model whose step is mostly
    per-call overhead."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def small_model_step(reps: int) -> list[dict[str, Any]]:
    from pyquant.sim.quantsim import QuantSim

    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    fp32 = SmallCNN()
    sim = QuantSim(SmallCNN(), x[:1], quant_scheme="min_max", param_bw=4, output_bw=4, range_learning=True,
                   fuse_activations=True)
    sim.compute_encodings(lambda m: m(x))

    def step(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def run():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return run

    return [_row(f"3-conv CNN QAT step, W4A4, range learning, fused activations ({len(sim.quantizers)} quantizers)",
                 tuple(x.shape), [step(sim.model), step(fp32)], "the FP32 model's step", reps * 4)]


def int32_bias(reps: int) -> list[dict[str, Any]]:
    """A biased layer's int32 bias in a range-learning step (its scale from the input's and the weight's
    min/max encodings, then the bias on the int32 grid) against the same computed op by op in torch: the two
    encodings' scales, their product and the reference's fake quantization."""
    from pyquant.ops import reference
    from pyquant.sim.bias import Int32Bias
    from pyquant.sim.quantsim import QuantSim

    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    sim = QuantSim(SmallCNN(), x[:1], quant_scheme="min_max", param_bw=4, output_bw=4, range_learning=True)
    sim.compute_encodings(lambda m: m(x))
    conv = sim.model.get_submodule("features.3")
    bias = next(m for m in conv.modules() if isinstance(m, Int32Bias))
    b = conv.parametrizations.bias.original

    def op_by_op():
        with torch.no_grad():
            sx, _ = bias.input_quantizer.scale_offset()
            sw, _ = bias.weight_quantizer().scale_offset()
            s = sx.reshape(()) * sw.reshape(-1)
        return reference.quantize_dequantize_int32(b, s, "float")

    assert torch.equal(bias(b), op_by_op())
    return [_row("a conv's int32 bias: scale from the input and weight encodings, then the int32 grid (per call)",
                 tuple(b.shape), [lambda: bias(b), op_by_op], "the same op by op in torch (pyquant.ops.reference)",
                 reps * 20)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not require_native("bench/qat_kernels.py"):
        return 2
    reps = 5 if a.quick else 25
    rows = (pools(reps) + fused_activation(reps, a.quick) + input_conv(reps) + small_quantizer(reps)
            + int32_bias(reps) + small_model_step(reps))
    notes = ["interleaved medians in one process; speedup = baseline_ms / pyquant_ms (the 3-conv CNN row: "
             "speedup < 1, its inverse is the QAT step's cost relative to FP32)",
             "values and gradients of each pyquant case equal its baseline's (tests/test_pool_kernels.py, "
             "test_fake_quant.py, test_qat.py)"]
    path = write_results("qat_kernels" + ("_quick" if a.quick else ""), rows, COLUMNS,
                         title="Fused QAT building blocks", notes=notes, out_dir=Path(a.out) if a.out else None)
    return report(path, rows)


if __name__ == "__main__":
    sys.exit(main())
