"""StagedRun(inplace_activations=True): an activation module clamps its input in place only where nothing
else can see that input (a value of the run, read by the activation alone, not a view, no gradient
recorded); the graph's outputs equal an ordinary run's, and the caller's data stays as it was."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from pyquant.sim.staged import StagedRun


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.act_in = nn.ReLU()       # reads the graph input: never in place
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU6()         # the conv's only reader: in place
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.act2 = nn.Hardtanh(-0.5, 0.5)  # conv2's output is also added below: not in place
        self.act3 = nn.ReLU()         # reads a view: not in place

    def forward(self, x):
        a = self.act(self.conv(self.act_in(x)))
        b = self.conv2(a)
        c = self.act2(b) + b
        return c, self.act3(c.flatten(1))


def _run(gm, chunks, inplace):
    run = StagedRun(gm, [(c,) for c in chunks], inplace_activations=inplace)
    with torch.no_grad():
        return run.run_to_end(0), run


def test_inplace_activations_give_the_ordinary_run_s_outputs_and_leave_the_data_alone():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_Net().eval())
    chunks = [torch.randn(2, 3, 6, 6) * 3 for _ in range(3)]
    kept = [c.clone() for c in chunks]
    plain, _ = _run(gm, chunks, False)
    fused, _ = _run(gm, chunks, True)
    for c, k in zip(chunks, kept):
        assert torch.equal(c, k)  # the graph input was not clamped in place
    for p, f in zip(plain, fused):
        assert torch.equal(p[0], f[0]) and torch.equal(p[1], f[1])


def test_only_the_sole_reader_of_a_computed_value_clamps_in_place():
    gm = fx.symbolic_trace(_Net().eval())
    chunks = [torch.randn(2, 3, 6, 6)]
    run = StagedRun(gm, [(c,) for c in chunks], inplace_activations=True)
    chosen = {}
    with torch.no_grad():
        for i, n in enumerate(run.nodes):
            if n.op == "output":
                break
            if n.op == "call_module" and n.target.startswith("act"):
                chosen[n.target] = run._inplace_clamp(n) is not None
            run.compute(n)
            run.release(i)
    assert chosen == {"act_in": False, "act": True, "act2": False, "act3": False}
    # with gradients recorded, nothing is clamped in place
    run = StagedRun(gm, [(c,) for c in chunks], inplace_activations=True)
    for n in run.nodes:
        if n.target == "act":
            assert run._inplace_clamp(n) is None
            break
        with torch.no_grad():
            run.compute(n)


def test_the_inplace_activation_reuses_its_input_s_memory():
    gm = fx.symbolic_trace(_Net().eval())
    run = StagedRun(gm, [(torch.randn(2, 3, 6, 6),)], inplace_activations=True)
    with torch.no_grad():
        for n in run.nodes:
            run.compute(n)
            if n.target == "act":
                conv_out = run.value(n.args[0])[0]
                assert run.value(n)[0].data_ptr() == conv_out.data_ptr()
                assert float(conv_out.max()) <= 6.0 and float(conv_out.min()) >= 0.0
                break
