"""AutoQuant's opt-in mixed-precision step: off by default; once the target is met it lowers the best
simulation's bit widths and keeps the cheaper mix only while it meets the target; a rerun takes it from
the cache."""
from __future__ import annotations

import pytest

from test_autoquant import Fidelity, _aq, _keys, _net


def test_mixed_precision_is_off_by_default():
    model = _net()
    aq = _aq(model, Fidelity(model))
    assert aq.mixed_precision_candidates is None


def test_mixed_precision_step_keeps_a_cheaper_mix_that_meets_the_target(tmp_path):
    model = _net()
    fn = Fidelity(model)
    res = _aq(model, fn, config="default", mixed_precision="w4a8,w8a8,w8a16",
              mixed_precision_kwargs={"pareto_points": 2}).optimize(
        allowed_accuracy_drop=0.2, cache_dir=tmp_path / "cache", output_dir=tmp_path)
    assert _keys(res) == ["fp32", "quantsim", "mixed_precision"]
    step = res.step("mixed_precision")
    assert step.status == "evaluated" and step.improved and res.best_step == "mixed_precision"
    assert res.target_met and res.fp32_accuracy - res.accuracy <= 0.2
    assert step.options["relative_cost"] < 1.0 and sum(step.options["mix"].values()) == 3
    assert "mixed precision" in res.applied
    # the result is what was measured, at the widths of the mix
    assert fn(res.sim.model) == pytest.approx(res.accuracy, abs=1e-6)
    assert {q.bitwidth for q in res.sim.param_quantizers.values()} & {4}
    # a rerun takes every step from the cache, mixed precision included
    again = _aq(model, Fidelity(model), config="default", mixed_precision="w4a8,w8a8,w8a16",
                mixed_precision_kwargs={"pareto_points": 2}).optimize(
        allowed_accuracy_drop=0.2, cache_dir=tmp_path / "cache", output_dir=tmp_path)
    assert again.step("mixed_precision").cached and again.accuracy == res.accuracy
    assert {n: q.bitwidth for n, q in again.sim.quantizers.items()} == \
        {n: q.bitwidth for n, q in res.sim.quantizers.items()}


def test_mixed_precision_arguments_are_checked():
    model = _net()
    with pytest.raises(ValueError, match="'w4x8'"):
        _aq(model, Fidelity(model), mixed_precision="w4x8")
    with pytest.raises(ValueError, match="mixed_precision_kwargs: 'checkpoint_dir' is set by AutoQuant"):
        _aq(model, Fidelity(model), mixed_precision="w8a8", mixed_precision_kwargs={"checkpoint_dir": "x"})
