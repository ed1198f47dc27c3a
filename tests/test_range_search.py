"""Output-aware activation range search (pyquant.search_activation_ranges): on an MLP with a planted outlier
channel the output does not depend on, on a tiny Llama captured with torch.export and dict batches, staged
against whole evaluation, resuming after a kill, and its input checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pyquant
from pyquant.techniques import range_search
from helpers import counted
from layerwise_sims import llama_case, logits


class Outlier(nn.Module):
    """fc1's channel 0 reaches ~60 on every sample, ~20x the other channels, and fc2 reads it with a weight
    of 1e-3: an 8-bit per-tensor grid on fc1's output that holds the outlier wastes most of its levels on a
    value the output hardly sees. Clipping that range is what a tensor-local calibration cannot choose."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)
        with torch.no_grad():
            self.fc1.bias[0] = 60.0
            self.fc2.weight[:, 0] = 1e-5

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class InPlace(Outlier):
    """The same function, written with an op that writes into its input: evaluated whole, never staged."""

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h.clamp_(min=0.0))


def _case(cls=Outlier, scheme="min_max"):
    model = cls().eval()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    sim = pyquant.QuantSim(model, x[:4], quant_scheme=scheme, param_bw=8, output_bw=8)
    sim.compute_encodings(x, progress=False)
    return model, x, sim


def _output_mse(sim, model, x) -> float:
    with torch.no_grad():
        return float((sim.model(x).double() - model(x).double()).pow(2).mean())


def test_clips_the_outlier_range_and_the_output_error_falls():
    model, x, sim = _case()
    before = _output_mse(sim, model, x)
    res = pyquant.search_activation_ranges(sim, x, batch_size=16)
    after = _output_mse(sim, model, x)
    # the loss the search reports is the output MSE measured the ordinary way, before and after
    assert res.loss_before == pytest.approx(before, rel=1e-9)
    assert res.loss_after == pytest.approx(after, rel=1e-9)
    assert after < 0.5 * before
    chosen = {c.name: c for c in res.clipped}
    assert chosen["relu.output"].factor < 0.5 and chosen["relu.output"].max < 30.0  # fc1 + ReLU's output
    assert res.staged
    # each decision keeps or lowers the loss, and the report chains
    for a, b in zip(res.choices, res.choices[1:]):
        assert b.loss_before == a.loss_after and b.loss_after <= b.loss_before


def test_searched_ranges_are_frozen_and_survive_recalibration():
    model, x, sim = _case()
    pyquant.search_activation_ranges(sim, x, batch_size=16)
    enc = {n: sim.quantizer(n).get_encoding() for n in sim.activation_quantizers}
    assert all(sim.quantizer(n).frozen for n in enc)
    sim.compute_encodings(x, progress=False)
    for n, e in enc.items():
        assert torch.equal(sim.quantizer(n).get_encoding().scale, e.scale)


def test_staged_evaluation_equals_whole_forwards(monkeypatch):
    _, x, staged_sim = _case()
    res = pyquant.search_activation_ranges(staged_sim, x, batch_size=16, loss="cosine")
    _, _, whole_sim = _case()
    monkeypatch.setattr(range_search, "inplace_free", lambda gm: False)
    whole = pyquant.search_activation_ranges(whole_sim, x, batch_size=16, loss="cosine")
    assert res.staged and not whole.staged
    assert [c.factor for c in res.choices] == [c.factor for c in whole.choices]
    for a, b in zip(res.choices, whole.choices):
        assert a.loss_after == pytest.approx(b.loss_after, rel=1e-6, abs=1e-12)


@pytest.mark.filterwarnings("ignore::pyquant.UnquantizedOpWarning")
def test_walking_out_from_the_current_range_finds_the_exhaustive_choice_with_fewer_evaluations():
    _, x, walked_sim = _case()
    walked = pyquant.search_activation_ranges(walked_sim, x, batch_size=16, factors=(1.5, 1.0, 0.75, 0.5, 0.25, 0.1))
    _, _, all_sim = _case()
    every = pyquant.search_activation_ranges(all_sim, x, batch_size=16, factors=(1.5, 1.0, 0.75, 0.5, 0.25, 0.1),
                                             exhaustive=True)
    assert every.evaluations == 1 + 5 * len(every.choices)
    assert walked.evaluations < every.evaluations
    assert [c.factor for c in walked.choices] == [c.factor for c in every.choices]
    assert walked.loss_after == pytest.approx(every.loss_after, rel=1e-12)


def test_a_graph_with_inplace_ops_is_evaluated_whole():
    model, x, sim = _case(InPlace)
    res = pyquant.search_activation_ranges(sim, x, batch_size=16)
    assert not res.staged
    assert res.loss_after < res.loss_before
    assert res.loss_after == pytest.approx(_output_mse(sim, model, x), rel=1e-9)


def test_more_passes_never_do_worse():
    _, x, one = _case(scheme="tf_enhanced")
    r1 = pyquant.search_activation_ranges(one, x, batch_size=16, factors=(1.0, 1.5, 0.5, 0.25))
    _, _, two = _case(scheme="tf_enhanced")
    r2 = pyquant.search_activation_ranges(two, x, batch_size=16, factors=(1.0, 1.5, 0.5, 0.25), passes=2)
    assert len(r2.choices) == 2 * len(r1.choices)
    assert r2.loss_after <= r1.loss_after


def test_llama_export_capture_with_dict_batches_and_a_callable_loss():
    model, calib, ev, ref = llama_case()
    sim = pyquant.QuantSim(model, calib[0], quant_scheme="min_max", param_bw=8, output_bw=8)
    sim.compute_encodings(calib, progress=False)
    seen = []

    def masked_kl(fp32, out, batch):
        seen.append(set(batch))
        m = batch["attention_mask"].bool()
        lp, lq = fp32[m].double().log_softmax(-1), out[m].double().log_softmax(-1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())

    def measured() -> float:
        with torch.no_grad():
            return sum(masked_kl(model(**b).logits, logits(sim.model(**b)), b) for b in calib) / len(calib)

    before = measured()
    res = pyquant.search_activation_ranges(sim, calib, loss=masked_kl, factors=(1.0, 0.5, 0.25))
    assert res.staged
    assert all(s == {"input_ids", "attention_mask"} for s in seen)
    assert res.loss_before == pytest.approx(before, rel=1e-6)
    assert res.loss_after == pytest.approx(measured(), rel=1e-6)
    assert res.loss_after <= res.loss_before
    assert len(res.choices) == sum(1 for q in sim.activation_quantizers.values() if q.enabled)


def test_kl_loss_on_llama_logits_lowers_the_held_out_error_too():
    model, calib, ev, ref = llama_case()
    sim = pyquant.QuantSim(model, calib[0], quant_scheme="min_max", param_bw=8, output_bw=6)
    sim.compute_encodings(calib, progress=False)
    with torch.no_grad():
        before = float((logits(sim.model(**ev)) - ref).pow(2).mean())
    res = pyquant.search_activation_ranges(sim, calib, loss="kl")
    with torch.no_grad():
        after = float((logits(sim.model(**ev)) - ref).pow(2).mean())
    assert res.loss_after < res.loss_before
    assert after < before


def test_resumes_after_a_kill_with_the_same_result(tmp_path, monkeypatch):
    _, x, sim = _case()
    full = pyquant.search_activation_ranges(sim, x, batch_size=16)
    n = len(full.choices)
    assert n >= 3
    _, _, killed = _case()
    calibrated = {n: q.get_encoding() for n, q in killed.activation_quantizers.items()}
    calls = counted(monkeypatch, range_search, "_scaled", stop_at=8)  # mid-way through the second quantizer
    with pytest.raises(KeyboardInterrupt):
        pyquant.search_activation_ranges(killed, x, batch_size=16, checkpoint_dir=tmp_path)
    assert len(calls) == 8
    monkeypatch.undo()
    for name, q in killed.activation_quantizers.items():     # the interrupted simulation is as it was given
        assert torch.equal(q.get_encoding().scale, calibrated[name].scale) and not q.frozen
    _, _, resumed_sim = _case()
    resumed = pyquant.search_activation_ranges(resumed_sim, x, batch_size=16, checkpoint_dir=tmp_path)
    assert [c.factor for c in resumed.choices] == [c.factor for c in full.choices]
    assert resumed.loss_after == pytest.approx(full.loss_after, rel=1e-9)
    assert resumed.evaluations < full.evaluations  # the first quantizer's candidates were not rerun
    for name in sim.activation_quantizers:
        assert torch.equal(resumed_sim.quantizer(name).get_encoding().scale, sim.quantizer(name).get_encoding().scale)


def test_frozen_and_disabled_quantizers_are_left_alone():
    _, x, sim = _case()
    names = list(sim.activation_quantizers)
    sim.quantizer(names[0]).freeze()
    sim.enable(names[1], False)
    enc0 = sim.quantizer(names[0]).get_encoding()
    res = pyquant.search_activation_ranges(sim, x, batch_size=16, factors=(0.5,))
    assert set(res.skipped) == {names[0], names[1]}
    assert torch.equal(sim.quantizer(names[0]).get_encoding().scale, enc0.scale)
    assert {c.name for c in res.choices} == set(names[2:])


@pytest.mark.parametrize("kw, match", [
    ({"loss": "l1"}, "loss must be one of"),
    ({"loss": 3}, "loss must be a name or a callable"),
    ({"factors": ()}, "factors must be a non-empty"),
    ({"factors": (1.0, -0.5)}, "factors must be"),
    ({"factors": (1.0, float("nan"))}, "factors must be"),
    ({"factors": (True,)}, "factors must be"),
    ({"factors": "ab"}, "factors must be"),
    ({"passes": 0}, "passes must be an int >= 1"),
    ({"quantizers": ["nope"]}, "not activation quantizers"),
])
def test_bad_arguments_name_the_argument(kw, match):
    _, x, sim = _case()
    with pytest.raises((ValueError, TypeError), match=match):
        pyquant.search_activation_ranges(sim, x, **kw)


def test_a_weight_quantizer_name_points_to_the_weight_methods():
    _, x, sim = _case()
    with pytest.raises(ValueError, match="seq_mse"):
        pyquant.search_activation_ranges(sim, x, quantizers=[next(iter(sim.param_quantizers))])


def test_an_uncalibrated_simulation_is_refused():
    model = Outlier().eval()
    x = torch.randn(8, 16)
    sim = pyquant.QuantSim(model, x[:2], param_bw=8, output_bw=8)
    with pytest.raises(RuntimeError, match="compute_encodings"):
        pyquant.search_activation_ranges(sim, x)


def test_not_a_simulation_is_refused():
    with pytest.raises(TypeError, match="QuantSim"):
        pyquant.search_activation_ranges(Outlier(), torch.randn(4, 16))
