"""Automatic mixed precision (pyquant.mixed_precision): quantizer groups and supported_kernels, the target
met (checked by an independent evaluation) or missed with its distance, the cost model against a hand count,
staged sensitivity against whole evaluation, resuming after a kill, the Pareto front, applying and saving
the mix, and its input checks."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyquant
from pyquant.quant import clipped_encodings, least_error
from pyquant.sim.config import load_config
from pyquant.techniques import Candidate, parse_candidates, quantizer_groups
from pyquant.techniques.mixed_precision_cost import layer_costs

mp_module = importlib.import_module("pyquant.techniques.mixed_precision")


class SmallCnn(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.r1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.c2, self.r2 = nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x):
        x = self.r2(self.c2(self.r1(self.c1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _images(n=48, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _cnn_sim(config="default"):
    model = SmallCnn().eval()
    x = _images()
    sim = pyquant.QuantSim(model, x[:2], config=config)
    sim.compute_encodings(x, progress=False)
    return model, x, sim


def _cosine(model, sim, x) -> float:
    with torch.no_grad():
        return float(F.cosine_similarity(model(x).double(), sim.model(x).double(), dim=-1).mean())


# ---- candidates and groups --------------------------------------------------------------------------------

def test_candidates_parse_and_bad_ones_are_named():
    assert parse_candidates("w4a8, w8a16,w4a8") == [Candidate(4, 8), Candidate(8, 16)]
    assert parse_candidates([(4, None), "w8"]) == [Candidate(4), Candidate(8)]
    with pytest.raises(ValueError, match="'x4a8'"):
        parse_candidates("x4a8")
    with pytest.raises(ValueError, match="w1a8"):
        parse_candidates("w1a8")
    with pytest.raises(ValueError, match="weights-only"):
        parse_candidates("w4,w8a8")


def test_groups_join_a_layer_with_its_output_and_its_only_input():
    _, _, sim = _cnn_sim()
    groups, loose = quantizer_groups(sim, "w4a8,w8a8")
    by = {g.name: g for g in groups}
    assert set(by) == {"c1", "c2", "fc"}
    # c1's output comes after its ReLU (a supergroup); the model input is read by c1 only
    assert set(by["c1"].activations) == {"input.x", "r1.output"}
    assert set(by["c2"].activations) == {"r2.output"}
    # the pooled features reach fc alone, through flatten
    assert set(by["fc"].activations) == {"pool.output", "fc.output"}
    every = [q for g in groups for q in g.quantizers] + loose
    assert sorted(every) == sorted(n for n, q in sim.quantizers.items() if q.enabled)


def _config_with_kernels(conv_kernels):
    cfg = load_config("default").to_dict()
    cfg["defaults"]["supported_kernels"] = [
        {"activation": {"bitwidth": a, "dtype": "int"}, "param": {"bitwidth": w, "dtype": "int"}}
        for w, a in ((8, 8), (4, 8), (8, 16), (16, 16))]
    cfg["op_type"].setdefault("Conv", {})["supported_kernels"] = [
        {"activation": {"bitwidth": a, "dtype": "int"}, "param": {"bitwidth": w, "dtype": "int"}}
        for w, a in conv_kernels]
    return cfg


def test_groups_honour_supported_kernels():
    _, _, sim = _cnn_sim(_config_with_kernels([(8, 8), (8, 16)]))
    groups, _ = quantizer_groups(sim, "w4a8,w8a8,w8a16")
    by = {g.name: g for g in groups}
    assert [c.name for c in by["c1"].allowed] == ["w8a8", "w8a16"]   # Conv runs no W4A8
    assert [c.name for c in by["fc"].allowed] == ["w4a8", "w8a8", "w8a16"]
    res = pyquant.mixed_precision(sim, "w4a8,w8a8,w8a16", "cosine", _images(16), 1.0, progress=False)
    for g in ("c1", "c2"):  # never a combination the config says Conv does not run
        assert res.mix[g] != Candidate(4, 8)
        assert sim.quantizer(f"{g}.weight").bitwidth == 8
    assert res.mix["fc"] == Candidate(4, 8)  # the drop allowed takes every layer as low as it may go


def test_a_candidate_no_layer_runs_is_an_error_naming_it():
    _, x, sim = _cnn_sim(_config_with_kernels([(8, 8), (8, 16)]))
    with pytest.raises(ValueError, match=r"w2a8.*supported_kernels"):
        pyquant.mixed_precision(sim, "w8a8,w2a8", "cosine", x, 0.1, progress=False)


# ---- the target ---------------------------------------------------------------------------------------------

def test_the_chosen_mix_meets_a_reachable_target_on_an_independent_evaluation():
    model, x, sim = _cnn_sim()
    res = pyquant.mixed_precision(sim, "w4a8,w8a8,w8a16", "cosine", x, 5e-5, progress=False)
    assert res.target == pytest.approx(1.0 - 5e-5)
    assert res.target_met and res.shortfall == 0.0
    # the simulation holds the mix, and its accuracy measured here is the reported one, above the target
    for g in res.groups:
        c = res.mix[g.name]
        assert all(sim.quantizer(w).bitwidth == c.weight_bits for w in g.weights)
        assert all(sim.quantizer(a).bitwidth == c.activation_bits for a in g.activations)
    measured = _cosine(model, sim, x)
    assert measured == pytest.approx(res.accuracy, abs=1e-9)
    assert measured >= res.target
    # cheaper than the starting mix (all w8a16) but not the cheapest: the target binds
    assert 0 < res.relative_cost < 1
    assert any(c != Candidate(4, 8) for c in res.mix.values())


class FiveLinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(16, 16), nn.ReLU())])

    def forward(self, x):
        return self.layers(x)


def test_the_climb_finds_a_mix_whose_layers_compensate_each_other():
    """Accuracy as learned rounding can make it: every layer at W4 compensates (0.95), all but the middle one
    even more (0.97), any other mix loses 3 points per W4 layer. From the top, lowering a second layer already
    misses the target (0.96), so the path and the single moves of the refinement stop at one W4 layer; the
    climb from the cheapest mix raises the middle layer alone and meets it with four."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    sim = pyquant.QuantSim(FiveLinear().eval(), x[:2])
    sim.compute_encodings(x, progress=False)
    weights = [n for n in sim.param_quantizers if n.endswith("weight")]
    middle = weights[2]

    def accuracy(_model) -> float:
        low = {n for n in weights if sim.quantizer(n).enabled and sim.quantizer(n).bitwidth == 4}
        if low == set(weights):
            return 0.95
        if low == set(weights) - {middle}:
            return 0.97
        return 1.0 - 0.03 * len(low)

    plain = pyquant.mixed_precision(sim, "w4a8,w8a8", accuracy, x, 0.04, progress=False)
    assert sum(c.weight_bits == 4 for c in plain.mix.values()) == 1
    sim = pyquant.QuantSim(FiveLinear().eval(), x[:2])
    sim.compute_encodings(x, progress=False)
    weights = [n for n in sim.param_quantizers if n.endswith("weight")]
    res = pyquant.mixed_precision(sim, "w4a8,w8a8", accuracy, x, 0.04, refine=True, progress=False)
    assert res.target_met and res.accuracy == 0.97 and res.cost < plain.cost
    assert {w for g, c in res.mix.items() for w in next(x for x in res.groups if x.name == g).weights
            if c.weight_bits == 8} == {middle}
    assert any(p.source == "climb" for p in res.points)
    # every W4 layer losing alike: the path falls monotonically, and the climb (its evaluations) is skipped
    sim = pyquant.QuantSim(FiveLinear().eval(), x[:2])
    sim.compute_encodings(x, progress=False)
    weights = [n for n in sim.param_quantizers if n.endswith("weight")]

    def monotone(_model) -> float:
        return 1.0 - 0.03 * sum(sim.quantizer(n).enabled and sim.quantizer(n).bitwidth == 4 for n in weights)

    res = pyquant.mixed_precision(sim, "w4a8,w8a8", monotone, x, 0.04, refine=True, progress=False)
    assert res.target_met and not any(p.source == "climb" for p in res.points)


def test_refinement_measures_moves_on_the_chosen_mix_and_never_costs_more():
    model, x, sim = _cnn_sim()
    plain = pyquant.mixed_precision(sim, "w4a8,w8a8,w8a16", "cosine", x, 5e-5, progress=False)
    model, x, sim = _cnn_sim()
    refined = pyquant.mixed_precision(sim, "w4a8,w8a8,w8a16", "cosine", x, 5e-5, refine=True, progress=False)
    assert refined.target_met and refined.cost <= plain.cost
    moves = [p for p in refined.points if p.source == "refine"]
    assert moves  # the chosen path point had cheaper single moves left to measure
    on_path = {json.dumps(p.mix, sort_keys=True) for p in refined.points if p.source != "refine"}
    for p in moves:  # each refinement point is one group away from a mix evaluated before it
        near = [json.loads(k) for k in on_path]
        assert any(sum(p.mix[g] != m[g] for g in m) == 1 for m in near) or any(
            sum(p.mix[g] != q.mix[g] for g in q.mix) == 1 for q in moves if q is not p)
    # the chosen mix's activations were calibrated anew (with its weights in place) and evaluated
    assert any(p.source == "recalibrated" for p in refined.points)
    # the staged refinement evaluations equal a whole evaluation of the applied mix, whichever activation
    # calibration the chosen point was evaluated with
    measured = _cosine(model, sim, x)
    assert measured == pytest.approx(refined.accuracy, abs=1e-9) and measured >= refined.target


def test_an_unreachable_target_returns_the_best_mix_and_how_far_it_is():
    model, x, sim = _cnn_sim()
    res = pyquant.mixed_precision(sim, "w2a4,w3a4", "cosine", x, 0.0, progress=False)
    assert not res.target_met
    assert res.accuracy < res.target
    assert res.shortfall == pytest.approx(res.target - res.accuracy)
    assert res.accuracy == max(p.accuracy for p in res.points)
    assert _cosine(model, sim, x) == pytest.approx(res.accuracy, abs=1e-9)
    assert "NOT met" in res.summary()


# ---- cost ---------------------------------------------------------------------------------------------------

def test_costs_against_a_hand_count():
    model = TwoLinear().eval()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    sim = pyquant.QuantSim(model, x[:2])
    sim.compute_encodings(x, progress=False)
    groups, _ = quantizer_groups(sim, "w4a8,w8a16")
    costs = layer_costs(sim, groups, x[:5])
    assert costs["fc1"].macs == 8 * 16 and costs["fc2"].macs == 16 * 4     # per sample
    assert costs["fc1"].weight_elements == 128 and costs["fc2"].weight_elements == 64
    res = pyquant.mixed_precision(sim, "w4a8,w8a16", "cosine", x, 1.0, progress=False)
    # a drop this large lets the cheapest mix meet the target: the search evaluates it and stops
    assert [p.source for p in res.points] == ["start", "path"] and res.mix == {"fc1": Candidate(4, 8),
                                                                             "fc2": Candidate(4, 8)}
    hand = {"fc1": {"w4a8": 128 * 4 * 8, "w8a16": 128 * 8 * 16}, "fc2": {"w4a8": 64 * 4 * 8, "w8a16": 64 * 8 * 16}}
    size = {"w4a8": 4, "w8a16": 8}
    assert res.costs["bitops"] == sum(hand[g][c.name] for g, c in res.mix.items())
    assert res.costs["size"] == sum((128 if g == "fc1" else 64) * size[c.name] for g, c in res.mix.items())
    start = hand["fc1"]["w8a16"] + hand["fc2"]["w8a16"]
    for p in res.points:
        assert p.cost == sum(hand[g][c] for g, c in p.mix.items())
        assert p.relative_cost == pytest.approx(p.cost / start)


def test_conv_macs_count_every_output_element():
    _, x, sim = _cnn_sim()
    groups, _ = quantizer_groups(sim, "w8a8")
    costs = layer_costs(sim, groups, x[:3])
    assert costs["c1"].macs == 8 * 16 * 16 * (3 * 3 * 3)
    assert costs["c2"].macs == 16 * 8 * 8 * (8 * 3 * 3)
    assert costs["fc"].macs == 16 * 10


# ---- evaluation ---------------------------------------------------------------------------------------------

def test_staged_sensitivity_equals_whole_evaluation(monkeypatch):
    _, x, sim = _cnn_sim()
    staged = pyquant.mixed_precision(sim, "w4a8,w8a8,w8a16", "cosine", x, 5e-5, progress=False)
    assert staged.staged
    _, _, sim2 = _cnn_sim()
    monkeypatch.setattr(mp_module, "inplace_free", lambda gm: False)
    whole = pyquant.mixed_precision(sim2, "w4a8,w8a8,w8a16", "cosine", x, 5e-5, progress=False)
    assert not whole.staged
    a = {json.dumps(p.mix, sort_keys=True): p.accuracy for p in staged.points if p.source == "sensitivity"}
    b = {json.dumps(p.mix, sort_keys=True): p.accuracy for p in whole.points if p.source == "sensitivity"}
    assert a.keys() == b.keys() and len(a) == 3 * 2
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-12)
    assert staged.mix == whole.mix


class _StopAt:
    """Agreement with FP32 as a callable eval_fn that fails at its `stop`-th call (a kill mid-search)."""

    def __init__(self, model, x, stop=None):
        self.model, self.x, self.stop, self.calls = model, x, stop, 0

    def __call__(self, m):
        self.calls += 1
        if self.stop is not None and self.calls == self.stop:
            raise KeyboardInterrupt("killed")
        with torch.no_grad():
            return float(F.cosine_similarity(self.model(self.x).double(), m(self.x).double(), dim=-1).mean())


def test_a_rerun_after_a_kill_resumes_from_the_cache(tmp_path):
    model, x, sim = _cnn_sim()
    full = pyquant.mixed_precision(sim, "w4a8,w8a8,w8a16", _StopAt(model, x), x, 5e-5, progress=False)
    _, _, sim = _cnn_sim()
    before = {n: q.get_encoding() for n, q in sim.quantizers.items()}
    with pytest.raises(KeyboardInterrupt):
        pyquant.mixed_precision(sim, "w4a8,w8a8,w8a16", _StopAt(model, x, stop=6), x, 5e-5,
                                checkpoint_dir=tmp_path, progress=False)
    for n, q in sim.quantizers.items():  # the interrupted search left the simulation as it was
        assert q.bitwidth == 8 and torch.equal(q.get_encoding().scale, before[n].scale)
    _, _, sim = _cnn_sim()
    again = pyquant.mixed_precision(sim, "w4a8,w8a8,w8a16", _StopAt(model, x), x, 5e-5, checkpoint_dir=tmp_path,
                                    progress=False)
    assert again.cached == 4     # the start, the cheapest mix and two sensitivity steps (FP32 is not cached)
    assert again.evaluations == full.evaluations - 4
    assert again.mix == full.mix and again.accuracy == full.accuracy
    assert [dataclass_tuple(p) for p in again.points] == [dataclass_tuple(p) for p in full.points]
    # another model's cache is not resumed
    other = SmallCnn().eval()
    with torch.no_grad():
        other.fc.weight.mul_(2)
    sim3 = pyquant.QuantSim(other, x[:2])
    sim3.compute_encodings(x, progress=False)
    with pytest.warns(UserWarning, match="starting over"):
        res3 = pyquant.mixed_precision(sim3, "w4a8,w8a8,w8a16", _StopAt(other, x), x, 5e-5,
                                       checkpoint_dir=tmp_path, progress=False)
    assert res3.cached == 0


def dataclass_tuple(p):
    return (p.accuracy, p.cost, p.source, tuple(sorted(p.mix.items())))


def test_the_pareto_front_is_non_dominated_and_covers_every_point():
    _, x, sim = _cnn_sim()
    res = pyquant.mixed_precision(sim, "w4a8,w8a8,w8a16", "cosine", x, 5e-5, refine=True, progress=False)
    front = res.pareto
    assert front and len(res.points) > len(front)
    for p in front:
        assert not any(q.cost <= p.cost and q.accuracy >= p.accuracy and (q.cost < p.cost or q.accuracy > p.accuracy)
                       for q in res.points)
    for q in res.points:  # every point is matched or beaten by one on the front
        assert any(p.cost <= q.cost and p.accuracy >= q.accuracy for p in front)
    costs = [p.cost for p in front]
    assert costs == sorted(costs)
    # the chosen mix is the cheapest evaluated point that meets the target
    assert res.cost == min(p.cost for p in res.points if p.accuracy >= res.target)
    assert [r["accuracy"] for r in res.table()] == [p.accuracy for p in front]


def test_time_budget_stops_early_with_the_best_mix_so_far(monkeypatch):
    model, x, sim = _cnn_sim()
    clock = [0.0]  # each evaluation takes one second of a clock the search reads
    monkeypatch.setattr(mp_module.time, "perf_counter", lambda: clock[0])
    cosine = _StopAt(model, x)

    def slow(m):
        clock[0] += 1.0
        return cosine(m)

    res = pyquant.mixed_precision(sim, "w4a8,w8a8,w8a16", slow, x, 5e-5, time_budget=4.5, progress=False)
    assert not res.complete
    # FP32, the start and the cheapest mix at t=0..3, then sensitivity evaluations until the clock passes 4.5
    assert [p.source for p in res.points] == ["start", "path", "sensitivity", "sensitivity"]
    assert res.cost == min(p.cost for p in res.points if p.accuracy >= res.target)
    assert "stopped by the time budget" in res.summary()


def test_save_writes_encodings_at_the_chosen_widths_and_the_config(tmp_path):
    model, x, sim = _cnn_sim()
    res = pyquant.mixed_precision(sim, "w4a8,w8a16", "cosine", x, 5e-5, progress=False)
    paths = res.save(sim, tmp_path, "mix")
    assert load_config(str(paths["config"])) == sim.config
    weights = torch.load(paths["weights"])
    assert set(weights) == set(model.state_dict())
    reloaded = SmallCnn().eval()
    reloaded.load_state_dict(weights)  # the model's own names
    fresh = pyquant.QuantSim(reloaded, x[:2])
    fresh.load_encodings(paths["encodings"])
    for name, q in sim.quantizers.items():
        if q.enabled:
            assert fresh.quantizer(name).bitwidth == q.bitwidth
    assert _cosine(model, fresh, x) == pytest.approx(res.accuracy, abs=1e-6)
    saved = json.loads(paths["result"].read_text())
    assert saved["mix"] == {g: c.name for g, c in res.mix.items()}


@pytest.mark.parametrize("kwargs, match", [
    ({"eval_fn": "accuracy"}, "eval_fn must be one of"),
    ({"allowed_accuracy_drop": -1}, "allowed_accuracy_drop"),
    ({"cost": "energy"}, "cost must be one of"),
    ({"pareto_points": -2}, "pareto_points"),
    ({"time_budget": 0}, "time_budget"),
])
def test_bad_arguments_are_named(kwargs, match):
    _, x, sim = _cnn_sim()
    args = {"candidates": "w4a8,w8a8", "eval_fn": "cosine", "data": x, "allowed_accuracy_drop": 0.01, **kwargs}
    with pytest.raises(ValueError, match=match):
        pyquant.mixed_precision(sim, **args, progress=False)


def test_tiny_llama_weights_only_on_dict_batches():
    from zoo import tiny_llama
    model = tiny_llama().eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 12), generator=torch.Generator().manual_seed(3))
    batches = [{"input_ids": ids[i:i + 4]} for i in range(0, 8, 4)]
    sim = pyquant.QuantSim(model, {"input_ids": ids[:1]})
    sim.compute_encodings(batches, progress=False)
    res = pyquant.mixed_precision(sim, "w4,w8", "top1_agreement", batches, 0.5, progress=False)
    weights = {w for g in res.groups for w in g.weights}
    assert "model.layers.0.self_attn.q_proj.weight" in weights
    assert res.staged and res.target_met
    with torch.no_grad():
        ref = model(input_ids=ids).logits.argmax(-1)
        got = pyquant.metrics.output_tensor(sim.model(input_ids=ids)).argmax(-1)
    assert float((ref == got).double().mean()) == pytest.approx(res.accuracy, abs=1e-12)
    costs = {g.name: g for g in res.groups}
    assert len(costs) >= 14  # 7 projections per layer, 2 layers (plus the head and the embedding)


def test_encodings_at_each_width_are_a_fresh_calibration_at_that_width():
    model, x, sim = _cnn_sim()
    before = {n: q.get_encoding() for n, q in sim.quantizers.items()}
    groups, _ = quantizer_groups(sim, "w4a8,w8a16")
    encs = mp_module._Encodings(sim, groups, [(x[i:i + 16],) for i in range(0, len(x), 16)])
    fresh = pyquant.QuantSim(model, x[:2], param_bw=4, output_bw=16)
    fresh.compute_encodings(x, progress=False)
    clipped_somewhere = False
    for g in groups:
        for w in g.weights:  # weights from themselves at 4 bits, each channel at its least-error clipping
            own = fresh.quantizer(w).get_encoding()
            wt = fresh.quantizer_input(w).detach()
            got = encs.encs[(w, 4)]
            want = least_error(wt, [own, *clipped_encodings(wt, own)])
            assert torch.equal(got.scale, want.scale) and got.bitwidth == 4
            err_got = (got.quantize_dequantize(wt) - wt).square().flatten(1).sum(1)
            err_own = (own.quantize_dequantize(wt) - wt).square().flatten(1).sum(1)
            assert bool((err_got <= err_own + 1e-9).all())
            clipped_somewhere |= bool((err_got < err_own * 0.99).any())
    assert clipped_somewhere  # 4 bits: some channel's best range clips
    wide = pyquant.QuantSim(model, x[:2], param_bw=8, output_bw=16)
    wide.compute_encodings(x, progress=False)
    for g in groups:
        for a in g.activations:  # activations observed with the weights at their own (8-bit) widths
            e, f = encs.encs[(a, 16)], wide.quantizer(a).get_encoding()
            assert torch.equal(e.scale, f.scale) and torch.equal(e.offset, f.offset)
    # the simulation is left as it was
    for n, q in sim.quantizers.items():
        assert q.bitwidth == 8 and torch.equal(q.get_encoding().scale, before[n].scale)


def test_the_greedy_path_orders_moves_by_loss_per_cost_then_by_the_finer_measure():
    from pyquant.techniques.mixed_precision_groups import QuantizerGroup
    lo, hi = Candidate(4, 8), Candidate(8, 8)
    groups = [QuantizerGroup(n, (f"{n}.weight",), (), ("Gemm",), i, (lo, hi)) for i, n in enumerate("abc")]
    cost = {("a", hi): 10, ("a", lo): 5, ("b", hi): 10, ("b", lo): 5, ("c", hi): 40, ("c", lo): 20}
    start = {g.name: hi for g in groups}
    # agreement: a and b lose nothing, c loses 0.1 over a saving of 20; cosine: b loses less than a
    sens = {("a", lo): (1.0, 0.990), ("b", lo): (1.0, 0.999), ("c", lo): (0.9, 0.95)}
    path = mp_module._greedy(groups, start, (1.0, 1.0), sens, lambda g, c: cost[(g, c)], up=False)
    moved = [next(g for g in b if b[g] != a[g]) for a, b in zip(path, path[1:])]
    assert moved == ["b", "a", "c"] and path[-1] == {"a": lo, "b": lo, "c": lo}
    # the climb: most gained per cost added first, ties by the finer measure; a and b gain 0.05 over 5, c 0.1
    # over 20; b's cosine gains more than a's
    floor = {g.name: lo for g in groups}
    raised = {("a", hi): (0.95, 0.990), ("b", hi): (0.95, 0.999), ("c", hi): (1.0, 1.0)}
    climb = mp_module._greedy(groups, floor, (0.9, 0.98), raised, lambda g, c: cost[(g, c)], up=True)
    moved = [next(g for g in b if b[g] != a[g]) for a, b in zip(climb, climb[1:])]
    assert moved == ["b", "a", "c"] and climb[-1] == start
    del raised[("c", hi)]  # a move not measured is not taken: the climb ends short of the top
    assert mp_module._greedy(groups, floor, (0.9, 0.98), raised, lambda g, c: cost[(g, c)], up=True)[-1] != start


def test_per_block_and_lpbq_weights_keep_their_blocks_and_lpbq_its_widths():
    model = TwoLinear().eval()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    sim = pyquant.QuantSim(model, x[:2], block_size=4)
    sim.compute_encodings(x, progress=False)
    res = pyquant.mixed_precision(sim, "w4a8,w8a8", "cosine", x, 1.0, progress=False)
    assert res.mix == {"fc1": Candidate(4, 8), "fc2": Candidate(4, 8)}
    fresh = pyquant.QuantSim(model, x[:2], param_bw=4, block_size=4)
    fresh.compute_encodings(x, progress=False)
    for w in ("fc1.weight", "fc2.weight"):  # per block of 4 along the input, at 4 bits, from the weight itself
        q = sim.quantizer(w)
        assert q.bitwidth == 4 and q.block_size == (1, 4)
        own, wt = fresh.quantizer(w).get_encoding(), fresh.quantizer_input(w).detach()
        want = least_error(wt, [own, *clipped_encodings(wt, own)])  # each block at its least-error clipping
        # set_encoding keeps the range: the scale read back is equal to a float32 rounding
        assert want.block_size == (1, 4) and torch.allclose(q.get_encoding().scale, want.scale, rtol=1e-6, atol=0)
    lpbq = pyquant.QuantSim(model, x[:2], param_bw=4, block_size=4, decompressed_bw=8)
    lpbq.compute_encodings(x, progress=False)
    # an LPBQ weight takes only widths below its decompressed_bw: 8 bits is not, so no layer runs w8a8
    with pytest.raises(ValueError, match=r"w8a8.*decompressed_bw 8"):
        quantizer_groups(lpbq, "w4a8,w8a8")
    groups, _ = quantizer_groups(lpbq, "w3a8,w4a8")
    assert all([c.name for c in g.allowed] == ["w3a8", "w4a8"] for g in groups)
    res = pyquant.mixed_precision(lpbq, "w3a8,w4a8", "cosine", x, 1.0, progress=False)
    assert res.mix == {"fc1": Candidate(3, 8), "fc2": Candidate(3, 8)}
    q = lpbq.quantizer("fc1.weight")
    assert isinstance(q, pyquant.quant.LpbqQuantizeDequantize) and q.bitwidth == 3 and q.decompressed_bw == 8
    n = q.get_encoding().int_scale
    assert int(n.min()) >= 1 and int(n.max()) == 2 ** (8 - 3)   # each channel's widest block at 2^(D - b)


def test_recalibrating_activations_on_a_mix_is_a_generation_that_can_be_undone():
    model, x, sim = _cnn_sim()
    groups, _ = quantizer_groups(sim, "w4a8,w8a8")
    calib = [(x[i:i + 16],) for i in range(0, len(x), 16)]
    encs = mp_module._Encodings(sim, groups, calib)
    acts = [n for n in sim.quantizers if n not in sim.param_quantizers]
    first = {n: sim.quantizer(n).get_encoding() for n in acts}
    low = Candidate(4, 8)
    for g in groups:
        encs.put(g, low)
    weights = {n: sim.quantizer(n).get_encoding() for n in sim.param_quantizers}
    encs.recalibrate(calib)
    assert encs.generation == 1 and encs.tag
    # the weights kept their 4-bit encodings; the activations are those of a calibration with them in place
    for n, e in weights.items():
        assert torch.equal(sim.quantizer(n).get_encoding().scale, e.scale) and not sim.quantizer(n).frozen
    ref = pyquant.QuantSim(model, x[:2], param_bw=4)
    for n, e in weights.items():
        ref.quantizer(n).set_encoding(e)
        ref.quantizer(n).freeze()
    ref.compute_encodings(x, progress=False)
    changed = 0
    for n in acts:
        got, want = sim.quantizer(n).get_encoding(), ref.quantizer(n).get_encoding()
        assert torch.allclose(got.scale, want.scale, rtol=1e-6) and torch.equal(got.offset, want.offset)
        changed += not torch.equal(got.scale, first[n].scale)
    assert changed  # 4-bit weights move some activation's range
    encs.use(0)  # back to the first calibration, bit for bit
    for g in groups:
        encs.put(g, low)
    for n in acts:
        assert torch.equal(sim.quantizer(n).get_encoding().scale, first[n].scale)


def test_an_earlier_generation_is_restored_under_a_mix_of_other_widths():
    """Refinement goes back to the generation a point was evaluated with while another mix is in place: its
    grouped activations may then sit at other widths than when that generation was recorded."""
    model, x, sim = _cnn_sim()
    groups, loose = quantizer_groups(sim, "w8a8,w8a16")
    calib = [(x[i:i + 16],) for i in range(0, len(x), 16)]
    encs = mp_module._Encodings(sim, groups, calib)
    acts = [n for n in sim.quantizers if n not in sim.param_quantizers]
    grouped = [n for g in groups for n in g.activations]
    assert grouped
    a8, a16 = Candidate(8, 8), Candidate(8, 16)
    for g in groups:
        encs.put(g, a8)
    first = {n: sim.quantizer(n).get_encoding() for n in acts}
    encs.recalibrate(calib)  # generation 0 recorded with every group at 8-bit activations
    for g in groups:
        encs.put(g, a16)
    encs.use(0)  # the grouped activations are at 16 bits now: their 8-bit encodings wait in the table
    assert all(sim.quantizer(n).bitwidth == 16 for n in grouped)
    for n in loose:  # the ungrouped ones are generation 0's at once
        assert torch.equal(sim.quantizer(n).get_encoding().scale, first[n].scale)
    for g in groups:
        encs.put(g, a8)
    for n in acts:
        assert torch.equal(sim.quantizer(n).get_encoding().scale, first[n].scale)


# ---- candidate weights (a rounding technique's weights at one width) -------------------------------------

def _w4_values(sim, name, noise=0.0, seed=0):
    """Weight `name` on its 4-bit least-error grid (optionally from a perturbed weight), with that encoding."""
    q = sim.quantizer(name)
    w = sim.weight(name).detach()
    if noise:
        w = w + noise * w.abs().max() * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    saved = (q.bitwidth, q.get_encoding())
    try:
        sim.set_bitwidth(name, 4)
        with torch.no_grad(), q.compute_encodings():
            q(w)
        enc = q.get_encoding()
        with torch.no_grad():
            values = q(w).detach().clone()
    finally:
        sim.set_bitwidth(name, saved[0])
        q.set_encoding(saved[1])
    return values, enc


def test_candidate_weights_run_at_their_width_and_the_own_weights_elsewhere():
    model, x, sim = _cnn_sim()
    own = {n: sim.weight(n).detach().clone() for n in ("c1.weight", "c2.weight", "fc.weight")}
    # c2's 4-bit weights ruined: the search must see it (sensitivity) and keep c2 above 4 bits
    bad = {"c2.weight": _w4_values(sim, "c2.weight", noise=0.5)}
    res = pyquant.mixed_precision(sim, "w4a8,w8a8", "cosine", x, 0.002, candidate_weights={4: bad},
                                  progress=False)
    model0, _, sim0 = _cnn_sim()
    plain = pyquant.mixed_precision(sim0, "w4a8,w8a8", "cosine", x, 0.002, progress=False)
    group_of = {w: g.name for g in res.groups for w in g.weights}
    assert all(c.weight_bits == 4 for c in plain.mix.values())  # without them every layer goes to 4 bits
    assert res.mix[group_of["c2.weight"]].weight_bits == 8
    c2_w4 = [p for p in res.points if p.source == "sensitivity" and p.mix[group_of["c2.weight"]] == "w4a8"]
    assert len(c2_w4) == 1 and c2_w4[0].accuracy < plain.accuracy - 0.01  # the sensitivity ran the bad values
    # the weights the chosen mix runs with: every layer at 8 bits holds its own weight
    for n, w in own.items():
        if res.mix[group_of[n]].weight_bits == 8:
            torch.testing.assert_close(sim.weight(n), w, rtol=0, atol=0)
    assert _cosine(model, sim, x) == pytest.approx(res.accuracy, abs=1e-9)


def test_chosen_candidate_weights_are_applied_and_frozen_on_their_grid():
    model, x, sim = _cnn_sim()
    given = {n: _w4_values(sim, n, noise=0.01, seed=i) for i, n in enumerate(("c1.weight", "c2.weight", "fc.weight"))}
    res = pyquant.mixed_precision(sim, "w4a8,w8a8", "cosine", x, 1.0, candidate_weights={4: given},
                                  progress=False)
    group_of = {w: g.name for g in res.groups for w in g.weights}
    assert all(c.weight_bits == 4 for c in res.mix.values())  # any drop allowed: the cheapest mix
    for n, (values, enc) in given.items():
        q = sim.quantizer(n)
        torch.testing.assert_close(sim.weight(n), values, rtol=0, atol=0)
        assert q.frozen and q.bitwidth == 4 and res.mix[group_of[n]].weight_bits == 4
        torch.testing.assert_close(q.get_encoding().scale, enc.scale)
        torch.testing.assert_close(q(sim.weight(n)), values)  # the given values are a fixed point of the grid
    assert _cosine(model, sim, x) == pytest.approx(res.accuracy, abs=1e-9)
    sim.compute_encodings(x, progress=False)  # a recalibration (of the activations) keeps them
    for n, (values, enc) in given.items():
        torch.testing.assert_close(sim.quantizer(n).get_encoding().scale, enc.scale)
        torch.testing.assert_close(sim.weight(n), values, rtol=0, atol=0)


def test_candidate_weights_from_adaround_beat_round_to_nearest_at_four_bits():
    model, x, sim = _cnn_sim()
    ada = pyquant.adaround(model, x[:2], x, param_bw=4, iterations=200, progress=False)
    res = pyquant.mixed_precision(sim, "w4a8,w8a8", "cosine", x, 1.0, candidate_weights={4: ada},
                                  progress=False)
    _, _, sim0 = _cnn_sim()
    plain = pyquant.mixed_precision(sim0, "w4a8,w8a8", "cosine", x, 1.0, progress=False)
    assert all(c.weight_bits == 4 for c in res.mix.values()) and all(c.weight_bits == 4 for c in plain.mix.values())
    assert res.accuracy > plain.accuracy  # all layers at W4A8: learned rounding against nearest
    for n in ada.encodings:
        torch.testing.assert_close(sim.weight(n), ada.model.get_parameter(n), rtol=0, atol=0)


def test_an_error_on_the_way_restores_the_own_weights():
    model, x, sim = _cnn_sim()
    own = sim.weight("c2.weight").detach().clone()

    def fails(m):
        if not torch.equal(sim.weight("c2.weight"), own):
            raise KeyboardInterrupt("killed with the candidate weights in place")
        return 1.0

    with pytest.raises(KeyboardInterrupt):
        pyquant.mixed_precision(sim, "w4a8,w8a8", fails, x, 0.5,
                                candidate_weights={4: {"c2.weight": _w4_values(sim, "c2.weight", 0.1)}},
                                progress=False)
    torch.testing.assert_close(sim.weight("c2.weight"), own, rtol=0, atol=0)


@pytest.mark.parametrize("make,match", [
    (lambda sim: {3: {}}, r"key 3 is not a weight width of the candidates \(\[4, 8\]\)"),
    (lambda sim: {4: {"nope.weight": _w4_values(sim, "c1.weight")}}, r"\[4\]\['nope.weight'\].*no grouped weight"),
    (lambda sim: {4: {"c1.weight": (_w4_values(sim, "c1.weight")[0][:4], _w4_values(sim, "c1.weight")[1])}},
     r"weight shape \(4, 3, 3, 3\) is not the simulation's \(8, 3, 3, 3\)"),
    (lambda sim: {8: {"c1.weight": _w4_values(sim, "c1.weight")}}, r"the encoding is 4-bit .* takes 8-bit"),
    (lambda sim: {4: {"c1.weight": sim.weight("c1.weight")}}, r"must be a \(weight tensor, Encoding\) pair"),
    (lambda sim: {4: [1]}, r"candidate_weights\[4\] must be an AdaroundResult"),
    (lambda sim: [4], r"candidate_weights must be a dict"),
])
def test_bad_candidate_weights_are_named(make, match):
    _, x, sim = _cnn_sim()
    with pytest.raises((ValueError, TypeError), match=match):
        pyquant.mixed_precision(sim, "w4a8,w8a8", "cosine", x, 0.1, candidate_weights=make(sim), progress=False)
