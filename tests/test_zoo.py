"""QuantSim on a zoo of real architectures (tests/zoo.py; MiniLM and a transformers Llama decoder): at
W16A16 the simulation is FP32 to within 1e-2 (a misplaced quantizer -- on an RMSNorm's mean of squares, on
a sum holding an attention mask -- or a missing one shows here); at W8A8 it calibrates, exports, and the
exported QDQ graph computes the simulation in onnxruntime; and the quantizers sit where a target quantizes
(one per normalization, activation, softmax and attention output; none inside them, none on masks, rotary
tables or shapes)."""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from helpers import assert_onnx_runs_simulation, one_thread  # noqa: F401 (fixture)
from pyquant import QuantSim, UnquantizedOpWarning
from pyquant.metrics import sqnr_db
from pyquant.quant import from_range
from pyquant.sim import graph as G
from pyquant.techniques import fold_batchnorms

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass
class Case:
    """A zoo model: `build()` -> (FP32 model, calibration inputs, export inputs), each input a dict of
    keyword inputs; `opset` for the export; `w8a8_sqnr`: the least W8A8 output SQNR vs FP32 (dB) it must
    keep (random weights: a sanity floor a few dB under what it reaches, not a quality claim)."""

    name: str
    build: Callable[[], tuple[nn.Module, dict, dict]]
    w8a8_sqnr: float
    opset: int = 13


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _cnn(make: Callable[[], nn.Module], fold: bool = True) -> Callable[[], tuple[nn.Module, dict, dict]]:
    def build():
        torch.manual_seed(0)
        model = make()
        if fold:  # batch norms as the target runs them: folded into the convolutions
            zoo.calibrate_batchnorms(model, _images(32, 1))
            fold_batchnorms(model)
        return model.eval(), {"x": _images(8, 2)}, {"x": _images(2, 3)}
    return build


def _llama():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = zoo.tiny_llama()
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}, {"input_ids": ids[:2]}


def _bert():
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (8, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[::2, 7:] = 0  # every other sentence is padded
    return zoo.PaddedBert().eval(), {"input_ids": ids, "attention_mask": mask}, \
        {"input_ids": ids[:2], "attention_mask": mask[:2]}


def _minilm():
    from pyquant._assets import AssetMissingError
    try:
        from pyquant.models.minilm import minilm
        tok, model = minilm()
    except (AssetMissingError, ImportError) as exc:
        pytest.skip(str(exc))
    texts = ["The quick brown fox jumps over the lazy dog.", "Quantization maps reals to integers.",
             "A fast auburn fox.", "Short."]
    batch = tok(texts, padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return model, inputs, {k: v[:2] for k, v in inputs.items()}


CASES = [
    Case("resnet18", _cnn(zoo.resnet18), 20.0),
    Case("resnet50", _cnn(zoo.resnet50), 11.0),
    Case("mobilenet_v3", _cnn(zoo.MobileNetV3Small), 10.0),
    Case("efficientnet_b0", _cnn(zoo.EfficientNetB0), 6.0),
    Case("convnext", _cnn(zoo.ConvNeXtTiny, fold=False), 30.0),
    Case("vit", _cnn(zoo.ViT, fold=False), 9.0),
    # MiniLM's last hidden state loses most of its SQNR to 8-bit weights alone (8 dB: its 30522-row word
    # embedding table is quantized per tensor, as the profiles say for Gather); test_sim_quantsim checks
    # its sentence embeddings. Fused attention (SDPA) exports from opset 14.
    Case("minilm", _minilm, 2.0, opset=17),
    Case("llama", _llama, 24.0, opset=17),
    Case("bert_padded", _bert, 25.0),
    Case("norms", lambda: (zoo.NormZoo().eval(), {"x": torch.randn(8, 8, 32)}, {"x": torch.randn(2, 8, 32)}), 25.0,
         opset=17),
]
BY_NAME = {c.name: c for c in CASES}


def _out(y: Any) -> torch.Tensor:
    """The tensor a model returns (transformers' ModelOutput: its first field, logits or hidden states)."""
    if hasattr(y, "to_tuple"):
        y = y.to_tuple()
    return y[0] if isinstance(y, (tuple, list)) else y


@functools.lru_cache(maxsize=None)
def _model(name: str):
    return BY_NAME[name].build()


def _sim(name: str, bw: int, **kwargs) -> tuple[QuantSim, torch.Tensor, torch.Tensor]:
    """(calibrated simulation at W<bw>A<bw> or as kwargs say, its output, the FP32 output) on the
    calibration inputs."""
    model, calib, export = _model(name)
    kwargs = {"param_bw": bw, "output_bw": bw, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnquantizedOpWarning)  # every op of the zoo is one the simulation knows
        sim = QuantSim(model, export, **kwargs)
    sim.compute_encodings(lambda m: m(**calib))
    with torch.no_grad():
        return sim, _out(sim.model(**calib)), _out(model(**calib))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - FP32|| / ||FP32||."""
    return ((out - ref).norm() / ref.norm()).item()


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest deviation from FP32, relative to the largest FP32 output."""
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", list(BY_NAME))
def test_w16a16_is_fp32(name):
    sim, out, ref = _sim(name, 16)
    assert torch.isfinite(out).all()
    # MiniLM's worst element is 1.2% of its largest output off: its residual stream holds outliers of ~220
    # against typical values under 1, so one 16-bit per-tensor grid is coarse for the small ones
    assert rel_error(out, ref) < 1e-2, rel_error(out, ref)
    assert max_rel_error(out, ref) < (2e-2 if name == "minilm" else 1e-2), max_rel_error(out, ref)
    assert not sim.unquantized_ops, sim.unquantized_ops  # every op of the zoo is one the simulation knows


@functools.lru_cache(maxsize=None)
def _w8a8(name: str):
    return _sim(name, 8)


def export_args(model: nn.Module, inputs: dict) -> tuple[Any, dict]:
    """(what to pass to sim.export, the inputs by the exported graph's names and the simulated graph's
    placeholders). transformers models are exported with keyword inputs; the others positionally ("input",
    or "input_0", "input_1", ...): a simulation exported with keyword inputs is left in training mode
    afterwards (export.py restores the mode of its keyword wrapper, not the simulation's), which would turn
    on dropout in the lockstep run."""
    if "transformers" in type(model).__module__:
        return inputs, dict(inputs)
    args = tuple(inputs.values())
    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    return args, dict(zip(names, args))


@pytest.mark.parametrize("name", list(BY_NAME))
def test_w8a8_calibrates_exports_and_runs_in_onnxruntime(name):
    pytest.importorskip("onnxruntime")
    case = BY_NAME[name]
    sim, out, ref = _w8a8(name)
    assert torch.isfinite(out).all()
    assert sqnr_db(ref, out) > case.w8a8_sqnr, sqnr_db(ref, out)
    assert all(q.has_encoding for q in sim.quantizers.values() if q.enabled)
    model, _, export = _model(name)
    args, by_name = export_args(model, export)
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        paths = sim.export(d, name, args, opset_version=case.opset)
        # quantizer by quantizer in lockstep: each QDQ pair is its quantizer bit for bit, each quantizer's
        # input is the simulation's up to float summation order, the outputs are the simulation's
        flips = assert_onnx_runs_simulation(sim, paths["onnx"], by_name)
    assert flips  # the pairs were really stepped through


# ---- where the quantizers are ---------------------------------------------------------------------------------
def _ops(sim: QuantSim, op_type: str) -> list[str]:
    return [n for n, p in sim.placement.items() if p.op_type == op_type and not p.is_param]


def test_resnets_quantize_each_call_of_the_shared_relu_and_nothing_inside_add_relu():
    sim18, _, _ = _w8a8("resnet18")
    acts = set(sim18.activation_quantizers)
    assert {"layer1.0.relu.output", "layer1.0.relu.output_1", "relu.output"} <= acts
    assert not any(p.op_type == "Add" for p in sim18.placement.values())  # Add+Relu is one kernel
    sim50, _, _ = _w8a8("resnet50")
    assert {"layer3.5.relu.output", "layer3.5.relu.output_1", "layer3.5.relu.output_2"} <= set(sim50.activation_quantizers)


def test_mobilenet_and_efficientnet_activations_and_squeeze_excitation():
    sim, _, _ = _w8a8("mobilenet_v3")
    assert len(_ops(sim, "HardSwish")) >= 10 and len(_ops(sim, "HardSigmoid")) == 9  # one per SE block
    assert len(_ops(sim, "Mul")) == 9  # the SE's scale * x
    sim, _, _ = _w8a8("efficientnet_b0")
    acts = set(sim.activation_quantizers)
    # the block's one Swish module, called for the expansion, the depthwise conv and in the SE
    assert {"_blocks.1._swish.output", "_blocks.1._swish.output_1", "_blocks.1._swish.output_2"} <= acts
    assert {"_swish.output", "_swish.output_1"} <= acts
    sig = _ops(sim, "Sigmoid")
    assert len(sig) == 16 and all(sim.placement[n].constraint == (0.0, 1.0) for n in sig)


def test_convnext_block_quantizes_its_channels_last_layernorm_and_gelu_once():
    sim, _, _ = _w8a8("convnext")
    assert _ops(sim, "LayerNormalization") == ["stem_norm.output", "blocks.0.norm.output", "blocks.1.norm.output",
                                               "norm.output"]
    assert _ops(sim, "Gelu") == ["blocks.0.act.output", "blocks.1.act.output"]


def test_vit_multihead_attention_runs_unfused_and_exports_at_opset_13():
    onnx = pytest.importorskip("onnx")
    sim, _, _ = _w8a8("vit")
    # captured as its ops: q, k, v projections, QK^T, Softmax, AV, out_proj; weights under the module's names
    w = sim.placement["layers.0.self_attention.in_proj_weight"]
    assert w.is_param and w.shape == (96, 1) and w.op_type == "Gemm"  # per channel over q, k and v
    assert "layers.0.self_attention.out_proj.weight" in sim.param_quantizers
    assert len(_ops(sim, "Softmax")) == 2 and len(_ops(sim, "MatMul")) == 4
    assert all(sim.placement[n].constraint == (0.0, 1.0) for n in _ops(sim, "Softmax"))
    _, _, export = _model("vit")
    with tempfile.TemporaryDirectory() as d:
        graph = onnx.load(str(sim.export(d, "vit", export["x"])["onnx"]))
    assert {n.domain for n in graph.graph.node} <= {""}  # standard ONNX ops only, opset 13
    assert "Softmax" in {n.op_type for n in graph.graph.node}


@pytest.mark.parametrize("batch_first", [False, True])
def test_unfused_multihead_attention_is_torchs(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    unfused = G.decompose_fused_modules(nn.Sequential(_copy(mha)))[0]
    assert isinstance(unfused, G.UnfusedMultiheadAttention)
    x = torch.randn(5, 3, 16)
    pad = torch.zeros(3 if not batch_first else 5, 3 if batch_first else 5, dtype=torch.bool)
    pad[..., -1] = True
    causal = torch.triu(torch.ones(3 if batch_first else 5, 3 if batch_first else 5, dtype=torch.bool), 1)
    with torch.no_grad():
        for kwargs in ({}, {"need_weights": False}, {"key_padding_mask": pad, "attn_mask": causal},
                       {"attn_mask": causal.float() * -1e4, "average_attn_weights": False}):
            want, want_w = mha(x, x, x, **kwargs)
            got, got_w = unfused(x, x, x, **kwargs)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            if want_w is not None:
                torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
        y = torch.randn(5, 7, 16) if batch_first else torch.randn(7, 3, 16)  # cross attention: k, v from y
        torch.testing.assert_close(unfused(x, y, y)[0], mha(x, y, y)[0], rtol=1e-5, atol=1e-6)


def _copy(m: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(m)


def test_llama_quantizes_rmsnorm_sdpa_once_and_leaves_masks_and_rotary_tables_alone():
    sim, _, _ = _w8a8("llama")
    layers = 2
    assert len(_ops(sim, "RMSNormalization")) == 2 * layers + 1  # two per layer and the final norm
    assert len(_ops(sim, "Attention")) == layers  # one per SDPA output
    ops = {p.op_type for p in sim.placement.values()}
    assert not ops & {"Pow", "ReduceMean", "Sqrt", "Reciprocal"}  # nothing inside an RMSNorm
    # no quantizer on anything that is not data: masks, positions, rotary cos/sin, shapes
    model, calib, export = _model("llama")
    gm = G.trace(_copy(model), export)
    G.propagate_shapes(gm, export)
    roles = {n.name: r for n, r in G.classify(gm).items()}
    assert all(roles[p.node].kind == "op" for p in sim.placement.values() if p.kind == "output")
    assert {r.kind for n, r in roles.items() if n.startswith(("cos", "sin"))} == {"constant"}
    assert all(roles[n].kind == "internal" for n in roles if n.startswith(("pow", "rsqrt", "mean")))


def test_llama_w8a16_and_w8a8_keep_perplexity():
    model, calib, _ = _model("llama")
    ids = calib["input_ids"]

    def ppl(logits):
        return torch.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())).item()

    _, ref_out, ref = _sim("llama", 8, output_bw=16)
    assert torch.isfinite(ref_out).all()
    assert abs(ppl(ref_out) / ppl(ref) - 1) < 0.01
    _, out, _ = _w8a8("llama")
    assert abs(ppl(out) / ppl(ref) - 1) < 0.02


def test_padded_attention_quantizes_the_scores_before_the_mask():
    sim, out, ref = _w8a8("bert_padded")
    nodes = {p.node: n for n, p in sim.placement.items()}
    assert "truediv" in nodes and "softmax" in nodes  # the scores, then the probabilities
    assert "add_1" not in nodes  # scores + mask: range ~1e38, never quantized
    for name, q in sim.activation_quantizers.items():
        enc = q.get_encoding()
        assert float(enc.max - enc.min) < 1e3, name
    sim16, out16, _ = _sim("bert_padded", 8, output_bw=16)
    assert torch.isfinite(out16).all() and rel_error(out16, ref) < 2e-2


def test_decoder_with_massive_activations_stays_finite():
    """A start token with activations of 200 in two dimensions (as real decoders have): the RMSNorm's mean of
    squares spans 1 to 1250, so a quantizer on it rounds ordinary tokens' variance to 0, the eps add's
    quantizer drops eps, and rsqrt(0) made the whole output NaN at W8A8."""
    model, calib, export = _model("llama")
    model = _copy(model)
    with torch.no_grad():  # ordinary tokens of unit scale, the start token with two massive dimensions
        model.model.embed_tokens.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
        model.model.embed_tokens.weight[0, :2] = torch.tensor([200.0, -200.0])
    ids = calib["input_ids"].clone()
    ids[:, 0] = 0
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for bw, tol in ((16, 1e-2), (8, None)):
        sim = QuantSim(model, {"input_ids": ids[:2]}, param_bw=bw, output_bw=bw)
        sim.compute_encodings(lambda m: m(input_ids=ids))
        with torch.no_grad():
            out = sim.model(input_ids=ids).logits
        assert torch.isfinite(out).all()
        assert tol is None or rel_error(out, ref) < tol


def test_every_rmsnorm_form_is_one_op_in_fx_and_export_graphs():
    sim, _, _ = _w8a8("norms")
    norms = _ops(sim, "RMSNormalization")
    assert len(norms) == 4 and _ops(sim, "GroupNormalization") and len(_ops(sim, "Attention")) == 1
    assert not {"Pow", "ReduceMean", "Sqrt", "Div"} & {p.op_type for p in sim.placement.values()}

    class ExportOnly(nn.Module):  # shape-dependent Python: fx cannot trace it, torch.export can
        def __init__(self):
            super().__init__()
            self.inner = zoo.NormZoo()

        def forward(self, x):
            return self.inner(x) if x.shape[-1] == 32 else x

    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    ex = QuantSim(ExportOnly().eval(), x[:2])
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in ex.model.graph.nodes)  # ATen: exported
    assert len(_ops(ex, "RMSNormalization")) == 4
    assert not {"Pow", "ReduceMean", "Sqrt", "Div"} & {p.op_type for p in ex.placement.values()}


def test_an_unknown_op_is_listed_unquantized_with_the_reason():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(torch.cumsum(self.fc(x), dim=-1))

    x = torch.randn(4, 8)
    with pytest.warns(UnquantizedOpWarning, match=r"1 op\(s\) .* unquantized: cumsum \(cumsum\).*summary"):
        sim = QuantSim(Odd().eval(), x)
    assert [u.node for u in sim.unquantized_ops] == ["cumsum"]
    assert not any(p.node == "cumsum" for p in sim.placement.values())
    sim.compute_encodings(lambda m: m(x))
    text = sim.summary(file=open(os.devnull, "w"))
    header = text.splitlines()[0].split()
    assert header == ["name", "op", "bw", "sym", "granularity", "enabled", "scale", "offset"]
    assert "unquantized" in text and "cumsum is not an op the simulation knows" in text


def test_default_weight_scheme_is_no_worse_than_absmax_rounding_on_the_decoder():
    from pyquant.quant import from_range
    model, _, export = _model("llama")
    for bw in (8, 4):
        sim = QuantSim(model, export, param_bw=bw)  # the defaults: tf_enhanced, per-channel weights
        for name, q in sim.param_quantizers.items():
            sim.calibrate_weight(name)
            w = sim.weight(name).detach()
            dims = tuple(d for d in range(w.dim()) if q.shape[d] == 1)
            amax = w.abs().amax(dim=dims, keepdim=True)
            rtn = from_range(-amax, amax, bw, True).quantize_dequantize(w)
            err, err_rtn = (q(w) - w).double().square().sum(), (rtn - w).double().square().sum()
            assert err <= err_rtn, (name, bw, float(err / err_rtn))


def test_a_keyword_captured_model_is_called_like_the_original():
    """A transformers model captured from keyword inputs takes them by position too, as the model does
    (`sim.model(ids)`, which pyquant.metrics.perplexity uses); mixing up the two is a clear error."""
    from pyquant.metrics import perplexity
    model, calib, export = _model("llama")
    sim = QuantSim(model, export)
    sim.compute_encodings(lambda m: m(**calib))
    ids = calib["input_ids"]
    with torch.no_grad():
        by_name = sim.model(input_ids=ids).logits
        torch.testing.assert_close(sim.model(ids).logits, by_name, rtol=0, atol=0)
        clone = _copy(sim.model)
        torch.testing.assert_close(clone(ids).logits, by_name, rtol=0, atol=0)
    assert perplexity(sim.model, ids, progress=False) > 1
    with pytest.raises(TypeError, match="input_ids both by position and by name"):
        sim.model(ids, input_ids=ids)
    with pytest.raises(TypeError, match="takes the inputs input_ids"):
        sim.model(ids, ids)


def test_a_tied_embedding_and_head_share_one_per_row_weight_quantizer():
    """Decoders tie the output head to the embedding table (Gemma does): one quantizer serves the lookup and
    the head, per output channel as the head's config says (the table's rows), not one grid over the whole
    vocabulary; the lookup reads the same rounded rows, and the export runs it in onnxruntime."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # rows of very different norms, as trained vocabularies have
        model.lm_head.weight.mul_(torch.logspace(-2, 0, 256).unsqueeze(1)[torch.randperm(256)])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    sim = QuantSim(model, {"input_ids": ids}, param_bw=8, output_bw=16)
    tied = [n for n in sim.param_quantizers if n.endswith(("lm_head.weight", "embed_tokens.weight"))]
    assert len(tied) == 1, tied
    q = sim.quantizer(tied[0])
    assert tuple(q.shape) == (256, 1) and sim.op_type(tied[0]) == "Gemm"
    sim.compute_encodings(lambda m: m(input_ids=ids))
    w = model.lm_head.weight.detach()
    per_row = q(w)
    per_tensor_err = (from_range(-w.abs().max(), w.abs().max(), 8, True).quantize_dequantize(w) - w).square().sum()
    assert (per_row - w).square().sum() < 0.1 * per_tensor_err
    # the lookup reads the quantized rows: what reaches the lookup's output quantizer is the rounded table's rows
    (lookup,) = [n for n in sim.activation_quantizers if sim.op_type(n) == "Gather"]
    seen = {}
    sim.quantizer(lookup).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        logits = sim.model(input_ids=ids).logits
    torch.testing.assert_close(seen["x"], per_row[ids], rtol=1e-3, atol=1e-6)
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        paths = sim.export(d, "tied", {"input_ids": ids}, opset_version=21)
        from pyquant.sim.export import run_onnx
        ort = run_onnx(paths["onnx"], {"input_ids": ids})[0]
    assert sqnr_db(logits, torch.as_tensor(ort)) > 40
