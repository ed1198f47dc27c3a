"""A simulated training step (forward, backward, optimizer step) reads no tensor value on the host: no
item/tolist/cpu/numpy or bool/float/int conversion of a tensor, so on a GPU nothing waits for the device.
On the CPU a counter of host reads checks it for the zoo's CNN and decoder, with range learning on and off,
fused activations, both range parametrizations; on a GPU (skipped here without one) the step runs under
torch.cuda.set_sync_debug_mode("error"), and a whole step captured into a CUDA graph replays to the values
eager steps give."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import pyquant
from pyquant.sim.quantsim import QuantSim

import zoo
from conftest import CUDA
from host_reads import HostReadCounter, MethodReads


def _cnn_sim(device: str, **kwargs):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    m = zoo.calibrate_batchnorms(zoo.resnet18(), x)
    pyquant.fold_batchnorms(m)
    sim = QuantSim(m.to(device), x[:2].to(device), quant_scheme="min_max", param_bw=4, output_bw=4, **kwargs)
    x = x[:4].to(device)
    sim.compute_encodings(lambda mm: mm(x))
    return sim, lambda model: model(x).float().pow(2).mean()


def _llama_sim(device: str, **kwargs):
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    sim = QuantSim(zoo.tiny_llama().to(device), {"input_ids": ids[:1]}, quant_scheme="min_max", param_bw=4,
                   output_bw=8, **kwargs)
    sim.compute_encodings(lambda mm: mm(input_ids=ids))
    return sim, lambda model: F.cross_entropy(model(input_ids=ids).logits.flatten(0, 1).float(), ids.flatten())


SIMS = {"resnet18": _cnn_sim, "tiny_llama": _llama_sim}
SETTINGS = [dict(range_learning=False, fuse_activations=True),
            dict(range_learning=True, fuse_activations=True),
            dict(range_learning=True, fuse_activations=False),
            dict(range_learning=True, fuse_activations=True, range_params="scale_offset")]


def _step(sim, loss_fn, opt):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(sim.model)
    loss.backward()
    opt.step()
    return loss


def test_counter_sees_host_reads_in_forward_backward_and_op_kernels():
    """The counter is not blind: a read planted in the forward, in an autograd node's backward and in the
    Python kernel of a registered pyquant op is counted each."""

    class Planted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            g.sum().item()  # the planted read
            return g * 2

    x = torch.randn(4, 4, requires_grad=True)
    with HostReadCounter() as c:
        Planted.apply(x).sum().backward()
    assert c.total == 1
    with HostReadCounter() as c:
        float(x.sum())
    assert c.total >= 1 and c.counts["__float__"] == 1

    from pyquant.ops import _cpu
    if _cpu.backend is None:
        pytest.skip("needs pyquant._C")
    backend = _cpu.backend
    original = backend._check_scale
    backend._check_scale = lambda s, n: (s.sum().item(), original(s, n))
    try:
        with HostReadCounter() as c:
            pyquant.ops.raw.quantize_dequantize(x.detach(), torch.full((1, 1), 0.1), torch.zeros(1, 1), 0, 255)
    finally:
        backend._check_scale = original
    assert c.counts["aten::item"] == 1


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("model", sorted(SIMS))
def test_qat_step_reads_nothing_on_the_host(model, settings):
    sim, loss_fn = SIMS[model]("cpu", **settings)
    # SGD: the CPU Adam reads its step counter (a CPU tensor) on the host; on a GPU the capturable Adam does not
    opt = torch.optim.SGD(sim.model.parameters(), lr=1e-6, momentum=0.9)  # small: learned scales stay > 0
    before = {n: p.detach().clone() for n, p in sim.model.named_parameters()}
    _step(sim, loss_fn, opt)  # the first step creates the optimizer's state
    with HostReadCounter() as c:
        loss = _step(sim, loss_fn, opt)
    assert c.total == 0, dict(c.counts)
    with MethodReads() as m:  # no dispatch mode: the quantizers call their kernels directly, as in training
        _step(sim, loss_fn, opt)
    assert sum(m.counts.values()) == 0, dict(m.counts)
    assert torch.isfinite(loss)
    moved = [n for n, p in sim.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved, "the step trained nothing"
    if settings["range_learning"]:
        assert any(n.endswith((".min", ".max", ".scale", ".offset")) for n in moved)


def _gpu_sim(model: str, **settings):
    return SIMS[model]("cuda", **settings)


@pytest.mark.cuda
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("model", sorted(SIMS))
def test_qat_step_on_gpu_never_synchronizes(model, settings):
    sim, loss_fn = _gpu_sim(model, **settings)
    opt = torch.optim.Adam(sim.model.parameters(), lr=1e-4, capturable=True)
    _step(sim, loss_fn, opt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            loss = _step(sim, loss_fn, opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.mark.cuda
@pytest.mark.parametrize("settings", SETTINGS[:2] + SETTINGS[3:],
                         ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("model", sorted(SIMS))
def test_qat_step_captured_in_a_cuda_graph_replays_like_eager(model, settings):
    """Two copies of one simulation: one trains eagerly, the other by replaying a CUDA graph of a whole step
    (forward, backward, optimizer); losses and every parameter (weights and encodings) agree."""
    sim, loss_fn = _gpu_sim(model, **settings)
    eager_model = copy.deepcopy(sim.model)
    graphed, eager = sim.model, eager_model

    def make_opt(m):
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    opt_g, opt_e = make_opt(graphed), make_opt(eager)

    def step(model, opt):
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        return loss

    # warm up on a side stream (as CUDA graph capture requires), the same steps on both copies
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(graphed, opt_g)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        step(eager, opt_e)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, opt_g)
    # capture ran nothing: the copies are still in step
    for _ in range(4):
        graph.replay()
        ref = step(eager, opt_e)
        torch.testing.assert_close(static_loss, ref, rtol=1e-5, atol=1e-6)
    torch.cuda.synchronize()
    for (n, a), b in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.cuda
def test_qat_step_under_compile_reduce_overhead_matches_eager():
    sim, loss_fn = _gpu_sim("resnet18", range_learning=True, fuse_activations=True)
    eager = copy.deepcopy(sim.model)
    compiled = torch.compile(sim.model, mode="reduce-overhead")
    opt_c = torch.optim.SGD(sim.model.parameters(), lr=1e-3)
    opt_e = torch.optim.SGD(eager.parameters(), lr=1e-3)
    for _ in range(3):
        for model, opt in ((compiled, opt_c), (eager, opt_e)):
            opt.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            opt.step()
    for (n, a), b in zip(sim.model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
