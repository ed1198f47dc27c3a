"""Post-training techniques on models torch.fx cannot trace (captured with torch.export, as QuantSim captures
them) and on keyword (dict) batches: batch-norm folding and cross-layer equalization change the same weights
as on an fx-traceable twin with identical weights and keep the model's function; a transformer's
Linear -> GELU -> Linear is named as skipped, not a failure; empirical bias correction and AdaRound on
tiny_llama with dict batches give what they give on a positional twin, AdaRound beats nearest rounding on
every layer and resumes from a checkpoint made with dict batches."""
from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn

import pyquant
from pyquant import QuantSim
from pyquant.techniques import adaround, correct_bias, equalize, fold_batchnorms

pytest.importorskip("transformers")
from helpers import assert_onnx_runs_simulation, counted  # noqa: E402
from zoo import PaddedBert, tiny_llama  # noqa: E402

ada_mod = importlib.import_module("pyquant.techniques.adaround")  # the module, not the function


class Twin(nn.Module):
    """Conv -> BN -> ReLU -> Conv, then pooled features -> BN -> Linear -> ReLU -> Linear: two pairs to
    equalize, one batch norm to fold backward and one forward."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1, self.c2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1)
        self.bn2, self.l1, self.l2 = nn.BatchNorm1d(6), nn.Linear(6, 10), nn.Linear(10, 4)

    def forward(self, x):
        y = self.c2(torch.relu(self.bn1(self.c1(x))))
        return self.l2(nn.functional.relu(self.l1(self.bn2(y.mean((2, 3))))))


class ShapeBranching(Twin):
    """The same layers behind Python control flow on the input's shape, which torch.fx cannot trace."""

    def forward(self, x):
        if x.shape[-1] < 3:
            raise ValueError("x: images of at least 3 x 3 pixels")
        return super().forward(x)


def _twins():
    g = torch.Generator().manual_seed(0)
    a = Twin()
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for bn in (a.bn1, a.bn2):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.copy_(torch.logspace(-2, 1, bn.num_features)[torch.randperm(bn.num_features, generator=g)])
    b = ShapeBranching()
    b.load_state_dict(a.state_dict())
    return a.eval(), b.eval()


X = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(1))


def test_untraceable_twin_needs_export():
    fx.symbolic_trace(Twin())
    with pytest.raises(Exception):
        fx.symbolic_trace(ShapeBranching())
    with pytest.raises(ValueError, match="dummy_input"):
        equalize(ShapeBranching().eval())


@pytest.mark.parametrize("dummy,absorb", [("tensor", False), ("dict", False), ("tensor", True)])
def test_equalize_through_export_scales_as_the_fx_twin_and_keeps_outputs(dummy, absorb):
    fx_model, ex_model = _twins()
    with torch.no_grad():
        ref = fx_model(X)
    rep_fx = equalize(fx_model, absorb_high_bias=absorb)
    rep_ex = equalize(ex_model, X[:2] if dummy == "tensor" else {"x": X[:2]}, absorb_high_bias=absorb)
    assert rep_fx.pairs == [("c1", "c2"), ("l1", "l2")]
    assert rep_ex.pairs == rep_fx.pairs and rep_ex.folded == rep_fx.folded
    assert rep_ex.folded.forward == rep_fx.folded.forward == [("bn2", "l1")]
    assert rep_ex.absorbed.keys() == rep_fx.absorbed.keys()
    fx_state, ex_state = fx_model.state_dict(), ex_model.state_dict()
    assert fx_state.keys() == ex_state.keys()
    for k in fx_state:
        assert torch.equal(fx_state[k], ex_state[k]), k
    # equalization really scaled: the first layer's channel ranges moved toward each other
    assert rep_ex.spread_after["c1"] < rep_ex.spread_before["c1"]
    if absorb:  # absorption is exact only above beta - 3 gamma: nothing more to check than the fx twin
        assert rep_ex.absorbed
        return
    with torch.no_grad():
        out = ex_model(X)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_fold_batchnorms_through_export_keeps_outputs():
    _, model = _twins()
    with torch.no_grad():
        ref = model(X)
    pairs = fold_batchnorms(model, X[:2])
    assert list(pairs) == [("c1", "bn1")] and pairs.forward == [("bn2", "l1")]
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn2, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref, rtol=1e-4, atol=1e-4)


def test_equalize_on_a_transformer_names_the_gelu_pairs_as_skipped():
    torch.manual_seed(0)
    model = PaddedBert().eval()
    ids = torch.randint(0, 100, (2, 8))
    dummy = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(pyquant.NothingToDoWarning, match="unchanged"):
        rep = equalize(model, dummy)
    assert rep.pairs == [] and rep.folded == []
    assert rep.skipped, "the feed-forward Linear -> GELU -> Linear pairs are named"
    assert all("GELU" in why and "positively homogeneous" in why for why in rep.skipped.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- empirical bias correction and AdaRound on dict batches ---------------------------------------------------
class Positional(nn.Module):
    """tiny_llama called with its token ids by position: the same computation from positional batches."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids):
        return self.m(input_ids=input_ids).logits


IDS = [torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _llama_twins():
    torch.manual_seed(0)
    model = tiny_llama()
    return model, Positional(copy.deepcopy(model))


def _calibrated(model, dummy, batches):
    sim = QuantSim(model, dummy, param_bw=4)
    sim.compute_encodings(batches)
    return sim


def _layer_mean_shifts(sim, fp32, batches):
    """Independent of correct_bias: per corrected layer, max over channels of |mean simulated output - mean
    FP32 output|, the simulated outputs read from the simulation's graph, the FP32 ones from module hooks."""
    fp_out, sim_out = {}, {}
    hooks = [fp32.get_submodule(n).register_forward_hook(
        lambda m, a, y, n=n: fp_out.setdefault(n, []).append(y.detach().reshape(-1, y.shape[-1])))
        for n in LLAMA_LAYERS]
    for b in batches:
        fp32(**b)
    for h in hooks:
        h.remove()
    gm = sim.model
    at = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default:
            w = n.args[1]
            path = next(iter(w.args)).target if w.op == "call_module" else w.target
            at[n.name] = path.rpartition(".")[0]

    class Watch(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.name in at:
                sim_out.setdefault(at[node.name], []).append(out.detach().reshape(-1, out.shape[-1]))
            return out
    with torch.no_grad():
        for b in batches:
            Watch(gm).run(b["input_ids"])
    return {n: float((torch.cat(sim_out[n]).double().mean(0) - torch.cat(fp_out[n]).double().mean(0)).abs().max())
            for n in LLAMA_LAYERS}


LLAMA_LAYERS = [f"model.layers.{i}.{p}" for i in range(2) for p in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]


def test_bias_correction_on_dict_batches_matches_the_positional_twin():
    model, twin = _llama_twins()
    batches = [{"input_ids": i} for i in IDS]
    sim = _calibrated(model, batches[0], batches)
    sim_twin = _calibrated(twin, IDS[0], [(i,) for i in IDS])
    before = _layer_mean_shifts(sim, model, batches)
    removed = correct_bias(sim, model, batches)
    removed_twin = correct_bias(sim_twin, twin, [(i,) for i in IDS])
    assert list(removed) == LLAMA_LAYERS  # every linear layer, in graph order, each given a bias
    assert list(removed_twin) == [f"m.{n}" for n in LLAMA_LAYERS]
    for n in LLAMA_LAYERS:
        assert torch.equal(sim.bias(n), sim_twin.bias(f"m.{n}")), n
        assert removed[n] == removed_twin[f"m.{n}"] > 0
    after = _layer_mean_shifts(sim, model, batches)
    for n in LLAMA_LAYERS:  # each layer's mean output now matches FP32's, measured independently
        assert after[n] < 1e-4 * max(before[n], 1e-3) + 1e-5, (n, before[n], after[n])
    with pytest.raises(ValueError, match="method='staged'"):
        correct_bias(sim, model, batches, method="sequential")


def test_biases_added_by_bias_correction_export_with_the_simulation(tmp_path):
    model, _ = _llama_twins()
    batches = [{"input_ids": i} for i in IDS]
    sim = _calibrated(model, batches[0], batches)
    correct_bias(sim, model, batches)
    sim.compute_encodings(batches)
    files = sim.export(tmp_path, "llama", batches[0])
    assert_onnx_runs_simulation(sim, files["onnx"], batches[1])


def _ada(model, dummy, data, tmp=None, **kw):
    args = dict(param_bw=4, iterations=60, lr=1e-2, batch_size=4, positions_per_sample=8, seed=5, progress=False)
    args.update(kw)
    return adaround(model, dummy, data, checkpoint_dir=tmp, **args)


def test_adaround_on_dict_batches_matches_the_positional_twin_and_beats_nearest():
    model, twin = _llama_twins()
    res = _ada(model, {"input_ids": IDS[0]}, [{"input_ids": i} for i in IDS])
    res_twin = _ada(twin, IDS[0], [(i,) for i in IDS])
    assert [r.name for r in res.report] == LLAMA_LAYERS
    assert [r.name for r in res_twin.report] == [f"m.{n}" for n in LLAMA_LAYERS]
    state, state_twin = res.model.state_dict(), res_twin.model.state_dict()
    for k, v in state.items():
        assert torch.equal(v, state_twin[f"m.{k}"]), k  # the same rounding decisions
    for r in res.report:
        assert r.mse_adaround < r.mse_nearest, r
        assert 0 < r.changed_vs_nearest < 0.5, r
    # the rounded weights sit on their grids: the frozen encodings leave them unchanged in a simulation
    sim = QuantSim(res.model, {"input_ids": IDS[0]}, param_bw=4)
    res.apply_to(sim)
    for name in res.encodings:
        q, w = sim.quantizer(name), sim.weight(name)
        assert torch.allclose(q(w), w, atol=1e-6), name


def test_adaround_resumes_a_dict_batch_run(tmp_path, monkeypatch):
    data = [{"input_ids": i} for i in IDS[:2]]
    dummy = {"input_ids": IDS[0]}
    full = _ada(tiny_llama_seeded(), dummy, data, iterations=20)
    counted(monkeypatch, ada_mod, "_optimize_layer", stop_at=4)
    with pytest.raises(KeyboardInterrupt):
        _ada(tiny_llama_seeded(), dummy, data, tmp_path, iterations=20)
    calls = counted(monkeypatch, ada_mod, "_optimize_layer")
    resumed = _ada(tiny_llama_seeded(), dummy, data, tmp_path, iterations=20)
    assert len(calls) == len(LLAMA_LAYERS) - 3  # only the unfinished layers ran
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def tiny_llama_seeded() -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama()


def test_adaround_through_export_rounds_as_the_fx_twin():
    fx_model, ex_model = _twins()
    data = torch.randn(8, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    res_fx = _ada(fx_model, data[:1], data, param_bw=3)
    res_ex = _ada(ex_model, {"x": data[:1]}, [{"x": data[i:i + 4]} for i in range(0, 8, 4)], param_bw=3)
    assert [r.name for r in res_ex.report] == [r.name for r in res_fx.report] == ["c1", "c2", "l1", "l2"]
    assert res_ex.folded == res_fx.folded == [("c1", "bn1")]
    for k, v in res_fx.model.state_dict().items():
        assert torch.equal(v, res_ex.model.state_dict()[k]), k
    for a, b in zip(res_fx.report, res_ex.report):  # the ReLU after c1 and l1 is found in both graphs
        assert a.mse_nearest == pytest.approx(b.mse_nearest, rel=1e-5)
