"""ONNX export forms (pyquant.sim.export): QDQ for every bit width and granularity the simulation has, at
the lowest opset that expresses it, run by onnxruntime as written and checked against the simulation
quantizer by quantizer; the plain FP32 graph with encodings keyed by its tensor names; argument checks
and atomic writes."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyquant.quant import QuantizeDequantize
from pyquant.sim.export import build_onnx, qdq_forms, run_onnx
from pyquant.sim.onnx_qdq import QdqFormError, qdq_form
from pyquant.sim.config import load_config
from pyquant.sim.quantsim import QuantSim

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper, version_converter  # noqa: E402


class Net(nn.Module):
    """Conv, conv, a residual add, pooling and two linear layers; channel counts divide into blocks of 2."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y) + y)
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc2(torch.relu(self.fc1(y)))


def _data(n=8, seed=0):
    return torch.randn(n, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


def _per_block(sim: QuantSim, block: int) -> None:
    """Every weight quantized per block of `block` input channels (QuantSim places per-channel or
    per-tensor weights; a target that wants blocks gets these quantizers in their place)."""
    for name, old in list(sim.param_quantizers.items()):
        w = sim.weight(name)
        shape = (w.shape[0], w.shape[1] // block) + (1,) * (w.dim() - 2)
        q = QuantizeDequantize(shape, old.bitwidth, old.symmetric, block_size=(1, block) + (-1,) * (w.dim() - 2),
                               name=name)
        sim.model.get_submodule(name.rsplit(".", 1)[0]).parametrizations.weight[0].q = q
        sim.param_quantizers[name] = q


def _sim(param_bw=8, output_bw=8, weights="per_channel", symmetric_acts=False, seed=0):
    torch.manual_seed(seed)
    x = _data(16, seed)
    config = "per_tensor" if weights == "per_tensor" else "default"
    if symmetric_acts:  # the profile with symmetric activations on the full signed grid
        config = load_config(config).to_dict()
        config["defaults"]["ops"]["is_symmetric"] = "True"
    sim = QuantSim(Net().eval(), x[:2], quant_scheme="min_max", param_bw=param_bw, output_bw=output_bw, config=config)
    if weights == "per_block":
        _per_block(sim, 2)
    sim.compute_encodings(lambda m: m(x))
    return sim, 3 * _data(16, seed + 1)  # beyond the calibrated ranges: the grids' ends clamp


def assert_qdq_is_the_simulation(sim: QuantSim, path, x: torch.Tensor, step_tol: float = 1e-3) -> None:
    """The QDQ graph, run as written by onnxruntime, computes `sim.model` pair by pair: every enabled
    quantizer is one QuantizeLinear ... DequantizeLinear pair (named after its scope; weights found by their
    initializer), the graph quantizes nothing else, each pair's output is the quantizer applied to the
    pair's input bit for bit, and each quantizer's input, computed by the simulation from the graph's
    upstream tensors, is within float noise of the graph's: `step_tol` steps, or 64 ulps of the tensor's
    largest value where that is more (a 16-bit step can be a few ulps; summation order only)."""
    model = onnx.load(str(path))
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer
             if t.data_type == onnx.TensorProto.FLOAT}
    pairs: dict[str, dict[str, str]] = {}
    for n in model.graph.node:
        scope = n.name.rsplit("/", 1)[0]
        if n.op_type == "QuantizeLinear":
            pairs.setdefault(scope, {})["in"] = n.input[0]
        elif n.op_type == "DequantizeLinear":
            pairs.setdefault(scope, {})["out"] = n.output[0]
    wanted = {p[k] for p in pairs.values() for k in p if p[k] not in inits} - {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in sorted(wanted))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    graph = dict(inits)
    graph.update(zip((o.name for o in sess.get_outputs()),
                     (torch.from_numpy(v) for v in sess.run(None, {"input": x.numpy()}))))
    targets = {id(m): t for t, m in sim.model.named_modules()}
    by_input = {p["in"]: scope for scope, p in pairs.items()}
    seen, hooks = [], []

    def check(name: str, scope: str):
        def hook(mod, args, out):
            g_in, g_out = graph[pairs[scope]["in"]], graph[pairs[scope]["out"]]
            assert g_in.shape == args[0].shape, f"{name}: the graph quantizes a {tuple(g_in.shape)} tensor"
            torch.testing.assert_close(mod.get_encoding().quantize_dequantize(g_in), g_out, rtol=0, atol=0,
                                       msg=lambda m: f"{name}: QDQ differs from the quantizer\n{m}")
            # float noise: a thousandth of the smallest step (blocks of a weight do not broadcast against
            # it), or on a 16-bit grid, whose step can be a few ulps, 64 ulps of the tensor's largest value
            step = mod.get_encoding().scale.min().item()
            noise = max(step_tol * step, 2.0**-17 * g_in.abs().max().item())
            err = (args[0] - g_in).abs().max().item()
            assert err <= noise, f"{name}: input {err / step:.3g} steps from the graph's"
            seen.append(scope)
            return g_out  # the next segment starts from the graph's tensors
        return hook

    for name, q in sim.quantizers.items():
        if not q.enabled:
            continue
        scope = by_input.get(name) if name in sim.param_quantizers else f"/{targets[id(q)]}"
        assert scope in pairs and len(pairs[scope]) == 2, f"{name}: no QDQ pair in the graph"
        hooks.append(q.register_forward_hook(check(name, scope)))
    try:
        with torch.no_grad():
            want = sim.model(x)
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == set(pairs), f"QDQ pairs of no quantizer: {sorted(set(pairs) - set(seen))}"
    torch.testing.assert_close(graph["output"], want, rtol=0, atol=0)


# setting: (param_bw, output_bw, weights, symmetric activations) -> (opset, weight storage, activation storage)
SETTINGS = {
    "W8A8 per-channel": ((8, 8, "per_channel", False), (13, "int8", "uint8")),
    "W8A8 per-tensor": ((8, 8, "per_tensor", False), (13, "int8", "uint8")),
    "W8A8 per-block": ((8, 8, "per_block", False), (21, "int8", "uint8")),
    "W4A8 per-channel": ((4, 8, "per_channel", False), (21, "int4", "uint8")),
    "W4A8 per-block": ((4, 8, "per_block", False), (21, "int4", "uint8")),
    "W8A16 per-channel": ((8, 16, "per_channel", False), (21, "int8", "uint16")),
    "W16A16 per-tensor": ((16, 16, "per_tensor", False), (21, "int16", "uint16")),
    "W16A16 per-block": ((16, 16, "per_block", False), (21, "int16", "uint16")),
    "W4A4 per-channel": ((4, 4, "per_channel", False), (21, "int4", "uint4")),
    "W8A8 symmetric activations": ((8, 8, "per_channel", True), (13, "int8", "int8")),
    "W4A16 symmetric activations": ((4, 16, "per_channel", True), (21, "int4", "int16")),
    "W4A4 symmetric activations": ((4, 4, "per_tensor", True), (21, "int4", "int4")),
    "W3A6 per-channel": ((3, 6, "per_channel", False), (13, "int8", "uint8")),
    "W6A12 per-tensor": ((6, 12, "per_tensor", False), (21, "int8", "uint16")),
    "W5A10 symmetric, per-block": ((5, 10, "per_block", True), (21, "int8", "int16")),
    "W2A3 per-block": ((2, 3, "per_block", False), (21, "int8", "uint8")),
    "W16A8 per-channel": ((16, 8, "per_channel", False), (21, "int16", "uint8")),
    "W12A8 per-channel": ((12, 8, "per_channel", False), (21, "int16", "uint8")),
    "W12A4 per-block": ((12, 4, "per_block", False), (21, "int16", "uint4")),
}

_ONNX_TYPES = {onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "uint4", onnx.TensorProto.INT8: "int8",
               onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT16: "int16", onnx.TensorProto.UINT16: "uint16"}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_qdq_export_runs_the_simulation(setting, tmp_path):
    (param_bw, output_bw, weights, sym), (opset, w_type, a_type) = SETTINGS[setting]
    sim, x = _sim(param_bw, output_bw, weights, sym)
    paths = sim.export(tmp_path, "net", x[:2])
    assert paths.opset == opset and paths.onnx_format == "qdq"
    model = onnx.load(str(paths["onnx"]))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert not any(o.domain == "pyquant" for o in model.opset_import)
    inits = {t.name: t for t in model.graph.initializer}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == len([q for q in sim.quantizers.values() if q.enabled])
    storage = {n.input[0] in inits: _ONNX_TYPES[inits[n.input[2]].data_type] for n in qs}
    assert storage == {True: w_type, False: a_type}
    blocks = {a.i for n in qs for a in n.attribute if a.name == "block_size"}
    assert blocks == ({2} if weights == "per_block" else set())
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    narrow = (param_bw not in (4, 8, 16)) * len(sim.param_quantizers) + (output_bw not in (4, 8, 16)) * len(
        sim.activation_quantizers)
    assert len(clips) == narrow
    assert_qdq_is_the_simulation(sim, paths["onnx"], x)
    with torch.no_grad():
        want = sim.model(x)
    # end to end, a value an ulp from a rounding boundary may take the other code (1 in 160 outputs at
    # 16 bits here): within a few steps of the output quantizer, exact at 8 bits and below
    step = sim.quantizer("fc2.output").get_encoding().scale.item()
    torch.testing.assert_close(run_onnx(paths["onnx"], x, optimize=False)[0], want, rtol=0,
                               atol=4 * step if output_bw > 8 else 0)


def _int32_biases(model, encodings: dict) -> None:
    """A float Conv/Gemm bias onto the int32 grid at s_x * s_w, in place, where the layer's input and weight
    are named in the encodings (input per tensor, weight per tensor or per output channel): what an integer
    target derives (onnxruntime's WeightBiasQuantization: Div, Round half to even, times the scale)."""
    import numpy as np
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        ex, ew = encodings.get(n.input[0]), encodings.get(n.input[1])
        if ex is None or ew is None or ex.scale.numel() != 1 or ew.block_size is not None:
            continue
        s = (ex.scale.reshape(()) * ew.scale.reshape(-1)).numpy().astype(np.float32)
        b = numpy_helper.to_array(inits[n.input[2]])
        q = np.clip(np.round(b / s), -(2.0**31), 2.0**31 - 1).astype(np.float32)
        inits[n.input[2]].CopyFrom(numpy_helper.from_array((q * s).astype(np.float32), n.input[2]))


def _fake_quantize_named_tensors(model, encodings: dict) -> None:
    """What a target does with a plain graph and its encodings: fake-quantizes each tensor the file names
    (a weight in its initializer's shape, an activation per tensor), in place, with the same QDQ writer,
    and adds the biases of layers whose input and weight it quantizes on the int32 grid (_int32_biases)."""
    from pyquant.sim.onnx_qdq import onnx_scale_zero_point, qdq_form, write_qdq
    _int32_biases(model, encodings)
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    forms = {}
    for name, enc in encodings.items():
        x_shape = dims.get(name)
        scale, offset = enc.scale.numpy(), enc.offset.numpy()
        if x_shape is not None:  # right-aligned against the weight
            scale = scale.reshape((1,) * (len(x_shape) - scale.ndim) + scale.shape)
            offset = offset.reshape(scale.shape)
        forms[name] = (qdq_form(enc.bitwidth, enc.symmetric, scale.shape, x_shape), scale, offset, x_shape)
    opset = max(f[0].opset for f in forms.values())
    if opset > model.opset_import[0].version:
        model.CopyFrom(version_converter.convert_version(model, opset))
        model.ir_version = max(model.ir_version, 10)
    g = model.graph
    outputs = {o.name for o in g.output}
    nodes = list(g.node)
    for i, (name, (form, scale, offset, x_shape)) in enumerate(forms.items()):
        s, zp = onnx_scale_zero_point(form, scale, -offset, x_shape)
        src, dst = name, f"fq{i}"
        if name in outputs:  # the graph output keeps its name: its producer writes a new tensor
            src, dst = f"fq{i}_in", name
            for n in nodes:
                n.output[:] = [src if o == name else o for o in n.output]
        else:
            for n in nodes:
                n.input[:] = [dst if v == name else v for v in n.input]
        qdq, inits = write_qdq(form, src, dst, s, zp, f"/fq{i}")
        nodes += qdq
        g.initializer.extend(inits)
    del g.node[:]
    g.node.extend(nodes)
    model.CopyFrom(_topological(model))


def _topological(model):
    """The model with its nodes in an order where every input is produced before it is read."""
    g = model.graph
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    todo, order = list(g.node), []
    while todo:
        rest = [n for n in todo if not all(v in ready for v in n.input)]
        for n in todo:
            if n not in rest:
                order.append(n)
                ready.update(n.output)
        assert len(rest) < len(todo), "a cycle"
        todo = rest
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(order)
    return out


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
@pytest.mark.parametrize("setting", ["W8A8 per-channel", "W4A8 per-block", "W8A16 per-channel", "W3A6 per-channel"])
def test_plain_export_keys_the_encodings_by_the_graph_tensor_names(setting, version, tmp_path):
    """The plain form: no quantization node, every encoding named after a tensor of the graph (activations by
    the output that produces them, weights by their initializer, as AIMET writes them), and the graph with
    those tensors fake-quantized as the encodings say computes the simulation."""
    from pyquant.sim.encodings import load_encodings
    (param_bw, output_bw, weights, sym), _ = SETTINGS[setting]
    sim, x = _sim(param_bw, output_bw, weights, sym)
    paths = sim.export(tmp_path, "net", x[:2], onnx_format="plain", encoding_version=version)
    assert paths.opset == 13 and paths.onnx_format == "plain"  # the model's ops need no more
    model = onnx.load(str(paths["onnx"]))
    assert {n.op_type for n in model.graph.node}.isdisjoint({"QuantizeLinear", "DequantizeLinear", "Clip"})
    assert [o.domain for o in model.opset_import] == [""]
    inits = {t.name for t in model.graph.initializer}
    produced = {n.output[0] for n in model.graph.node} | {i.name for i in model.graph.input}
    shapes = {n: q.shape for n, q in sim.param_quantizers.items()}
    act, par = load_encodings(paths["encodings"], shapes=shapes, param_names=inits)
    assert set(par) == set(sim.param_quantizers) <= inits  # weights: initializer = parameter = quantizer name
    assert set(act) <= produced - inits and len(act) == len(sim.activation_quantizers)
    assert "input" in act and "output" in act  # graph input and output by their own names
    for name, enc in par.items():
        want = sim.quantizer(name).get_encoding()
        assert torch.equal(enc.scale.reshape(want.scale.shape), want.scale) and enc.bitwidth == param_bw
    sim_act = sorted((float(e.scale), float(e.offset)) for e in sim.encodings()[0].values())
    assert sorted((float(e.scale), float(e.offset)) for e in act.values()) == sim_act
    # FP32: the original model's function
    with torch.no_grad():
        for q in sim.quantizers.values():
            q.enabled = False
        fp32 = sim.model(x)
        for q in sim.quantizers.values():
            q.enabled = True
        want = sim.model(x)
    torch.testing.assert_close(run_onnx(paths["onnx"], x, optimize=False)[0], fp32, rtol=1e-5, atol=1e-5)
    # what a target builds from the two files is the simulation
    _fake_quantize_named_tensors(model, {**act, **par})
    onnx.save(model, str(tmp_path / "applied.onnx"))
    step = sim.quantizer("fc2.output").get_encoding().scale.item()
    torch.testing.assert_close(run_onnx(tmp_path / "applied.onnx", x, optimize=False)[0], want, rtol=0,
                               atol=4 * step if output_bw > 8 else 0)


def test_qdq_forms_hold_every_grid():
    """Storage type, opset and Clip of each bit width (pyquant/sim/onnx_qdq.py's table)."""
    for bw in range(2, 17):
        for signed in (True, False):
            f = qdq_form(bw, signed, (8, 1), (8, 16))
            bits = bw if bw in (4, 8, 16) else 8 if bw < 8 else 16
            assert (f.bits, f.signed, f.clipped, f.axis, f.block_size) == (bits, signed, bw != bits, 0, None)
            assert f.opset == (13 if bits == 8 else 21)
            assert qdq_form(bw, signed, (8, 4), (8, 16)).opset == 21  # blocks
    assert qdq_form(8, False, (1, 1, 1, 1), (None, 3, 8, 8)).granularity == "per_tensor"
    f = qdq_form(4, True, (8, 2, 1, 1), (8, 16, 3, 3))
    assert (f.axis, f.block_size, f.dtype) == (1, 8, "int4")
    f = qdq_form(4, True, (4, 2), (8, 16))  # blocks of 2 x 8: the rows are repeated out
    assert (f.axis, f.block_size) == (1, 8)
    with pytest.raises(QdqFormError, match="static shape"):
        qdq_form(8, False, (1, 4, 1, 1), (None, 16, 8, 8))


def test_opset_is_the_lowest_that_expresses_the_model(tmp_path, capfd):
    """An op of the model that needs a higher opset raises it (torch.triu: Trilu, opset 14), quietly; an
    explicit opset is kept; one below what a quantizer or an op needs is an error naming it."""
    class Masked(Net):
        def forward(self, x):
            return torch.triu(super().forward(x))

    x = _data(4)
    sim = QuantSim(Masked().eval(), x[:2])
    sim.compute_encodings(lambda m: m(x))
    capfd.readouterr()
    assert build_onnx(sim, x[:2]).opset == 14
    assert capfd.readouterr().out == ""  # no exporter graph dump while trying opsets
    with pytest.raises(ValueError, match=r"opset_version=13 cannot express the model.*triu.*opset_version >= 14"):
        sim.export(tmp_path, "m", x[:2], opset_version=13)
    sim.set_bitwidth("c1.weight", 4)
    sim.compute_encodings(lambda m: m(x))
    assert build_onnx(sim, x[:2]).opset == 21  # int4 weights
    assert build_onnx(sim, x[:2], onnx_format="plain").opset == 14  # no QuantizeLinear to hold
    with pytest.raises(ValueError, match=r"opset_version=14 cannot express quantizer 'c1.weight'.*int4.*21"):
        sim.export(tmp_path, "m", x[:2], opset_version=14)
    with pytest.raises(ValueError, match=r"opset_version=13 cannot express the model.*triu.*opset_version >= 14"):
        sim.export(tmp_path, "m", x[:2], opset_version=13, onnx_format="plain")
    assert list(tmp_path.iterdir()) == []
    sim8 = QuantSim(Net().eval(), x[:2])
    sim8.compute_encodings(lambda m: m(x))
    for opset in (13, 17, 21):
        paths = sim8.export(tmp_path, f"o{opset}", x[:2], opset_version=opset)
        assert paths.opset == opset == onnx.load(str(paths["onnx"])).opset_import[0].version
        with torch.no_grad():
            torch.testing.assert_close(run_onnx(paths["onnx"], x, optimize=False)[0], sim8.model(x), rtol=0, atol=0)


def test_export_arguments_are_checked_first(tmp_path):
    sim, x = _sim()
    for kwargs, match in [({"onnx_format": "qdq8"}, r"onnx_format must be one of 'qdq', 'plain', got 'qdq8'"),
                          ({"opset_version": 12}, r"opset_version must be None .* integer in 13..21, got 12"),
                          ({"opset_version": 22}, r"opset_version .* 13..21, got 22"),
                          ({"opset_version": "13"}, r"opset_version .* got '13'"),
                          ({"opset_version": True}, r"opset_version .* got True"),
                          ({"encoding_version": "3.0.0"}, r"encoding_version must be one of 0.6.1, 1.0.0, 2.0.0"),
                          ({"filename_prefix": ""}, r"filename_prefix must be a non-empty file name"),
                          ({"filename_prefix": "a/b"}, r"filename_prefix must be a non-empty file name")]:
        kw = {"filename_prefix": "net", **kwargs}
        with pytest.raises(ValueError, match=match):
            sim.export(tmp_path / "out", dummy_input=x[:2], **kw)
    assert not (tmp_path / "out").exists()


def test_per_block_activation_has_no_qdq_form_but_a_plain_one(tmp_path):
    """Blocked QuantizeLinear needs the input's static shape, which an activation with a free batch size
    has not: an error naming the quantizer; the encodings file holds it."""
    sim, x = _sim()
    name = "input.x"  # the model input, 4 channels: blocks of 2 channels
    old = sim.activation_quantizers[name]
    q = QuantizeDequantize((1, 2, 1, 1), 8, False, block_size=(-1, 2, -1, -1), name=name)
    target = next(t for t, m in sim.model.named_children() if m is old)
    setattr(sim.model, target, q)
    sim.activation_quantizers[name] = q
    sim.compute_encodings(lambda m: m(x))
    assert q.get_encoding().granularity == "per_block"
    with pytest.raises(QdqFormError, match=r"'input.x': a per-block activation encoding .*onnx_format='plain'"):
        qdq_forms(sim)
    with pytest.raises(QdqFormError, match="input.x"):
        sim.export(tmp_path, "net", x[:2])
    paths = sim.export(tmp_path, "net", x[:2], onnx_format="plain")
    entries = json.loads(paths["encodings"].read_text())["activation_encodings"]
    entry = [e for e in entries if e["enc_type"] == "PER_BLOCK"]
    assert len(entry) == 1 and entry[0]["block_size"] == 2


@pytest.mark.parametrize("keyword", [False, True])
def test_export_leaves_every_module_in_its_mode(tmp_path, keyword):
    """Export traces in eval mode and then restores each module's own mode, also for keyword inputs (whose
    adapter module is always in training mode) and for a model with modules in both modes."""
    sim, x = _sim()
    sim.model.train()
    eval_part = next(m for m in sim.model.modules() if m is not sim.model)
    eval_part.eval()
    before = [m.training for m in sim.model.modules()]
    assert any(before) and not all(before)
    sim.export(tmp_path, "net", {"x": x[:2]} if keyword else x[:2])
    assert [m.training for m in sim.model.modules()] == before
    sim.model.eval()
    sim.export(tmp_path, "net", {"x": x[:2]} if keyword else x[:2])
    assert not any(m.training for m in sim.model.modules())


def test_failed_export_leaves_every_file_as_it_was(tmp_path, monkeypatch):
    """Everything is built and checked before the first file is replaced."""
    sim, x = _sim()
    paths = sim.export(tmp_path, "net", x[:2])
    before = {k: p.read_bytes() for k, p in paths.items()}
    import pyquant.sim.encodings as E

    def bad_json(*a, **k):
        raise E.EncodingsError("cannot write")

    monkeypatch.setattr(E, "encodings_to_json", bad_json)
    with pytest.raises(E.EncodingsError):
        sim.export(tmp_path, "net", x[:2], onnx_format="plain")
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


def test_minilm_w4a8_and_w8a16_export():
    """A transformer at the two common target settings: the QDQ graph (opset 21: int4 weights, uint16
    activations) computes the simulation quantizer by quantizer; the plain graph names every encoding."""
    from pyquant._assets import AssetMissingError
    try:
        from pyquant.models.minilm import minilm
        tok, model = minilm()
    except (AssetMissingError, ImportError) as exc:
        pytest.skip(str(exc))
    import tempfile

    from helpers import assert_onnx_runs_simulation
    from pyquant.sim.encodings import load_encodings
    batch = tok(["The quick brown fox jumps over the lazy dog.", "Quantization maps reals to integers."],
                padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    sim = QuantSim(model, inputs, quant_scheme="tf_enhanced", param_bw=4)
    sim.compute_encodings(lambda m: m(**inputs))
    with tempfile.TemporaryDirectory() as d:
        paths = sim.export(d, "w4a8", inputs)
        assert paths.opset == 21
        kinds = {inits.data_type for inits in onnx.load(paths["onnx"]).graph.initializer}
        assert onnx.TensorProto.INT4 in kinds and onnx.TensorProto.UINT8 in kinds
        assert_onnx_runs_simulation(sim, paths["onnx"], inputs)
        for name in sim.quantizers:
            sim.set_bitwidth(name, 8 if name in sim.param_quantizers else 16)
        sim.compute_encodings(lambda m: m(**inputs))
        paths = sim.export(d, "w8a16", inputs)
        assert paths.opset == 21
        # a 16-bit step is 256 times finer: LayerNorm's float noise is a few thousandths of one
        assert_onnx_runs_simulation(sim, paths["onnx"], inputs, step_tol=0.05)
        paths = sim.export(d, "plain", inputs, onnx_format="plain", encoding_version="2.0.0")
        assert paths.opset == 14  # scaled_dot_product_attention
        g = onnx.load(paths["onnx"]).graph
        inits = {t.name for t in g.initializer}
        act, par = load_encodings(paths["encodings"], param_names=inits)
        assert set(par) == set(sim.param_quantizers)  # the weights' names, as in the model's state dict
        assert set(act) <= {o for n in g.node for o in n.output} | {i.name for i in g.input}
        assert len(act) == len(sim.activation_quantizers)
        assert run_onnx(paths["onnx"], inputs["input_ids"], inputs["attention_mask"], optimize=False)
