"""Fuzzing of pyquant's input boundaries in CI: malformed and adversarial encodings files, hardware configs,
QuantSim checkpoints, command lines and op arguments (fuzz_strategies.py, fuzz_targets.py). Each input must be
accepted with a valid result or refused with the documented exception type naming the offending entry
(docs/design.md, section 12). Generation is derandomized, so every run tries the same inputs; bench/fuzz.py
runs the same targets with 10,000+ examples each."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

import pyquant.ops as pqo
from fuzz_targets import DATA, TARGETS, FuzzFailure, encodings_seeds, run_checkpoint, run_encodings, sims

CI_EXAMPLES = {"encodings": 300, "config": 300, "checkpoint": 150, "cli": 300, "ops": 400}


def _fuzz_test(name: str):
    target = TARGETS[name]

    @settings(max_examples=CI_EXAMPLES[name], derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                     HealthCheck.large_base_example])
    @given(target.strategy())
    def test(example):
        target.run(example)

    test.__name__ = f"test_fuzz_{name}"
    test.__doc__ = f"{target.what}: accepted and valid, or refused with a documented error naming the entry."
    return test


test_fuzz_encodings = _fuzz_test("encodings")
test_fuzz_config = _fuzz_test("config")
test_fuzz_checkpoint = _fuzz_test("checkpoint")
test_fuzz_cli = _fuzz_test("cli")
test_fuzz_ops = _fuzz_test("ops")


# ---- the judge itself: it must fail on what it is there to catch --------------------------------------------
def test_judge_fails_an_accepted_invalid_encoding(monkeypatch):
    """A reader that let a negative scale through would be caught."""
    import pyquant.sim.encodings as encodings
    from pyquant.quant import from_scale_offset
    from pyquant.sim.encodings_types import EncodingsFile
    bad = from_scale_offset(torch.tensor(-0.5), torch.tensor(0.0), 8, False)
    monkeypatch.setattr(encodings, "parse_encodings", lambda *a, **k: EncodingsFile("1.0.0", {"a": bad}, {}))
    doc = json.loads(encodings_seeds()["per_channel/1.0.0"])
    with pytest.raises(FuzzFailure, match="accepted scale"):
        run_encodings({"seed": "per_channel/1.0.0", "mode": "tree", "doc": doc, "params": None, "steps": []})


def test_judge_fails_an_undocumented_exception(monkeypatch):
    """Without the checkpoint check, a quantizer entry that lost a flag fails with KeyError in
    load_state_flags; the judge calls that a failure. With the check it is a CheckpointError."""
    import copy

    import pyquant.sim.quantsim as quantsim
    from fuzz_targets import checkpoint_seeds
    name = next(iter(sims()["per_channel"].quantizers))
    state = copy.deepcopy(checkpoint_seeds()["per_channel"][0])
    del state["quantizers"][name]["enabled"]
    example = {"sim": "per_channel", "state": state, "steps": [("drop", ("quantizers", name, "enabled"))]}
    assert run_checkpoint(example) == "CheckpointError"
    monkeypatch.setattr(quantsim, "check_checkpoint", lambda *a, **k: None)
    with pytest.raises(FuzzFailure, match="undocumented KeyError"):
        run_checkpoint(example)


# ---- the bugs fuzzing found, one example each ---------------------------------------------------------------
def test_encodings_refuse_scales_beyond_float32(tmp_path):
    from pyquant.sim.encodings import EncodingsError, parse_encodings
    doc = {"version": "1.0.0", "activation_encodings": [
        {"name": "a", "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False, "scale": [1e300],
         "offset": [0]}], "param_encodings": []}
    with pytest.raises(EncodingsError, match=r"activation_encodings\[0\] \('a'\)\.scale: values beyond float32"):
        parse_encodings(doc)
    doc["activation_encodings"][0]["bw"] = 10 ** 400  # raised OverflowError; now set aside like any >16-bit entry
    out = parse_encodings(doc)
    assert list(out.skipped) == ["a"] and not out.activation


def test_encodings_refuse_undecodable_and_overdeep_files(tmp_path):
    from pyquant.sim.encodings import EncodingsError, read_encodings
    path = tmp_path / "x.encodings"
    for data, what in ((b'{"version": "1.0.0", "x": "\xff"}', "not UTF-8"), (b"[" * 100_000 + b"]" * 100_000,
                                                                           "nested too deeply"),
                       (b'{"version": ' + b"1" * 5000 + b"}", "not valid JSON")):
        path.write_bytes(data)
        with pytest.raises(EncodingsError, match=what) as err:
            read_encodings(path)
        assert str(path) in str(err.value)


def test_encodings_refuse_an_output_dtype_with_thousands_of_digits():
    from pyquant.sim.encodings import EncodingsError, parse_encodings
    doc = {"version": "2.0.0", "encodings": [{"name": "a", "output_dtype": "int" + "9" * 5000, "y_scale": 0.1}]}
    with pytest.raises(EncodingsError, match=r"encodings\[0\] \('a'\): output_dtype"):
        parse_encodings(doc)


def test_encodings_refuse_wrong_top_level_types():
    from pyquant.sim.encodings import EncodingsError, parse_encodings
    for key, value in (("excluded_layers", 5), ("excluded_layers", "conv1"), ("producer", [1]),
                       ("quantizer_args", [8])):
        with pytest.raises(EncodingsError, match=key):
            parse_encodings({"version": "1.0.0", "activation_encodings": [], "param_encodings": [], key: value})


def test_encodings_shapes_argument_is_checked():
    from pyquant.sim.encodings import parse_encodings
    doc = json.loads(encodings_seeds()["per_channel/1.0.0"])
    name = doc["param_encodings"][0]["name"]
    with pytest.raises(ValueError, match=rf"shapes\['{name}'\]"):
        parse_encodings(doc, shapes={name: (-1, -4)})
    with pytest.raises(ValueError, match=rf"shapes\['{name}'\]"):
        parse_encodings(doc, shapes={name: 4})


def test_encodings_refuse_lpbq_integer_scales_beyond_float32():
    from pyquant.sim.encodings import EncodingsError, parse_encodings
    doc = json.loads((DATA / "aimet_lpbq_v2.encodings").read_text())
    entry = next(e for e in doc["encodings"] if "per_block_int_scale" in e)
    entry["per_block_int_scale"][0][0] = 1e164  # finite in the file; inf in float32 made log2 overflow
    with pytest.raises(EncodingsError, match="per_block_int_scale: values beyond float32"):
        parse_encodings(doc)


def test_config_numbers_beyond_float_range_are_config_errors():
    from pyquant.sim.config import ConfigError, load_config
    cfg = {"op_type": {"Softmax": {"encoding_constraints": {"min": 0, "max": 10 ** 400}}}}
    with pytest.raises(ConfigError, match=r"^op_type\.Softmax\.encoding_constraints\.max: expected a finite"):
        load_config(cfg)


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    from pyquant.sim.config import ConfigError, load_config
    path = tmp_path / "c.json"
    path.write_bytes(b'{"defaults": {"hw_version": "\xff"}}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_cli_threads_out_of_range_is_a_usage_error(capsys):
    from pyquant.cli import MAX_THREADS, main
    threads = torch.get_num_threads()
    try:
        assert main(["export", "fuzz_specs:returns_none", "--threads", str(10 ** 20)]) == 2
    finally:
        torch.set_num_threads(threads)
    assert f"--threads: must be in 1..{MAX_THREADS}" in capsys.readouterr().err


def test_checkpoint_with_negative_scale_is_refused_and_changes_nothing(tmp_path):
    from pyquant import CheckpointError
    sim = sims()["per_channel"]
    path = tmp_path / "c.pt"
    sim.save_checkpoint(path)
    state = torch.load(path, weights_only=True)
    key = next(k for k in state["model"] if k.endswith(".scale") and bool(state["model"][k.replace(
        ".scale", ".initialized")]))
    before = {k: v.clone() for k, v in sim.model.state_dict().items()}
    state["model"][key] = -state["model"][key]
    state["model"][next(iter(state["model"]))] += 1.0  # a weight change that must not be applied either
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"{key}.*positive"):
        sim.load_checkpoint(path)
    after = sim.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ops_empty_dimension_with_whole_dimension_blocks():
    """block_size -1 on an empty dimension raised ZeroDivisionError; per channel along an empty dimension
    failed in the native layout. Both give the empty result now, as the pure-torch formula does."""
    x = torch.randn(0, 6)
    y = pqo.quantize_dequantize(x, torch.full((1, 2), 0.1), block_size=(-1, 3))
    assert y.shape == x.shape
    y = pqo.quantize_dequantize(x, torch.ones(0), axis=0)
    assert y.shape == x.shape and y.dtype == x.dtype
    xg = torch.randn(0, 6, requires_grad=True)
    s = torch.ones(0, 1, requires_grad=True)
    torch.ops.pyquant.quantize_dequantize(xg, s, torch.zeros(0, 1), 0, 255).sum().backward()
    assert s.grad.shape == (0, 1) and xg.grad.shape == (0, 6)


def test_adaround_weight_with_per_row_scale_and_one_offset():
    """The native kernel read scale and offset at one count: a per-row scale with a single offset read past the
    offset's end (garbage results), a single scale with per-row offsets used the first offset everywhere."""
    from pyquant.ops import _reference as ref
    w, alpha = torch.randn(4, 3), torch.randn(4, 3)
    s, o = torch.rand(4) * 0.1 + 0.01, torch.tensor([-3.0, 0.0, 2.0, 5.0])
    for scale, offset in ((s, torch.tensor([-3.0])), (s[:1], o)):
        got = torch.ops.pyquant.adaround_weight(w, alpha, scale, offset, -8, 7)
        want = ref.adaround_weight(w, alpha, scale.expand(4), offset.expand(4), -8, 7)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        g = torch.randn(4, 3)
        got = torch.ops.pyquant.adaround_weight_backward(g, w, alpha, scale, offset, -8, 7)
        want = ref.adaround_weight_backward(g, w, alpha, scale.expand(4), offset.expand(4), -8, 7)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("call, match", [
    (lambda: pqo.quantize_dequantize(torch.randn(4), 0.1, math.nan), "offset must be finite"),
    (lambda: pqo.dequantize(torch.randn(4).double(), 0.1), "q must be one of"),
    (lambda: pqo.quantize(torch.randn(4), 0.1, out_dtype="int8"), "out_dtype must be a torch.dtype"),
    (lambda: pqo.quantize_dequantize_int32(torch.randn(3), torch.ones(5)), "scale of shape"),
    (lambda: pqo.adaround_weight(torch.randn(4, 2), torch.randn(4, 2), 0.0), "scale must be positive"),
    (lambda: pqo.adaround_weight(torch.randn(4, 2), torch.randn(4, 2), 0.1, math.inf), "offset must be finite"),
    (lambda: pqo.adaround_init_alpha(torch.randn(4, 2), -0.1), "scale must be positive"),
    (lambda: pqo.adaround_init_alpha(torch.randn(4, 2), torch.ones(5)), "scale must have 1 value"),
    (lambda: pqo.adaround_regularizer(torch.randn(4), -1.0), "beta must be"),
    (lambda: pqo.adaround_regularizer(torch.randn(4), math.nan), "beta must be"),
])
def test_ops_refuse_what_fuzzing_found(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
