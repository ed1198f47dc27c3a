"""A min/max quantizer's training call on the CPU in one native entry each way (minmax_qdq_forward /
minmax_qdq_backward: encoding, fake quantization, chain rule to min and max), recorded as one C++ autograd
node (pyquant._C_autograd's minmax_qdq) or, without that module, inside the Python node: the same values and
gradients, bit for bit, as the op-by-op path they replace, over granularities, grids, dtypes, fused
activations and the LSQ gradient scale; and taken only where they apply."""
from __future__ import annotations

import pytest
import torch

from pyquant import ops
from pyquant.ops import _registry
from pyquant.quant import QuantizeDequantize

pytestmark = pytest.mark.skipif(not ops.HAS_CPU_KERNELS, reason="needs the compiled CPU module")

FUSED = ("minmax_qdq_forward", "minmax_qdq_backward")
HAS_NODE = ("cpu", "minmax_qdq") in _registry.NATIVE_KERNELS
# the fused paths, each named by the entries taken away to reach it
PATHS = [pytest.param((), id="cpp-node", marks=pytest.mark.skipif(not HAS_NODE, reason="no pyquant._C_autograd")),
         pytest.param(("minmax_qdq",), id="python-node")]

# (x shape, encoding shape, block_size)
GRANULARITIES = [
    ((64, 16), (), None),                    # per tensor
    ((8, 3, 3, 3), (8, 1, 1, 1), None),       # a conv weight, per output channel
    ((4, 8, 5, 5), (1, 8, 1, 1), None),       # an activation, per channel
    ((8, 32), (8, 4), (1, 8)),                # per block
    ((2, 7, 9), (1,), None),                  # one value in a shape of its own
]


def _quantizer(enc_shape, block, bits, symmetric, lsq, x):
    q = QuantizeDequantize(enc_shape, bits, symmetric, block_size=block, lsq_grad_scale=lsq)
    with q.compute_encodings():
        q(x.float())
    with torch.no_grad():  # ranges that clamp: a tiny one (the scale's floor) and a shifted one
        q.max.mul_(0.7)
        q.min.mul_(1.3)
        if q.min.numel() > 2:
            q.max.view(-1)[1] = q.min.view(-1)[1] + 1e-12
    q.set_range_learning(True)
    return q


def _step(q, x, act, g):
    xr = x.detach().clone().requires_grad_(True)
    q.zero_grad()
    y = q(xr, act)
    y.backward(g)
    return y.detach(), xr.grad, q.min.grad.clone(), q.max.grad.clone()


def _without(monkeypatch, names):
    for name in names:
        monkeypatch.delitem(_registry.NATIVE_KERNELS, ("cpu", name), raising=False)


@pytest.fixture
def unfused(monkeypatch):
    """Runs the op-by-op path: the fused entries (and the C++ node) removed from the native table."""
    return lambda: _without(monkeypatch, ("minmax_qdq",) + FUSED)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("xs,es,block", GRANULARITIES)
@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, True), (3, False)])
@pytest.mark.parametrize("act,lsq", [(None, False), ((0.0, 6.0), True), ((0.0, float("inf")), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_equals_the_op_by_op_path(xs, es, block, bits, symmetric, act, lsq, dtype, path, unfused,
                                             monkeypatch):
    gen = torch.Generator().manual_seed(hash((xs, bits, symmetric, lsq)) % 2**31)
    x = (torch.randn(xs, generator=gen) * 3 + 0.5).to(dtype)
    g = torch.randn(xs, generator=gen).to(dtype)
    q = _quantizer(es, block, bits, symmetric, lsq, x)
    _without(monkeypatch, path)
    fused = _step(q, x, act, g)
    unfused()
    plain = _step(q, x, act, g)
    for name, a, b in zip(("y", "dx", "dmin", "dmax"), fused, plain):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert fused[2].abs().sum() > 0 and fused[3].abs().sum() > 0


@pytest.mark.parametrize("path", PATHS)
def test_the_fused_entries_run_where_they_apply(monkeypatch, path):
    _without(monkeypatch, path)
    entries = ("minmax_qdq",) if "minmax_qdq" not in path else FUSED  # the node's backward is C++'s
    calls = {n: 0 for n in entries}
    for name in entries:
        fn = _registry.NATIVE_KERNELS[("cpu", name)]

        def counted(*a, _fn=fn, _name=name, **k):  # the C++ node's entry returns None where it does not apply
            out = _fn(*a, **k)
            calls[_name] += out is not None
            return out
        monkeypatch.setitem(_registry.NATIVE_KERNELS, ("cpu", name), counted)
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    q = _quantizer((1, 8, 1, 1), None, 8, False, False, x)
    _step(q, x, None, torch.ones_like(x))
    once = dict.fromkeys(entries, 1)
    assert calls == once
    # a strided input, a fused max pool and scale/offset parameters take the op-by-op path
    _step(q, x.transpose(2, 3), None, torch.ones_like(x))
    xr = x.clone().requires_grad_(True)
    q(xr, None, ([2, 2], [2, 2], [0, 0], [1, 1], False)).sum().backward()
    so = QuantizeDequantize((1, 8, 1, 1), 8, False, range_params="scale_offset")
    with so.compute_encodings():
        so(x)
    so(x.clone().requires_grad_(True)).sum().backward()
    assert calls == once


@pytest.mark.parametrize("path", PATHS)
def test_fused_step_with_fixed_ranges_gives_the_input_gradient_only(unfused, monkeypatch, path):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4)) * 2
    q = _quantizer((), None, 4, False, False, x)
    q.set_range_learning(False)
    _without(monkeypatch, path)
    out = []
    for run in range(2):
        if run:
            unfused()
        xr = x.clone().requires_grad_(True)
        y = q(xr)
        y.backward(torch.full_like(x, 0.5))
        assert q.min.grad is None and q.max.grad is None
        out.append((y.detach(), xr.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert 0 < int((out[0][1] == 0).sum()) < x.numel()  # clipped elements pass no gradient


def test_fused_step_rejects_a_mismatched_encoding_shape():
    q = QuantizeDequantize((1, 8, 1, 1), 8, False)
    x = torch.randn(2, 8, 4, 4)
    with q.compute_encodings():
        q(x)
    q.set_range_learning(True)
    with pytest.raises(ValueError, match="does not divide"):
        q(torch.randn(2, 6, 4, 4, requires_grad=True))


@pytest.mark.parametrize("path", PATHS)
def test_fused_step_names_an_unsupported_dtype_as_the_op_by_op_path_does(unfused, monkeypatch, path):
    x = torch.randn(8, 8, dtype=torch.float64)
    q = _quantizer((), None, 8, False, False, x)
    _without(monkeypatch, path)
    errors = []
    for run in range(2):
        if run:
            unfused()
        with pytest.raises(TypeError, match="float64") as info:
            q(x.clone().requires_grad_(True))
        errors.append(str(info.value))
    assert errors[0] == errors[1]
