"""The C++ autograd node of a min/max quantizer (pyquant._C_autograd): built where CI says it must be, bound
to the CPU module's kernels, loaded only beside the torch it was built against, and behaving as an autograd
node should (no graph without gradients, saved tensors guarded against in-place changes and freed after
the backward, gradients accumulated over calls, errors from the kernels raised). Its values and gradients
against the Python paths: tests/test_quantizer_step.py; a whole QAT step: test_a_qat_step_..._python_node."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyquant import _native, native_info
from pyquant.ops import _registry
from pyquant.quant import QuantizeDequantize

NODE = _native.autograd_module()
pytestmark = pytest.mark.skipif(NODE is None, reason=f"no C++ autograd module: {_native._autograd_error}")


@pytest.mark.skipif(os.environ.get("PYQUANT_TORCH_NODE") != "ON", reason="the build did not require the module")
def test_the_module_is_there_when_the_build_required_it():
    info = native_info()
    assert info["autograd_module"] and info["autograd_error"] is None


def test_a_module_built_against_another_torch_is_not_used(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "1.0.0")
    mod, why = _native._load_autograd()
    assert mod is None and "built against torch" in why and "1.0.0" in why


def test_bind_takes_only_the_cpu_modules_table():
    import datetime  # any other capsule: one of the standard library's
    with pytest.raises(ValueError, match="pyquant._C.native_table"):
        NODE.bind(datetime.datetime_CAPI)
    NODE.bind(_native.cpu_module().native_table)  # the right one, again: still bound afterwards


def _quantizer(x, shape=()):
    q = QuantizeDequantize(shape, 4, False)
    with q.compute_encodings():
        q(x)
    q.set_range_learning(True)
    return q


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


def test_no_graph_without_gradients():
    x = _x(16, 8)
    q = _quantizer(x)
    with torch.no_grad():
        y = q(x)
    assert y.grad_fn is None and not y.requires_grad
    y2 = q(x)  # ranges learn: a node even for an input without gradient
    assert y2.grad_fn is not None and "MinmaxQdq" in y2.grad_fn.name()
    assert torch.equal(y, y2.detach())


def test_an_input_changed_in_place_after_the_call_is_refused():
    x = _x(16, 8).requires_grad_(True)
    q = _quantizer(x.detach())
    xin = x * 1.0
    y = q(xin)
    with torch.no_grad():
        xin.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_saved_tensors_are_freed_after_the_backward_and_kept_with_retain_graph():
    x = _x(16, 8).requires_grad_(True)
    q = _quantizer(x.detach())
    y = q(x)
    g = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    y.backward(g, retain_graph=True)
    first = x.grad.clone(), q.min.grad.clone(), q.max.grad.clone()
    y.backward(g)  # the same graph again: gradients add up
    for a, b in zip(first, (x.grad, q.min.grad, q.max.grad)):
        torch.testing.assert_close(b, 2 * a, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.backward(g)


def test_gradients_flow_to_the_parameters_in_their_own_shape():
    x = _x(8, 3, 3, 3)  # a conv weight, per output channel
    q = _quantizer(x, (8, 1, 1, 1))
    xr = x.clone().requires_grad_(True)
    q(xr).backward(torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))
    assert q.min.grad.shape == q.min.shape == (8, 1, 1, 1) and q.max.grad.shape == (8, 1, 1, 1)
    assert q.min.grad.abs().sum() > 0 and xr.grad.shape == x.shape


INF = float("inf")


def test_a_call_that_disagrees_with_its_layout_raises_instead_of_reading_past_it():
    x = _x(16, 8)
    q = _quantizer(x, (16, 1))
    layout = _native.cpu_module().Layout(128, 8, 8, 16, [], [], [])
    mn, mx = q.min.detach(), q.max.detach()
    with pytest.raises(RuntimeError, match="x has 64 elements, the layout's 128"):
        NODE.minmax_qdq(x[:8], mn, mx, layout.address, 0, 15, 1e-8, False, 1.0, None, None)
    with pytest.raises(RuntimeError, match="layout's 16 values, got 8"):
        NODE.minmax_qdq(x, mn[:8], mx[:8], layout.address, 0, 15, 1e-8, False, 1.0, None, None)
    assert NODE.minmax_qdq(x, mn, mx, layout.address, 0, 15, 1e-8, False, 1.0, None, None) is not None


@pytest.mark.parametrize("case", ["strided x", "empty x", "float64 x", "int32 x", "float64 ranges",
                                  "ranges of two shapes", "act lo >= hi"])
def test_the_node_declines_what_it_does_not_take_and_the_quantizer_still_answers(case):
    x = _x(16, 8)
    q = _quantizer(x, (16, 1))
    mn, mx, lo, hi = q.min.detach(), q.max.detach(), None, None
    if case == "strided x":
        x = _x(8, 16).t()
    elif case == "empty x":
        x = x[:0]
    elif case in ("float64 x", "int32 x"):
        x = x.to(torch.float64 if case == "float64 x" else torch.int32)
    elif case == "float64 ranges":
        mn, mx = mn.double(), mx.double()
    elif case == "ranges of two shapes":
        mx = mx.reshape(1, 16)
    else:
        lo, hi = 1.0, 1.0
    layout = _native.cpu_module().Layout(x.numel(), 8, 8, 16, [], [], [])
    assert NODE.minmax_qdq(x, mn, mx, layout.address, 0, 15, 1e-8, False, 1.0, lo, hi) is None
    if case == "strided x":  # the quantizer's other path gives the contiguous input's values
        assert torch.equal(q(x), q(x.contiguous()))


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def _train(monkeypatch, use_node: bool, steps: int = 3):
    from pyquant.sim.quantsim import QuantSim
    with monkeypatch.context() as m:
        if not use_node:
            m.delitem(_registry.NATIVE_KERNELS, ("cpu", "minmax_qdq"))
        torch.manual_seed(0)
        x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 10, (16,))
        sim = QuantSim(_CNN(), x[:1], quant_scheme="min_max", param_bw=4, output_bw=4, range_learning=True,
                       fuse_activations=True)
        sim.compute_encodings(lambda mod: mod(x))
        before = {k: v.detach().clone() for k, v in sim.model.state_dict().items()}
        opt = torch.optim.SGD(sim.model.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(sim.model(x), y).backward()
            opt.step()
        return before, {k: v.detach().clone() for k, v in sim.model.state_dict().items()}


def test_a_qat_step_with_the_node_equals_the_python_node(monkeypatch):
    calls = []
    fn = _registry.NATIVE_KERNELS[("cpu", "minmax_qdq")]
    monkeypatch.setitem(_registry.NATIVE_KERNELS, ("cpu", "minmax_qdq"),
                        lambda *a, **k: calls.append(1) or fn(*a, **k))
    start, with_node = _train(monkeypatch, True)
    assert calls, "the C++ node did not run"
    _, without = _train(monkeypatch, False)
    assert with_node.keys() == without.keys()
    for k in with_node:
        torch.testing.assert_close(with_node[k], without[k], rtol=0, atol=0, msg=k)
    # the ranges learned (the node's range gradients reached them), so the equality covers them
    ranges = [k for k in with_node if k.endswith((".min", ".max"))]
    assert ranges and sum(not torch.equal(with_node[k], start[k]) for k in ranges) >= len(ranges) // 2
