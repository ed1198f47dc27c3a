"""Random inputs and encodings for the op tests (never zeros)."""
from __future__ import annotations

import math

import pytest

import torch

from pyquant.ops import _reference as ref


def rand_input(shape, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    # heavy tail so that clipping happens on both ends
    x += torch.distributions.Laplace(0.0, 1.0).sample(shape) * (torch.rand(shape, generator=g) < 0.05)
    return x.to(dtype).to(device)


def activation(x, lo, hi):
    """The torch module a fused activation stands for: ReLU for (0, None or inf), else Hardtanh(lo, hi)."""
    if hi is None or hi == float("inf"):
        return torch.relu(x)
    return torch.nn.functional.hardtanh(x, lo, hi)


def rand_params(x, s_shape, bitwidth, signed, seed=1):
    """Scales that put most of x inside the grid (some clipping), and integer offsets on the grid."""
    g = torch.Generator().manual_seed(seed)
    n_levels = 2**bitwidth - 1
    span = 2.0 * float(x.float().abs().amax()) if x.numel() else 1.0
    base = max(span / n_levels, 1e-6)
    s = base * (0.5 + torch.rand(s_shape, generator=g))
    if signed:
        o = torch.zeros(s_shape)
    else:
        o = -torch.randint(0, 2**bitwidth, s_shape, generator=g).float()
    return s.to(x.device), o.to(x.device)


def grid(bitwidth, signed):
    if signed:
        return -(2 ** (bitwidth - 1)), 2 ** (bitwidth - 1) - 1
    return 0, 2**bitwidth - 1


def block_shape(shape, blocks):
    return tuple(n // b for n, b in zip(shape, blocks))


def lsq_scale(numel, nscale, qmax):
    return 1.0 / math.sqrt(max(numel // nscale, 1) * qmax)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is plenty, and on a busy machine OpenMP's barriers would dominate.
    Use as `from helpers import one_thread` plus `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fashion_mnist_or_skip():
    """(trained Fashion-MNIST CNN, train images, test images, test labels), or skip the test when the
    data set is not installed."""
    from pyquant._assets import AssetMissingError
    try:
        from pyquant.datasets.fashion_mnist import fashion_mnist_tensors
        from pyquant.models import fashion_cnn
        model = fashion_cnn()
        xtr, _ = fashion_mnist_tensors("train")
        xte, yte = fashion_mnist_tensors("test")
    except AssetMissingError as exc:
        pytest.skip(str(exc))
    return model, xtr, xte, yte


def ds_tolerance(g, x, s, o, qmin, qmax, s_shape):
    """Bound for the reduction error of ds/do: 1e-5 (about 80 float32 ulps) of the sum of |terms| that the
    kernel adds up, each term taken from the reference's own per-element derivatives."""
    _, d_scale, d_offset = ref.fake_quant_derivatives(x, s, o, qmin, qmax)
    t = x.float() / ref.expand(s, x.shape)
    # both derivatives, plus an ulp of t for the division's rounding
    mag = g.float().abs() * (d_scale.abs() + d_offset + t.abs() * 2.0**-23)
    return 1e-5 * ref.reduce_to(mag, s_shape).float() + 1e-12


def assert_onnx_runs_simulation(sim, onnx_path, inputs: dict, step_tol: float = 1e-3) -> dict[str, torch.Tensor]:
    """Checks that an exported QDQ graph, run as written by onnxruntime, computes `sim.model` segment by
    segment (`pyquant.sim.compare.compare` in lockstep: each segment between quantizers starts in the
    simulation from the graph's own quantized tensors). Asserts that

    * every enabled quantizer is one QuantizeLinear/DequantizeLinear pair in the graph, and the graph
      quantizes nothing else (compare raises ExportMismatchError otherwise);
    * each pair carries the quantizer's scale and zero point, and the quantizer, applied to the graph's input
      of that pair, gives the pair's output bit for bit (same rounding and clamping);
    * each quantizer's input, computed by the simulation from the graph's upstream tensors, is within
      `step_tol` quantization steps of the graph's (float summation order only);
    * the graph's outputs are the simulation's.

    An end-to-end comparison cannot ask for more than float noise before each quantizer: the two runtimes
    add up a matmul in different orders (and write attention, GELU, bias adds with different float ops), so
    a value on a rounding boundary can land one step apart, and every later quantizer sees that step.
    Returns {quantizer name: where its code in the simulation, from its own input, differs from the graph's}:
    the rounding flips of float noise (the simulation run alone equals the graph wherever none came before)."""
    from pyquant.sim.compare import compare

    report = compare(sim, onnx_path, inputs, mode="lockstep", optimize=False)
    for t in report.tensors:
        assert t.encoding_matches, f"{t.name}: the graph's scale or zero point is not the quantizer's"
        assert t.qdq_exact, f"{t.name}: QDQ differs from the quantizer"
        assert t.input_max_steps is not None and t.input_max_steps <= step_tol, \
            f"{t.name}: input {t.input_max_steps} steps from the graph's"
    assert not report.notes, report.notes
    assert report.outputs, "no output of the graph was compared"
    for o, (sim_out, graph_out) in zip(report.outputs, report.output_values):
        torch.testing.assert_close(graph_out, sim_out, msg=lambda m, o=o: f"graph output {o.index} ({o.name})\n{m}")
    return {name: v.simulation != v.target for name, v in report.values.items()}


def counted(monkeypatch, module, name: str, stop_at: int = 0) -> list:
    """Replaces `module.name` (the original, if it is already replaced) with a wrapper that records each call
    and raises KeyboardInterrupt on call number `stop_at` (a job killed mid-run; 0: never). Returns the list
    of calls, one entry each."""
    real = getattr(getattr(module, name), "__wrapped__", getattr(module, name))
    calls: list = []

    def wrapper(*args, **kw):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*args, **kw)

    wrapper.__wrapped__ = real
    monkeypatch.setattr(module, name, wrapper)
    return calls


def output_fidelity(model, x):
    """An eval_fn for AutoQuant: 1 - the relative error of a model's outputs on `x` against `model`'s now."""
    with torch.no_grad():
        ref = model(x)

    def fidelity(m):
        with torch.no_grad():
            return 1.0 - float((m(x) - ref).norm() / ref.norm())
    return fidelity
