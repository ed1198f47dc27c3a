"""pyquant.sim.compare and `pyquant compare`: the exported QDQ model against the simulation, tensor by
tensor, on the tiny CNN of tests/spec_tiny.py: an honest export agrees, a broken one is caught at the
tensor that was broken, a graph of another simulation and inputs of another shape are refused by name."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from helpers import assert_onnx_runs_simulation, one_thread  # noqa: F401  (fixture)
from spec_tiny import tiny_data, tiny_model

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from pyquant import QuantSim, cli, fold_batchnorms  # noqa: E402
from pyquant.sim.compare import ExportMismatchError, compare  # noqa: E402
from pyquant.sim.qdq_graph import pair_quantizers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ORDER = ["input.x", "stem.0.weight", "stem.2.output", "block.0.weight", "block.2.output", "block.3.weight",
         "block.3.output", "add.output", "head.0.weight", "head.1.output", "pool.output", "fc.weight", "fc.output"]


def _sim(**kw) -> QuantSim:
    model = tiny_model()
    fold_batchnorms(model)
    data = tiny_data()
    sim = QuantSim(model, data[:1], **kw)
    sim.compute_encodings(lambda m: m(data))
    return sim


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    sim = _sim()
    path = sim.export(tmp_path_factory.mktemp("export"), "tiny", tiny_data()[:1])["onnx"]
    return sim, path


def _edited(src, dst, edit) -> str:
    model = onnx.load(str(src))
    edit(model)
    onnx.save(model, str(dst))
    return str(dst)


def _quantize_node(model, sim, name: str):
    pair = pair_quantizers(sim, model)[name]
    return next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == pair.codes), pair


def _scale_quantize_linear(sim, name: str, factor: float):
    """Gives one QuantizeLinear a scale of its own, `factor` times the quantizer's (its DequantizeLinear
    keeps the right one): an exporter that wrote a wrong scale on one side of a pair."""
    def edit(model):
        q, pair = _quantize_node(model, sim, name)
        bad = onnx.numpy_helper.from_array((pair.q_scale * np.float32(factor)).astype(np.float32), "broken_scale")
        model.graph.initializer.append(bad)
        q.input[1] = "broken_scale"
    return edit


def _drop_pair(sim, name: str):
    """Removes one quantizer's QuantizeLinear/DequantizeLinear: its readers read the float tensor."""
    def edit(model):
        q, _ = _quantize_node(model, sim, name)
        dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
        for n in model.graph.node:
            for i, t in enumerate(n.input):
                if t == dq.output[0]:
                    n.input[i] = q.input[0]
        model.graph.node.remove(q)
        model.graph.node.remove(dq)
    return edit


# ---- an honest export --------------------------------------------------------------------------------
def test_the_export_agrees_with_the_simulation(exported, tmp_path):
    sim, path = exported
    x = tiny_data(16, seed=5)
    for mode in ("lockstep", "end_to_end"):
        r = compare(sim, path, x, mode=mode)
        assert [t.name for t in r.tensors] == ORDER  # execution order, weights as their layer runs
        assert r.agrees and r.first_difference is None and not r.differing, r.summary()
        for t in r.tensors:
            assert t.encoding_matches and t.qdq_exact, t
            assert t.max_steps == 0 and t.sqnr_db == float("inf"), t  # as written, QDQ is the simulation exactly
            assert t.input_max_steps is not None and t.input_max_steps < 1e-3, t
            assert t.kind == ("weight" if t.name.endswith(".weight") else "activation")
            assert t.op_type == sim.op_type(t.name) and t.shape == tuple(r.values[t.name].simulation.shape)
        assert r.samples == 16 and len(r.outputs) == 1 and r.outputs[0].max_abs_diff == 0
    text = r.summary()
    assert "no quantized tensor differs by more than one step" in text and "fc.output" in text
    doc = json.loads(json.dumps(r.to_json(), allow_nan=False))  # strict JSON: inf as a string
    assert doc["first_difference"] is None and doc["mode"] == "end_to_end" and not doc["optimize"]
    assert [t["name"] for t in doc["tensors"]] == ORDER and doc["tensors"][0]["sqnr_db"] == "inf"
    # the dumped tensors, one file, written atomically
    npz = r.save_tensors(tmp_path / "dump")
    assert npz == tmp_path / "dump" / "tensors.npz" and not list((tmp_path / "dump").glob("*.tmp"))
    with np.load(npz) as z:
        for name in ORDER:
            np.testing.assert_array_equal(z[f"simulation/{name}"], r.values[name].simulation.numpy())
            np.testing.assert_array_equal(z[f"target/{name}"], r.values[name].target.numpy())
        assert f"target_input/{ORDER[2]}" in z.files and "output/target/0" in z.files


def test_optimized_int8_kernels_stay_within_one_step_in_lockstep(exported):
    sim, path = exported
    r = compare(sim, path, tiny_data(16, seed=5), mode="lockstep", optimize=True)
    assert [t.name for t in r.tensors] == ORDER and not r.notes, r.notes
    # integer accumulation and requantization round differently from float convolutions, by one step at most
    assert all(t.max_steps <= 1.0 + 1e-3 for t in r.tensors), r.summary()
    assert all(t.input_max_steps is None for t in r.tensors if t.kind == "activation")  # fused away
    assert "optimized (int8 kernels)" in r.summary()


def test_assert_onnx_runs_simulation_is_compare_in_lockstep(exported):
    sim, path = exported
    flips = assert_onnx_runs_simulation(sim, path, {"input": tiny_data(8, seed=2)})
    assert list(flips) == ORDER and not any(bool(f.any()) for f in flips.values())


def test_fused_activations_pools_and_a_shared_layer():
    """ReLU and ReLU6 clamped inside their quantizers, a max pool run by one, a single-channel input quantized
    with its convolution, and a layer called twice: each still pairs with its QDQ nodes."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.relu, self.pool = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            self.c2, self.relu6 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6()

        def forward(self, x):
            x = self.pool(self.relu(self.c1(x)))
            return self.relu6(self.c2(self.relu6(self.c2(x))))  # c2 and relu6 run twice

    torch.manual_seed(0)
    x = torch.randn(6, 1, 12, 12)
    sim = QuantSim(Net().eval(), x[:1], fuse_activations=True)
    sim.compute_encodings(lambda m: m(x))
    assert "relu.output" in sim.fused_activations
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = sim.export(d, "fused", x[:1])["onnx"]
        flips = assert_onnx_runs_simulation(sim, path, {"input": x})
        r = compare(sim, path, x, mode="end_to_end")
    assert set(flips) == {n for n, q in sim.quantizers.items() if q.enabled}
    assert r.agrees, r.summary()
    assert r.tensor("relu.output").shape == (6, 8, 12, 12)  # the quantized tensor, before the fused pool


def test_in_place_activations_and_equal_weights_read_through_identity(tmp_path):
    """Lockstep hands each segment a copy of the target's tensor (an in-place Hardswish downstream must not
    edit it), and two norm gains of ones, which the exporter stores as one initializer read through
    Identity nodes, still pair with their quantizers."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.norm1 = nn.Linear(16, 32), nn.Hardswish(inplace=True), nn.LayerNorm(32)
            self.fc2, self.norm2 = nn.Linear(32, 32), nn.LayerNorm(32)

        def forward(self, x):
            return self.norm2(self.fc2(self.norm1(self.act(self.fc1(x)))))

    torch.manual_seed(0)
    x = torch.randn(8, 16)
    sim = QuantSim(Net().eval(), x[:1])
    sim.compute_encodings(lambda m: m(x))
    weights = [n for n in sim.param_quantizers if "norm" in n]
    assert len(weights) == 2 and all(sim.quantizer(n).enabled for n in weights)
    path = sim.export(tmp_path, "inplace", x[:1])["onnx"]
    graph = onnx.load(path).graph
    assert any(n.op_type == "Identity" for n in graph.node)  # the equal gains are one initializer
    assert_onnx_runs_simulation(sim, path, {"input": x})
    r = compare(sim, path, x, mode="lockstep", optimize=False)
    assert all(t.qdq_exact for t in r.tensors), r.summary()


# ---- a broken export ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["block.3.output", "head.0.weight"])
def test_a_wrong_scale_is_found_at_its_tensor(exported, tmp_path, name):
    sim, path = exported
    broken = _edited(path, tmp_path / "broken.onnx", _scale_quantize_linear(sim, name, 1.7))
    x = tiny_data(16, seed=5)
    r = compare(sim, broken, x, mode="lockstep")
    assert r.first_difference is not None and r.first_difference.name == name, r.summary()
    assert [t.name for t in r.tensors if not t.encoding_matches] == [name]
    assert [t.name for t in r.differing] == [name]  # lockstep: the tensors after it start from the target's
    assert r.first_difference.qdq_exact is False
    assert f"First: {name}" in r.summary() and "scale or zero point" in r.summary()
    e2e = compare(sim, broken, x, mode="end_to_end")
    assert e2e.first_difference.name == name and len(e2e.differing) >= 1
    assert e2e.to_json()["first_difference"] == name


def test_a_dropped_qdq_pair_is_named(exported, tmp_path):
    sim, path = exported
    broken = _edited(path, tmp_path / "dropped.onnx", _drop_pair(sim, "block.2.output"))
    with pytest.raises(ExportMismatchError, match=r"no QuantizeLinear/DequantizeLinear pair for 1 of 13 enabled "
                                                  r"quantizers: block.2.output\b"):
        compare(sim, broken, tiny_data(4))


def test_the_export_of_another_simulation_is_refused(exported, tmp_path):
    sim, path = exported
    other = _sim()
    other.enable("add.output", False)
    other_path = other.export(tmp_path, "other", tiny_data()[:1])["onnx"]
    with pytest.raises(ExportMismatchError, match=r"no QuantizeLinear/DequantizeLinear pair .*: add.output"):
        compare(sim, other_path, tiny_data(4))
    # the other way round: the graph quantizes a tensor that simulation leaves in float
    with pytest.raises(ExportMismatchError, match=r"quantizer add.output, disabled in the simulation"):
        compare(other, path, tiny_data(4))

    class Stem(nn.Module):  # the same quantizer names and count, tensors of other shapes
        def __init__(self, channels: int):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())

        def forward(self, x):
            return self.stem(x)

    x = torch.randn(4, 3, 6, 6)
    wide, narrow = QuantSim(Stem(8), x[:1]), QuantSim(Stem(4), x[:1])
    for s in (wide, narrow):
        s.compute_encodings(lambda m: m(x))
    path = narrow.export(tmp_path, "narrow", x[:1])["onnx"]
    for mode in ("end_to_end", "lockstep"):
        with pytest.raises(ExportMismatchError, match=r"quantizes a \[4, 3, 3, 3\] tensor, the simulation's "
                                                      r"stem.0.weight a \[8, 3, 3, 3\] one"):
            compare(wide, path, x, mode=mode)


def test_inputs_that_do_not_fit_are_named(exported):
    sim, path = exported
    x = tiny_data(4)
    cases = [((x, x), ValueError, r"takes 1 input\(s\) \(input: float32 \[batch, 3, 12, 12\]\), got 2"),
             (x.double(), ValueError, r"'input' must be float32, got float64"),
             (torch.randn(4, 3, 13, 12), ValueError,
              r"'input' must have shape \[batch, 3, 12, 12\], got \[4, 3, 13, 12\]"),
             ({"image": x}, ValueError, r"missing: input; not inputs of the model: image"),
             ((x.numpy(),), TypeError, r"'input' must be a tensor, got ndarray"),
             ("x", TypeError, r"inputs must be a tensor")]
    for inputs, kind, msg in cases:
        with pytest.raises(kind, match=msg):
            compare(sim, path, inputs)
    with pytest.raises(ValueError, match=r"mode must be one of \['end_to_end', 'lockstep'\]"):
        compare(sim, path, x, mode="both")


# ---- the command -------------------------------------------------------------------------------------
def test_cli_compare_exit_codes_table_and_files(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["compare", "spec_tiny:build", "-o", str(out), "--mode", "lockstep", "--samples", "6",
                     "--dump", str(tmp_path / "dump"), "--no-progress"]) == cli.EXIT_OK
    text = capsys.readouterr().out
    assert "no quantized tensor differs by more than one step" in text and "block.3.output" in text
    doc = json.loads((out / "compare.json").read_text())
    assert doc["first_difference"] is None and doc["mode"] == "lockstep" and doc["samples"] == 6
    assert (out / "build.onnx").is_file() and (tmp_path / "dump" / "tensors.npz").is_file()
    # the file just exported, with one scale broken: exit code 5 and the tensor named
    sim = _sim()
    broken = _edited(out / "build.onnx", tmp_path / "broken.onnx", _scale_quantize_linear(sim, "add.output", 0.5))
    rc = cli.main(["compare", "spec_tiny:build", "--onnx", broken, "-o", str(tmp_path / "o2"), "--no-progress"])
    assert rc == cli.EXIT_DIFFERS == 5
    text = capsys.readouterr().out
    assert "First: add.output (Add)" in text and "DIFFERENT" in text
    assert json.loads((tmp_path / "o2" / "compare.json").read_text())["first_difference"] == "add.output"
    # usage errors and a graph that is not this simulation's export
    assert cli.main(["compare", "spec_tiny:build", "--onnx", str(tmp_path / "nope.onnx")]) == cli.EXIT_USAGE
    assert "--onnx: no such file" in capsys.readouterr().err
    assert cli.main(["compare", "spec_tiny:build", "--mode", "both"]) == cli.EXIT_USAGE
    capsys.readouterr()
    dropped = _edited(out / "build.onnx", tmp_path / "dropped.onnx", _drop_pair(sim, "fc.output"))
    assert cli.main(["compare", "spec_tiny:build", "--onnx", dropped, "-o", str(tmp_path / "o3")]) == cli.EXIT_FAILURE
    assert "pair for 1 of 13 enabled quantizers: fc.output" in capsys.readouterr().err


def test_cli_help_documents_compare_and_its_exit_code(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "pyquant compare" in text and "5 compare found" in text
    assert cli.main(["compare", "--help"]) == 0
    text = capsys.readouterr().out
    for words in ("--onnx", "--mode", "lockstep", "--optimize", "--dump", "exit code 0"):
        assert words in text
