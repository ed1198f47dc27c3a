"""pyquant.analysis on a tiny CNN: values checked against direct computations, the staged sensitivity
sweep against plain evaluations, and the ranking against a layer made worse on purpose."""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch

import pyquant
import pyquant.analysis.sensitivity as sens_mod
from pyquant.analysis import (activation_histograms, analyze, cle_weight_ranges, layer_sensitivity, layer_sqnr,
                              layers, load_json, save_json, weight_ranges)
from pyquant._batches import reusable
from pyquant.sim.quantsim import QuantSim
from pyquant.techniques import fold_batchnorms
from spec_tiny import tiny_data, tiny_model
from helpers import one_thread  # noqa: F401  (fixture)


pytestmark = pytest.mark.usefixtures("one_thread")


def _sim(bw_act: int = 8):
    m = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyquant.NothingToDoWarning)
        fold_batchnorms(m)
    data = tiny_data()
    sim = QuantSim(m, data[:1], output_bw=bw_act)
    sim.compute_encodings(lambda mm: mm(data))
    return sim, data


def test_weight_ranges_match_the_weights():
    m = tiny_model()
    r = weight_ranges(m)
    assert list(r) == ["stem.0", "block.0", "block.3", "head.0", "fc"]
    w = m.stem[0].weight.detach().reshape(8, -1)
    assert r["stem.0"]["channels"] == 8
    assert r["stem.0"]["min"] == pytest.approx(w.amin(1).tolist(), rel=1e-4)
    assert r["stem.0"]["max"] == pytest.approx(w.amax(1).tolist(), rel=1e-4)
    assert r["stem.0"]["mean"] == pytest.approx(w.mean(1).tolist(), rel=1e-3, abs=1e-6)
    absmax = w.abs().amax(1)
    assert r["stem.0"]["spread"] == pytest.approx(float(absmax.max() / absmax.min()), rel=1e-4)


def test_cle_shrinks_the_spread_and_leaves_the_model_alone():
    m = tiny_model()
    before_state = copy.deepcopy(m.state_dict())
    r = cle_weight_ranges(m, tiny_data()[:1])
    s = r["summary"]
    assert s["pairs_equalized"] >= 1 and r["pairs"]
    a = r["pairs"][0][0]
    assert r["after"][a]["spread"] < 0.5 * r["before"][a]["spread"]
    assert s["median_spread_after_equalized_layers"] < s["median_spread_before_equalized_layers"]
    for k, v in m.state_dict().items():
        assert torch.equal(v, before_state[k]), k


def test_layers_group_weights_with_their_outputs():
    sim, _ = _sim()
    by_name = {l.name: l.quantizers for l in layers(sim)}
    assert by_name["stem.0"] == ["stem.0.weight", "stem.2.output"]  # Conv (BN folded) -> ReLU -> quantizer
    assert by_name["block.3"] == ["block.3.weight", "block.3.output"]
    assert by_name["add"] == ["add.output"]
    order = [l.first_node for l in layers(sim)]
    assert order == sorted(order)
    assert sorted(q for qs in by_name.values() for q in qs) == sorted(sim.quantizers)


def test_layer_sqnr_falls_with_fewer_bits_and_restores_flags():
    sim8, data = _sim(8)
    sim4, _ = _sim(4)
    sim8.enable("fc.weight", False)
    r8 = layer_sqnr(sim8, data)
    r4 = layer_sqnr(sim4, data)
    assert sim8.quantizers["fc.weight"].enabled is False and sim8.quantizers["fc.output"].enabled is True
    p8 = {p["name"]: p for p in r8["points"]}
    p4 = {p["name"]: p for p in r4["points"]}
    assert r8["samples"] == len(data)
    assert p8["input.x"]["weights_only_db"] is None  # no weight before the input: no error at all
    for n in p8:
        assert 10 < p8[n]["activations_only_db"] < 80
        assert p4[n]["activations_only_db"] < p8[n]["activations_only_db"] - 12  # ~6 dB per bit
    # independent check of one point: the head's output with activations simulated
    ref, out = {}, {}
    q = sim8.activation_quantizers["head.1.output"]
    h = q.register_forward_hook(lambda m, i, o: out.__setitem__("y", o))
    with torch.no_grad():
        for name, qq in sim8.quantizers.items():
            qq.enabled = name not in sim8.param_quantizers
        sim8.model(data)
        y = out["y"]
        for qq in sim8.quantizers.values():
            qq.enabled = False
        sim8.model(data)
        r = out["y"]
    h.remove()
    expect = 10 * math.log10(float(r.double().square().sum() / (r.double() - y.double()).square().sum()))
    assert p8["head.1.output"]["activations_only_db"] == pytest.approx(expect, abs=0.02)


@pytest.mark.parametrize("inplace", [False, True])
def test_sensitivity_staged_equals_plain_evaluation(monkeypatch, inplace):
    sim, data = _sim()
    if inplace:  # in-place modules: the same values, and their flags back afterwards
        for m in sim.model.modules():
            if isinstance(m, torch.nn.ReLU):
                m.inplace = True
    staged = layer_sensitivity(sim, data, "sqnr", batch_size=10)
    assert staged["staged"] is True
    monkeypatch.setattr(sens_mod, "inplace_free", lambda gm: False)
    plain = layer_sensitivity(sim, data, "sqnr", batch_size=10)
    assert plain["staged"] is False
    for a, b in zip(staged["layers"], plain["layers"]):
        assert a["layer"] == b["layer"]
        assert a["enabled_alone"] == pytest.approx(b["enabled_alone"], rel=1e-9)
        assert a["disabled_alone"] == pytest.approx(b["disabled_alone"], rel=1e-9)
    assert staged["ranking"] == plain["ranking"]
    assert staged["evaluations"] == 2 + 2 * len(staged["layers"])
    assert all(m.inplace == inplace for m in sim.model.modules() if isinstance(m, torch.nn.ReLU))


def test_sensitivity_ranks_a_coarse_layer_first_and_reuses_encodings(monkeypatch, capsys):
    sim, data = _sim()
    sim.set_bitwidth("block.3.weight", 3)
    w = sim.weight("block.3.weight")
    with sim.quantizers["block.3.weight"].compute_encodings():
        sim.quantizers["block.3.weight"](w)
    encs = {n: q.get_encoding() for n, q in sim.quantizers.items()}
    flags = {n: q.enabled for n, q in sim.quantizers.items()}

    def no_recalibration(*a, **k):
        raise AssertionError("the sweep must not recompute encodings")
    monkeypatch.setattr(QuantSim, "compute_encodings", no_recalibration)
    for q in sim.quantizers.values():
        monkeypatch.setattr(q.encoding_analyzer, "update_stats", no_recalibration)
    r = layer_sensitivity(sim, data, "sqnr", progress=True)
    assert r["ranking"][0] == "block.3"
    row = next(x for x in r["layers"] if x["layer"] == "block.3")
    assert row["rank"] == 1
    # left in FP32, the coarse layer recovers the most
    assert row["disabled_alone"] == max(x["disabled_alone"] for x in r["layers"])
    assert row["disabled_alone"] > r["quantized"]
    assert r["fp32"] is None  # infinite SQNR of FP32 against itself
    assert "sensitivity" in capsys.readouterr().err
    for n, q in sim.quantizers.items():
        assert q.enabled == flags[n]
        assert torch.equal(q.get_encoding().scale, encs[n].scale)


def test_sensitivity_callable_metric_and_errors():
    sim, data = _sim()
    ref = sim.model(data)  # enabled: only to get the shape
    calls = []

    def neg_mse(model):
        calls.append(1)
        with torch.no_grad():
            return -float((model(data) - ref).square().mean())
    r = layer_sensitivity(sim, data, neg_mse, modes=["enabled_alone"])
    assert r["metric"] == "neg_mse" and r["staged"] is False
    assert len(calls) == 2 + len(r["layers"])
    assert all(x["disabled_alone"] is None for x in r["layers"])
    with pytest.raises(ValueError, match="metric must be one of"):
        layer_sensitivity(sim, data, "accuracy")
    with pytest.raises(ValueError, match="modes must be"):
        layer_sensitivity(sim, data, modes=["sideways"])
    with pytest.raises(ValueError, match="lower-is-better"):
        layer_sensitivity(sim, data, "kl", higher_is_better=True)
    fresh = QuantSim(tiny_model(), data[:1])
    with pytest.raises(RuntimeError, match="compute_encodings"):
        layer_sensitivity(fresh, data)


def test_histograms_match_the_activations():
    sim, data = _sim()
    h = activation_histograms(sim, data, bins=64)
    assert set(h) == set(sim.activation_quantizers)
    got = {}
    q = sim.activation_quantizers["block.2.output"]
    hook = q.register_forward_hook(lambda m, i, o: got.__setitem__("x", i[0]))
    with torch.no_grad():
        for qq in sim.quantizers.values():
            qq.enabled = False
        sim.model(data)
        for qq in sim.quantizers.values():
            qq.enabled = True
    hook.remove()
    x = got["x"]
    e = q.get_encoding()
    d = h["block.2.output"]
    assert d["data_min"] == pytest.approx(float(x.min()), rel=1e-5, abs=1e-7)
    assert d["data_max"] == pytest.approx(float(x.max()), rel=1e-5)
    assert d["encoding_max"] == pytest.approx(float(e.max), rel=1e-5)
    clipped = float(((x < float(e.min)) | (x > float(e.max))).float().mean())
    assert d["clipped_fraction"] == pytest.approx(clipped, rel=1e-4, abs=1e-9)
    assert len(d["edges"]) == 65 and len(d["counts"]) == 64 and sum(d["counts"]) == x.numel()
    with pytest.raises(ValueError, match="bins"):
        activation_histograms(sim, data, bins=1)


def test_analyze_is_json_and_leaves_the_model_alone(tmp_path):
    m = tiny_model()
    state = copy.deepcopy(m.state_dict())
    data = tiny_data()
    a = analyze(m, data[:1], (b for b in (data[:12], data[12:])), eval_samples=16)  # a generator is fine
    assert set(a) >= {"weight_ranges", "layer_sqnr", "histograms", "sensitivity", "simulation", "timings"}
    assert a["sensitivity"]["samples"] == 16
    assert a["simulation"]["bn_folded"] is True
    json.dumps(a, allow_nan=False)
    save_json(a, tmp_path / "a.json")
    assert load_json(tmp_path / "a.json") == json.loads(json.dumps(a))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="metric must be one of"):
        analyze(m, data[:1], data, "accuracy")
    with pytest.raises(ValueError, match="empty"):
        analyze(m, data[:1], [], cle=False)
    with pytest.raises(TypeError, match="data must be a tensor or an iterable of batches"):
        analyze(m, data[:1], 5, cle=False)


def test_reusable_reads_one_shot_iterators_only():
    data = tiny_data()
    batches = [data[:4], data[4:]]
    assert reusable(iter(batches)) == batches and reusable((b for b in batches)) == batches
    for d in (batches, data, (data[:4],)):
        assert reusable(d) is d
    assert reusable(5) == 5  # left for the caller's own type check


def test_histograms_of_fused_activations_are_the_activation_outputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU6(), torch.nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(4, 3, 8, 8) * 3
    hs = []
    for fuse in (False, True):
        sim = QuantSim(model, x[:1], fuse_activations=fuse)
        sim.compute_encodings(lambda m: m(x))
        assert bool(sim.fused_activations) == fuse
        hs.append(activation_histograms(sim, x, bins=32))
    assert hs[0] == hs[1] and hs[1]["1.output"]["data_min"] == 0.0
