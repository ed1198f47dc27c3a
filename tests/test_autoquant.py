"""AutoQuant: the flow keeps only what helps and stops at the target, a killed run resumes without
re-evaluating finished steps and ends identical to an uninterrupted one, a cache made with other
inputs is refused, the time budget stops early and says so, bad eval_fn / arguments name themselves,
the report is one offline page; Fashion-MNIST (real labels) at W4A8 on a slice."""
from __future__ import annotations

import base64
import copy
import json
import re
import warnings

import pytest
import torch
from torch import nn

import pyquant
from pyquant.autoquant import AutoQuant, AutoQuantCacheError, AutoQuantError
from helpers import fashion_mnist_or_skip


def _net(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU x2 -> pool -> Linear, BN scales spread over four decades: per-tensor weights lose
    much of it after folding, and cross-layer equalization gives it back."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-1, 1, generator=g)
            bn.running_var.uniform_(0.2, 2, generator=g)
            bn.weight.copy_(torch.logspace(-3, 1, 16)[torch.randperm(16, generator=g)])
            bn.bias.uniform_(-0.5, 1.5, generator=g)
    return m.eval()


X_CAL = torch.randn(64, 3, 10, 10, generator=torch.Generator().manual_seed(1))
X_EVAL = torch.randn(128, 3, 10, 10, generator=torch.Generator().manual_seed(2))


class Fidelity:
    """eval_fn: 1 - relative L2 error of the outputs against the FP32 model's (higher is better); counts
    its calls and can raise on the k-th, like a run killed midway."""

    def __init__(self, ref_model: nn.Module, fail_at: int = 0):
        with torch.no_grad():
            self.ref = ref_model(X_EVAL)
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyError("killed")
        with torch.no_grad():
            y = model(X_EVAL)
        return 1.0 - float((y - self.ref).norm() / self.ref.norm())


ADA = {"iterations": 30, "batch_size": 16, "positions_per_sample": 32}


def _aq(model, fn, **kw):
    kw.setdefault("config", "per_tensor")
    kw.setdefault("adaround_kwargs", ADA)
    kw.setdefault("quant_schemes", ("tf_enhanced", "min_max", "mse"))
    return AutoQuant(model, X_CAL[:1], X_CAL, fn, progress=False, **kw)


def _keys(res):
    return [s.key for s in res.steps]


# ---- the flow ----------------------------------------------------------------------------------------
def test_target_met_by_plain_quantsim_returns_at_once(tmp_path):
    model = _net()
    before = copy.deepcopy(model.state_dict())
    fn = Fidelity(model)
    res = _aq(model, fn, config="default").optimize(allowed_accuracy_drop=0.2, output_dir=tmp_path)
    assert fn.calls == 2 and _keys(res) == ["fp32", "quantsim"]
    assert res.target_met and res.best_step == "quantsim" and not res.budget_exhausted
    assert res.fp32_accuracy == pytest.approx(1.0)
    assert res.applied[0] == "batch-norm folding"
    # the user's model is untouched (the techniques work on copies)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model[1], nn.BatchNorm2d)
    # the result is what was measured
    assert fn(res.sim.model) == pytest.approx(res.accuracy, abs=1e-6)
    assert res.encodings_path.exists() and res.report_path.exists() and res.report_json_path.exists()


def test_full_flow_keeps_only_improvements_and_picks_the_best(tmp_path):
    model = _net()
    fn = Fidelity(model)
    with pytest.warns(RuntimeWarning, match="no step met the target"):
        res = _aq(model, fn, param_bw=4).optimize(allowed_accuracy_drop=0.0, output_dir=tmp_path)
    assert _keys(res) == ["fp32", "quantsim", "weights_only/tf_enhanced", "weights_only/min_max", "weights_only/mse",
                          "activations_only/tf_enhanced", "activations_only/min_max", "activations_only/mse",
                          "schemes", "cle", "cle+hba", "bias_correction", "seq_mse", "gptq", "adaround",
                          "range_search"]
    assert fn.calls == sum(s.status == "evaluated" for s in res.steps)
    # every kept step beat the best before it, and the result is the best full simulation
    best = -1.0
    for s in res.steps:
        if s.kind == "full" and s.status == "evaluated":
            assert s.improved == (s.accuracy > best)
            best = max(best, s.accuracy)
    assert res.accuracy == best
    # the weight scheme chosen is the one whose weights-only simulation scored highest
    w = {s.key.split("/")[1]: s.accuracy for s in res.steps if s.kind == "weights_only"}
    assert res.weight_scheme == max(w, key=w.get)
    # the weights cost the accuracy here (per-tensor 4-bit after folding), and the techniques win much of it back
    assert w[res.weight_scheme] < min(s.accuracy for s in res.steps if s.kind == "activations_only") - 0.05
    assert res.accuracy > res.step("schemes").accuracy + 0.05
    a = {s.key.split("/")[1]: s.accuracy for s in res.steps if s.kind == "activations_only"}
    assert res.activation_scheme == max(a, key=a.get)
    assert res.step("adaround").options["layers"] == 3
    assert res.step("gptq").options["layers"] == 1 and res.step("seq_mse").options["layers"] == 1  # the Linear
    rs = res.step("range_search")
    assert rs.status == "evaluated" and rs.options["loss_after"] <= rs.options["loss_before"]
    assert fn(res.sim.model) == pytest.approx(res.accuracy, abs=1e-6)
    assert res.step("quantsim").options == {}


def test_layerwise_steps_default_to_low_bit_weights():
    model = _net()
    fn = Fidelity(model)
    assert not any(_aq(model, fn).layerwise_enabled(m) for m in ("seq_mse", "gptq"))  # 8-bit weights
    assert all(_aq(model, fn, param_bw=4).layerwise_enabled(m) for m in ("seq_mse", "gptq"))
    aq = _aq(model, fn, param_bw=4, gptq=False, seq_mse_kwargs={"num_candidates": 8})
    assert aq.layerwise_enabled("seq_mse") and not aq.layerwise_enabled("gptq")
    with pytest.raises(TypeError, match="seq_mse must be True, False or None"):
        _aq(model, fn, seq_mse="yes")
    with pytest.raises(ValueError, match="gptq_kwargs: 'checkpoint_dir' is set by AutoQuant"):
        _aq(model, fn, gptq_kwargs={"checkpoint_dir": "x"})


def test_range_search_step_can_be_left_out_and_its_own_arguments_are_checked(tmp_path):
    model = _net()
    fn = Fidelity(model)
    res = _aq(model, fn, range_search=False, adaround=False, bias_correction=None).optimize(
        allowed_accuracy_drop=0.0, output_dir=tmp_path)
    assert "range_search" not in _keys(res)
    with pytest.raises(ValueError, match="range_search_kwargs: 'checkpoint_dir' is set by AutoQuant"):
        _aq(model, fn, range_search_kwargs={"checkpoint_dir": "x"})


def test_stops_as_soon_as_the_target_is_met(tmp_path):
    model = _net()
    # a target between the first simulation and CLE's: the run ends right after the step that meets it
    fn = Fidelity(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = _aq(model, fn, param_bw=4, adaround=False).optimize(allowed_accuracy_drop=0.0, output_dir=tmp_path / "f")
    accs = {s.key: s.accuracy for s in full.steps}
    first_meeting = next(s for s in full.steps if s.kind == "full" and s.status == "evaluated"
                         and s.key != "quantsim" and s.accuracy > accs["quantsim"])
    drop = 1.0 - first_meeting.accuracy + 1e-9
    fn2 = Fidelity(model)
    res = _aq(model, fn2, param_bw=4, adaround=False).optimize(allowed_accuracy_drop=drop, output_dir=tmp_path / "g")
    assert res.target_met and res.best_step == first_meeting.key
    assert _keys(res)[-1] == first_meeting.key
    assert fn2.calls < fn.calls


# ---- cache and resume --------------------------------------------------------------------------------
def _files(res):
    return res.encodings_path.read_text()


def test_killed_run_resumes_without_recomputing_and_ends_identical(tmp_path):
    model = _net()
    # uninterrupted reference, in its own cache
    ref_fn = Fidelity(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _aq(model, ref_fn, param_bw=4).optimize(allowed_accuracy_drop=0.0, cache_dir=tmp_path / "ref")
    total = ref_fn.calls
    assert total >= 10
    k = 9  # dies on the 9th evaluation (a technique step), after 8 finished steps
    dying = Fidelity(model, fail_at=k)
    with pytest.raises(AutoQuantError, match="eval_fn raised KeyError") as ei:
        _aq(model, dying, param_bw=4).optimize(allowed_accuracy_drop=0.0, cache_dir=tmp_path / "c")
    assert isinstance(ei.value.__cause__, KeyError)
    assert len(list((tmp_path / "c" / "steps").glob("*.json"))) == k - 1
    again = Fidelity(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = _aq(model, again, param_bw=4).optimize(allowed_accuracy_drop=0.0, cache_dir=tmp_path / "c")
    assert again.calls == total - (k - 1)  # the finished steps were not evaluated again
    assert [s.cached for s in res.steps if s.status == "evaluated"][:k - 1] == [True] * (k - 1)
    assert [(s.key, s.status, s.accuracy) for s in res.steps] == [(s.key, s.status, s.accuracy) for s in ref.steps]
    assert res.best_step == ref.best_step and res.accuracy == ref.accuracy
    assert _files(res) == _files(ref)
    # a third run evaluates nothing and rebuilds the same simulation from the cached state
    idle = Fidelity(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res3 = _aq(model, idle, param_bw=4).optimize(allowed_accuracy_drop=0.0, cache_dir=tmp_path / "c")
    assert idle.calls == 0 and all(s.cached for s in res3.steps)
    assert _files(res3) == _files(ref)
    assert idle(res3.sim.model) == pytest.approx(ref.accuracy, abs=1e-6)


def test_changing_a_steps_own_settings_recomputes_that_step_only(tmp_path):
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = _aq(model, Fidelity(model), param_bw=4).optimize(allowed_accuracy_drop=0.0, cache_dir=tmp_path)
        fn = Fidelity(model)
        res = _aq(model, fn, param_bw=4, adaround_kwargs={**ADA, "iterations": 60}).optimize(
            allowed_accuracy_drop=0.0, cache_dir=tmp_path)
    assert fn.calls == 1  # AdaRound, the last step, again; nothing else
    assert [s.key for s in res.steps if not s.cached] == ["adaround"]
    assert res.step("adaround").options["iterations"] == 60 and first.step("adaround").options["iterations"] == 30
    assert res.step("adaround").settings == {"adaround_kwargs": {**ADA, "iterations": 60}}
    assert res.step("bias_correction").accuracy == first.step("bias_correction").accuracy


def test_cache_with_other_inputs_is_refused(tmp_path):
    model = _net()
    _aq(model, Fidelity(model), config="default").optimize(allowed_accuracy_drop=0.2, cache_dir=tmp_path)
    with pytest.raises(AutoQuantCacheError, match=r"param_bw: cached 8, now 4"):
        _aq(model, Fidelity(model), config="default", param_bw=4).optimize(allowed_accuracy_drop=0.2, cache_dir=tmp_path)
    other = _net(seed=1)
    with pytest.raises(AutoQuantCacheError, match="the model"):
        _aq(other, Fidelity(other), config="default").optimize(allowed_accuracy_drop=0.2, cache_dir=tmp_path)
    with pytest.raises(AutoQuantCacheError, match="calibration data"):
        AutoQuant(model, X_CAL[:1], X_CAL[:32], Fidelity(model), config="default", progress=False,
                  quant_schemes=("tf_enhanced", "min_max", "mse"), adaround_kwargs=ADA).optimize(
            allowed_accuracy_drop=0.2, cache_dir=tmp_path)
    (tmp_path.parent / "mine").mkdir(exist_ok=True)
    (tmp_path.parent / "mine" / "notes.txt").write_text("x")
    with pytest.raises(AutoQuantCacheError, match="not an AutoQuant cache"):
        _aq(model, Fidelity(model)).optimize(cache_dir=tmp_path.parent / "mine")


def test_a_cache_killed_while_writing_its_record_is_taken_up_again(tmp_path):
    """A run killed half-way through writing autoquant_cache.json leaves only the temporary file of that
    atomic write: the folder is still an AutoQuant cache, and the rerun writes the record whole."""
    from pyquant.autoquant.cache import StepCache
    (tmp_path / ".autoquant_cache.json.k9x2.tmp").write_text('{"format": 3, "finger')
    StepCache(tmp_path, {"model": "abc"})
    assert json.loads((tmp_path / "autoquant_cache.json").read_text())["fingerprint"] == {"model": "abc"}
    assert [p.name for p in tmp_path.iterdir()] == ["autoquant_cache.json"]  # the half-written file is gone
    other = tmp_path.parent / "other"
    other.mkdir()
    (other / ".notes.json.k9x2.tmp").write_text("x")  # a temporary file that is not the cache's record
    with pytest.raises(AutoQuantCacheError, match="not an AutoQuant cache"):
        StepCache(other, {"model": "abc"})


# ---- time budget, bad input --------------------------------------------------------------------------
def test_time_budget_returns_the_best_so_far_and_says_so(tmp_path):
    model = _net()
    fn = Fidelity(model)
    with pytest.warns(RuntimeWarning, match="time budget"):
        res = _aq(model, fn, param_bw=4).optimize(allowed_accuracy_drop=0.0, time_budget_s=1e-6, output_dir=tmp_path)
    assert res.budget_exhausted and not res.target_met
    assert _keys(res) == ["fp32", "quantsim"] and res.best_step == "quantsim"
    rep = json.loads(res.report_json_path.read_text())
    assert rep["summary"]["budget_exhausted"] is True
    assert rep["summary"]["stopped_before"] == "weights_only/tf_enhanced"
    assert "time budget stopped the search early" in res.report_path.read_text()


@pytest.mark.parametrize("ret, match", [("abc", "eval_fn must return a number"), (None, "eval_fn must return a number"),
                                        (float("nan"), "eval_fn returned nan"), (True, "eval_fn must return a number")])
def test_eval_fn_returning_a_non_number_is_named(tmp_path, ret, match):
    with pytest.raises(AutoQuantError, match=match):
        _aq(_net(), lambda m: ret).optimize(output_dir=tmp_path)


def test_eval_fn_that_raises_is_named(tmp_path):
    def bad(m):
        raise ValueError("no labels")
    with pytest.raises(AutoQuantError, match=r"eval_fn raised ValueError while evaluating step 'fp32': no labels"):
        _aq(_net(), bad).optimize(output_dir=tmp_path)


def test_eval_fn_may_return_a_tensor(tmp_path):
    res = _aq(_net(), lambda m: torch.tensor(0.5), config="default").optimize(output_dir=tmp_path)
    assert res.accuracy == 0.5 and res.best_step == "quantsim"


@pytest.mark.parametrize("kw, match", [
    (dict(param_bw=1), r"param_bw must be an int in 2\.\.16"), (dict(output_bw=17), "output_bw"),
    (dict(quant_schemes=("tf_enhanced", "best")), "quant_schemes must be"), (dict(quant_schemes=()), "quant_schemes"),
    (dict(batch_size=0), "batch_size"), (dict(bias_correction="exact"), "bias_correction must be one of"),
    (dict(config="no_such_profile"), "neither a named profile"),
    (dict(adaround_kwargs={"param_bw": 4}), "adaround_kwargs: 'param_bw' is set by AutoQuant")])
def test_bad_arguments_name_themselves(kw, match):
    m = _net()
    with pytest.raises(ValueError, match=match):
        AutoQuant(m, X_CAL[:1], X_CAL, Fidelity(m), **kw)


def test_bad_optimize_arguments_and_data():
    m = _net()
    aq = _aq(m, Fidelity(m))
    with pytest.raises(ValueError, match="allowed_accuracy_drop must be a finite number >= 0"):
        aq.optimize(allowed_accuracy_drop=-0.1)
    with pytest.raises(ValueError, match="time_budget_s must be a positive number"):
        aq.optimize(time_budget_s=0)
    with pytest.raises(TypeError, match="eval_fn must be callable"):
        AutoQuant(m, X_CAL[:1], X_CAL, 0.5)
    with pytest.raises(ValueError, match="data: the iterable yielded no batches"):
        AutoQuant(m, X_CAL[:1], [], Fidelity(m))
    with pytest.raises(TypeError, match=r"data\[1\]: batches must be tensors"):
        AutoQuant(m, X_CAL[:1], [X_CAL[:8], "text"], Fidelity(m))


# ---- steps that do not apply -------------------------------------------------------------------------
class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(12, 24), nn.Linear(24, 4)

    def forward(self, x):
        return self.b(nn.functional.gelu(self.a(x)))


def test_steps_that_do_not_apply_are_skipped_with_a_reason(tmp_path):
    model = _Mlp().eval()
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    fn = lambda m: 1.0 - float((m(x) - ref).norm() / ref.norm())  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = AutoQuant(model, x[:1], x, fn, param_bw=3, output_bw=4, progress=False, quant_schemes=("min_max",),
                        adaround_kwargs=ADA).optimize(allowed_accuracy_drop=0.0, output_dir=tmp_path)
    st = {s.key: s for s in res.steps}
    assert st["cle"].status == "skipped" and "no Conv/Linear layer pair" in st["cle"].reason  # GELU blocks it
    assert st["cle+hba"].status == "skipped"
    assert st["bias_correction"].status == "evaluated" and st["adaround"].status == "evaluated"
    assert not any(s.status == "failed" for s in res.steps)
    assert "batch-norm folding" not in res.applied  # nothing to fold


# ---- report ------------------------------------------------------------------------------------------
def test_report_is_one_offline_page_with_every_step_and_the_encodings(tmp_path):
    model = _net()
    fn = Fidelity(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = _aq(model, fn, param_bw=4, adaround=False).optimize(allowed_accuracy_drop=0.0, output_dir=tmp_path)
    page = res.report_path.read_text()
    assert "<style>" in page and "<link" not in page and "<script" not in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "http" not in page
    uris = re.findall(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 1
    svg = base64.b64decode(uris[0]).decode()
    evaluated = [s for s in res.steps if s.status == "evaluated"]
    assert svg.count("<rect") == len(evaluated)
    for s in res.steps:
        assert f"<td>{s.key}</td>" in page
    rep = json.loads(res.report_json_path.read_text())
    assert [s["key"] for s in rep["steps"]] == _keys(res)
    assert [s["accuracy"] for s in rep["steps"]] == [s.accuracy for s in res.steps]
    assert rep["summary"]["best_step"] == res.best_step and rep["summary"]["applied"] == res.applied
    assert {e["name"] for e in rep["encodings"]["param_encodings"]} == set(res.sim.param_quantizers)
    # the encodings file loads back into a simulation of the chosen model and gives the same outputs
    act, par = pyquant.load_encodings(res.encodings_path)
    assert set(par) == set(res.sim.param_quantizers) and set(act) <= set(res.sim.activation_quantizers)
    for name, enc in par.items():
        assert torch.allclose(enc.scale.flatten(), res.sim.param_quantizers[name].get_encoding().scale.flatten())


# ---- a real model and data set -----------------------------------------------------------------------
def test_fashion_mnist_w4a8_meets_one_point(tmp_path):
    from pyquant.models.fashion_cnn import evaluate
    model, xtr, xte, yte = fashion_mnist_or_skip()
    xte, yte = xte[:1000], yte[:1000]
    res = AutoQuant(model, xtr[:1], xtr[:256], lambda m: evaluate(m, xte, yte), param_bw=4, output_bw=8,
                    progress=False, adaround_kwargs={"iterations": 200}).optimize(allowed_accuracy_drop=0.01,
                                                                                   output_dir=tmp_path)
    assert res.fp32_accuracy > 0.85
    assert res.target_met and res.fp32_accuracy - res.accuracy <= 0.01
    assert evaluate(res.sim.model, xte, yte) == pytest.approx(res.accuracy)


def test_eval_fn_key_does_not_depend_on_where_its_code_lives():
    """The same eval_fn source compiled twice (as in a rerun in a new process) gives the same cache key,
    though its nested code objects live at other addresses; different code gives another key."""
    from pyquant._fingerprint import callable_digest as _callable_digest
    src = "def metric(m):\n    return sum(x for x in [1, 2] if x in {1, 2}) / 3\n"
    ns1, ns2 = {}, {}
    exec(compile(src, "a.py", "exec"), ns1)
    exec(compile(src, "b.py", "exec"), ns2)
    assert repr(ns1["metric"].__code__.co_consts) != repr(ns2["metric"].__code__.co_consts)  # other addresses
    assert _callable_digest(ns1["metric"]) == _callable_digest(ns2["metric"])
    exec(compile(src.replace("/ 3", "/ 4"), "c.py", "exec"), ns2)
    assert _callable_digest(ns1["metric"]) != _callable_digest(ns2["metric"])


def test_a_cache_of_an_older_format_is_refused_naming_it(tmp_path):
    """Steps cached before the simulation added biases on the int32 grid (format 2) measured another
    simulation: the cache is refused, not reused."""
    from pyquant.autoquant import AutoQuantCacheError
    from pyquant.autoquant.cache import FORMAT, StepCache
    (tmp_path / "autoquant_cache.json").write_text(json.dumps({"format": 2, "fingerprint": {"a": "1"}}))
    with pytest.raises(AutoQuantCacheError, match=rf"format 2, this one writes {FORMAT}"):
        StepCache(tmp_path, {"a": "1"})
    assert FORMAT >= 3


def test_transformer_with_dict_batches_runs_bias_correction_and_adaround(tmp_path):
    pytest.importorskip("transformers")
    from zoo import tiny_llama
    torch.manual_seed(0)
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 256, (2, 8), generator=g)} for _ in range(2)]
    ids = torch.randint(0, 256, (4, 8), generator=g)
    with torch.no_grad():
        ref = model(input_ids=ids).logits

    def fidelity(m):
        with torch.no_grad():
            out = m(input_ids=ids)
        logits = getattr(out, "logits", out)
        return 1.0 - float((logits - ref).norm() / ref.norm())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = AutoQuant(model, calib[0], calib, fidelity, param_bw=4, progress=False, quant_schemes=("min_max",),
                        seq_mse=False, gptq=False, smoothing_alpha=None,
                        adaround_kwargs={"iterations": 10, "batch_size": 2, "positions_per_sample": 8}
                        ).optimize(allowed_accuracy_drop=0.0, output_dir=tmp_path)
    st = {s.key: s for s in res.steps}
    for key in ("bias_correction", "adaround"):  # no longer skipped for dict batches
        assert st[key].status == "evaluated", (key, st[key].status, st[key].reason)
    assert st["adaround"].options["layers"] == 15
    # no Conv/Linear pair of a Llama is joined by a positively homogeneous activation: the real reason
    assert st["cle"].status == "skipped" and "positively homogeneous" in st["cle"].reason, st["cle"].reason
    assert "dicts" not in " ".join(s.reason for s in res.steps)
    assert not any(s.status == "failed" for s in res.steps), [(s.key, s.reason) for s in res.steps]
