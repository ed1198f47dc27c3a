"""Modules called more than once: each call site is its own op with its own output quantizer (names with a
suffix per call), a weight used by several calls has one weight quantizer, and such models calibrate,
summarize, export and run in onnxruntime like any other."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pyquant import QuantSim
from pyquant.analysis import layers


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock layout: one ReLU module called twice."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class SharedActAndWeight(nn.Module):
    """A SiLU module shared by every stage (EfficientNet-style) and one conv applied twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = BasicBlock(8)
        self.act = nn.SiLU()
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = self.block(x)
        x = self.act(self.shared(x))
        x = self.act(self.shared(x))  # the same weights again
        return self.head(x.mean((2, 3)))


def _model():
    torch.manual_seed(0)
    m = SharedActAndWeight().eval()
    with torch.no_grad():
        for bn in (m.block.bn1, m.block.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m


def test_every_call_site_has_its_own_output_quantizer_and_a_shared_weight_one_quantizer():
    x = torch.randn(8, 3, 16, 16)
    sim = QuantSim(_model(), x[:1], config="per_tensor")
    acts = set(sim.activation_quantizers)
    assert {"block.relu.output", "block.relu.output_1"} <= acts
    assert {"act.output", "act.output_1", "act.output_2"} <= acts
    assert {"shared.output", "shared.output_1"} <= acts
    assert [n for n in sim.param_quantizers if n.startswith("shared")] == ["shared.weight"]
    assert sim.placement["act.output_2"].op_type == sim.op_type("act.output") == "Silu"
    sim.compute_encodings(lambda m: m(x))  # failed before: the second call's quantizer had no encoding
    assert all(q.has_encoding for q in sim.quantizers.values())
    encs = [sim.quantizer(n).get_encoding() for n in ("act.output", "act.output_1", "act.output_2")]
    assert len({float(e.max) for e in encs}) == 3  # each call site calibrated on its own data
    text = sim.summary(file=open("/dev/null", "w"))
    assert "block.relu.output_1" in text
    assert {"shared.output", "shared.output_1"} <= {q for layer in layers(sim) for q in layer.quantizers}
    with torch.no_grad():
        ref, out = sim.model(x), None
        for n in sim.quantizers:
            sim.enable(n, False)
        out = sim.model(x)
    torch.testing.assert_close(out, _model()(x))  # all quantizers off: FP32 exactly
    assert not torch.equal(ref, out)


def test_shared_modules_export_and_run_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from pyquant.sim.export import run_onnx
    x = torch.randn(8, 3, 16, 16)
    sim = QuantSim(_model(), x[:1])
    sim.compute_encodings(lambda m: m(x))
    paths = sim.export(tmp_path, "shared", x[:1])
    got = run_onnx(paths["onnx"], x, optimize=False)[0]
    with torch.no_grad():
        want = sim.model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    import json
    names = {e["name"] for e in json.loads(paths["encodings"].read_text())["activation_encodings"]}
    assert {"act.output_1", "act.output_2", "block.relu.output_1"} <= names


def test_autoquant_and_layer_sensitivity_handle_shared_modules(tmp_path):
    """The whole AutoQuant flow (folding, CLE, bias correction, AdaRound) and the per-layer sweep run on a
    model whose modules are called several times; each call site of the shared SiLU is a layer of its own."""
    from pyquant.analysis import layer_sensitivity
    from pyquant.autoquant import AutoQuant
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    model = _model()
    with torch.no_grad():
        ref = model(x)

    def fidelity(m: nn.Module) -> float:
        with torch.no_grad():
            return 1.0 - float((m(x) - ref).norm() / ref.norm())

    aq = AutoQuant(model, x[:1], x, fidelity, param_bw=4, config="per_tensor", quant_schemes=("tf_enhanced",),
                   adaround_kwargs={"iterations": 10, "batch_size": 8, "positions_per_sample": 16}, progress=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = aq.optimize(allowed_accuracy_drop=0.0, output_dir=tmp_path)
    evaluated = [s.key for s in res.steps if s.status == "evaluated"]
    assert {"quantsim", "adaround"} <= set(evaluated), [(s.key, s.status, s.reason) for s in res.steps]
    assert {"act.output", "act.output_1", "act.output_2", "shared.output_1"} <= set(res.sim.activation_quantizers)
    assert fidelity(res.sim.model) == pytest.approx(res.accuracy, abs=1e-6)
    sim = QuantSim(_model(), x[:1])
    sim.compute_encodings(lambda m: m(x))
    sens = layer_sensitivity(sim, x, progress=False)
    by_quantizer = {q: row["layer"] for row in sens["layers"] for q in row["quantizers"]}
    assert len({by_quantizer[n] for n in ("act.output", "act.output_1", "act.output_2")}) == 3
    assert all(row["enabled_alone"] is not None for row in sens["layers"])
