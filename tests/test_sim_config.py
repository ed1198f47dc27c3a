"""Hardware config (pyquant.sim.config): shipped profiles, rule precedence, error messages, AIMET's file."""
import copy
import json
import os
import pathlib
import warnings

import pytest

from pyquant.sim.config import (PROFILES, ConfigError, ConfigWarning, HardwareConfig, ParamRule, load_config,
                                profile_path)

DATA = pathlib.Path(__file__).parent / "data"


def _quiet_load(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shipped profile must not warn
        return load_config(cfg)


# ---------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROFILES)
def test_profiles_load_and_round_trip(name):
    cfg = _quiet_load(name)
    assert isinstance(cfg, HardwareConfig)
    assert cfg.source == name
    assert load_config(cfg.to_dict()) == cfg
    # the shipped file is exactly what to_dict writes back (nothing in it is ignored)
    with open(profile_path(name)) as f:
        assert cfg.to_dict() == json.load(f)
    # the six sections AIMET requires are always written
    assert {"defaults", "params", "op_type", "supergroups", "model_input", "model_output"} <= set(cfg.to_dict())
    assert load_config(pathlib.Path(profile_path(name))) == cfg
    assert load_config(cfg) is cfg


def test_default_profile_semantics():
    cfg = _quiet_load("default")
    for op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        assert cfg.per_channel(op), op
        assert cfg.param_rule(op, "weight") == ParamRule(is_quantized=True, is_symmetric=True)
        assert not cfg.param_rule(op, "bias").is_quantized
    assert not cfg.per_channel("Add") and not cfg.per_channel(None)
    for op in ("Conv", "Relu", "Add", "Gemm", "SomethingElse", None, ""):
        assert cfg.output_quantized(op), op
        assert not cfg.activation_symmetric(op), op
        assert not cfg.input_quantized(op), op
    assert not cfg.output_quantized("Cast")
    assert not cfg.param_rule("BatchNormalization", "running_mean").is_quantized
    assert not cfg.param_rule("BatchNormalization", "running_var").is_quantized
    assert cfg.param_rule("BatchNormalization", "weight").is_quantized
    assert cfg.encoding_constraint("Softmax") == (0.0, 1.0)
    assert cfg.encoding_constraint("Conv") is None
    groups = cfg.supergroups
    assert isinstance(groups, list) and all(isinstance(g, tuple) for g in groups)
    for g in [("Conv", "Relu"), ("Conv", "Clip"), ("Conv", "BatchNormalization", "Relu"), ("Add", "Relu"),
              ("Gemm", "Relu")]:
        assert g in groups
    # longer patterns come first, so Conv+BN+Relu is not cut short by a shorter group
    assert groups.index(("Conv", "BatchNormalization", "Relu")) < groups.index(("Conv", "Relu"))
    assert cfg.model_input_quantized and cfg.model_output_quantized
    assert not cfg.strict_symmetric and not cfg.unsigned_symmetric
    assert cfg.hw_version is None and cfg.supported_kernels("Conv") == ()


def test_per_tensor_and_strict_profiles():
    pt = _quiet_load("per_tensor")
    for op in ("Conv", "ConvTranspose", "Gemm", "MatMul", None):
        assert not pt.per_channel(op)
    assert pt.param_rule("Conv", "weight") == ParamRule(True, True)
    assert pt.supergroups == _quiet_load("default").supergroups
    ss = _quiet_load("strict_symmetric_int8")
    assert ss.strict_symmetric and not ss.unsigned_symmetric
    assert ss.activation_symmetric("Relu") and ss.activation_symmetric(None)
    assert ss.param_rule("Gemm", "weight") == ParamRule(True, True)
    assert ss.per_channel("Conv")


# ---------------------------------------------------------------------------------------------
# Precedence
# ---------------------------------------------------------------------------------------------
PRECEDENCE = {
    "defaults": {
        "ops": {"is_output_quantized": "True", "is_symmetric": "True"},
        "params": {"is_quantized": "True", "is_symmetric": "False"},
        "per_channel_quantization": "True",
    },
    "params": {"weight": {"is_symmetric": "True"}, "bias": {"is_quantized": "False"}},
    "op_type": {
        "Gemm": {"per_channel_quantization": "False", "params": {"weight": {"is_symmetric": "False"}}},
        "LayerNormalization": {"params": {"bias": {"is_quantized": "True"}}},
        "Relu": {"is_symmetric": "False", "encoding_constraints": {"min": 0.0}},
        "Cast": {"is_output_quantized": "False"},
        "Concat": {"is_input_quantized": "True"},
    },
    "supergroups": [],
    "model_input": {},
    "model_output": {},
}


def test_param_rule_precedence():
    cfg = load_config(PRECEDENCE)
    # params.weight beats defaults.params; op_type.Gemm.params.weight beats params.weight
    assert cfg.param_rule("Conv", "weight") == ParamRule(is_quantized=True, is_symmetric=True)
    assert cfg.param_rule("Gemm", "weight") == ParamRule(is_quantized=True, is_symmetric=False)
    assert cfg.param_rule(None, "weight") == ParamRule(True, True)
    # field by field: bias is_quantized from params.bias, is_symmetric from defaults.params
    assert cfg.param_rule("Conv", "bias") == ParamRule(is_quantized=False, is_symmetric=False)
    assert cfg.param_rule("LayerNormalization", "bias") == ParamRule(is_quantized=True, is_symmetric=False)
    # a parameter named nowhere gets defaults.params
    assert cfg.param_rule("Conv", "gamma") == ParamRule(True, False)


def test_op_rule_precedence():
    cfg = load_config(PRECEDENCE)
    assert cfg.per_channel("Conv") and not cfg.per_channel("Gemm")
    assert cfg.activation_symmetric("Conv") and not cfg.activation_symmetric("Relu")
    assert cfg.output_quantized("Relu") and not cfg.output_quantized("Cast")
    assert cfg.input_quantized("Concat") and not cfg.input_quantized("Conv")
    assert cfg.encoding_constraint("Relu") == (0.0, None)  # min only: the max is still calibrated
    assert not cfg.model_input_quantized and not cfg.model_output_quantized


def test_empty_config_defaults():
    cfg = load_config({})
    assert cfg.param_rule("Conv", "weight") == ParamRule(False, False)
    assert not cfg.output_quantized("Conv") and not cfg.per_channel("Conv") and cfg.supergroups == []
    assert load_config(cfg.to_dict()) == cfg


def test_supported_kernels_and_hw_version():
    d = copy.deepcopy(PRECEDENCE)
    d["defaults"]["hw_version"] = "V73"
    d["defaults"]["supported_kernels"] = [{"activation": {"bitwidth": 8, "dtype": "int"},
                                           "param": {"bitwidth": 8, "dtype": "int"}}]
    d["op_type"]["Softmax"] = {"supported_kernels": [{"activation": {"bitwidth": 16, "dtype": "float"}}]}
    cfg = load_config(d)
    assert cfg.hw_version == "V73"
    assert cfg.supported_kernels("Conv")[0].param.bitwidth == 8
    k = cfg.supported_kernels("Softmax")[0]
    assert (k.activation.dtype, k.activation.bitwidth, k.param) == ("float", 16, None)
    assert cfg.to_dict()["op_type"]["Softmax"] == d["op_type"]["Softmax"]
    assert load_config(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------
# Errors name the JSON path
# ---------------------------------------------------------------------------------------------
def _set(d, path, value):
    *keys, last = path
    for k in keys:
        d = d[k]
    if value is _DELETE:
        del d[last]
    else:
        d[last] = value


_DELETE = object()
_BASE = json.loads((DATA / "aimet_default_config.json").read_text())
_BASE["op_type"]["Conv"] = {"params": {"weight": {"is_symmetric": "True"}}}
_BASE["op_type"]["Softmax"] = {"encoding_constraints": {"min": 0.0, "max": 1.0}}

ERRORS = [
    # bad boolean strings / JSON booleans
    (("op_type", "Conv", "params", "weight", "is_symmetric"), "yes",
     'op_type.Conv.params.weight.is_symmetric: expected "True" or "False", got "yes"'),
    (("defaults", "per_channel_quantization"), True,
     'defaults.per_channel_quantization: expected "True" or "False", got true'),
    (("model_input", "is_input_quantized"), "true", 'model_input.is_input_quantized: expected "True" or "False"'),
    # unknown keys
    (("op_type", "Conv", "per_channel"), "True", "op_type.Conv.per_channel: unknown key; expected one of"),
    (("defaults", "params", "is_quantised"), "True", "defaults.params.is_quantised: unknown key"),
    (("params", "bias", "quantized"), "False", "params.bias.quantized: unknown key"),
    (("model_output", "is_input_quantized"), "True", "model_output.is_input_quantized: unknown key"),
    (("supergroups", 0, "ops"), ["Conv", "Relu"], "supergroups[0].ops: unknown key"),
    # unknown top-level section
    (("op_types",), {}, "op_types: unknown section; expected one of defaults, params, op_type"),
    # wrong types
    (("op_type", "Conv"), [], "op_type.Conv: expected an object, got an array"),
    (("params", "bias"), "False", 'params.bias: expected an object, got a string "False"'),
    (("supergroups",), {"op_list": ["Conv", "Relu"]}, "supergroups: expected an array, got an object"),
    (("supergroups", 1, "op_list", 1), 3, "supergroups[1].op_list[1]: expected a string, got a number 3"),
    (("defaults", "hw_version"), 73, "defaults.hw_version: expected a string, got a number 73"),
    (("op_type", "Softmax", "encoding_constraints", "min"), "0",
     'op_type.Softmax.encoding_constraints.min: expected a number, got a string "0"'),
    # bad values
    (("supergroups", 2, "op_list"), ["Conv"], "supergroups[2].op_list: a supergroup needs at least 2 ops, got 1"),
    (("op_type", "Softmax", "encoding_constraints", "max"), -1.0,
     "op_type.Softmax.encoding_constraints: min must be less than max"),
    (("op_type", "Softmax", "encoding_constraints"), {},
     "op_type.Softmax.encoding_constraints: give min, max or both"),
    (("supergroups", 0, "op_list"), _DELETE, "supergroups[0].op_list: missing (required)"),
    (("defaults", "supported_kernels"), [{"activation": {"bitwidth": 12, "dtype": "int"},
                                          "param": {"bitwidth": 8, "dtype": "int"}}],
     "defaults.supported_kernels[0].activation.bitwidth: expected one of 4, 8, 16, 32, got 12"),
    (("defaults", "supported_kernels"), [{"activation": {"bitwidth": 8, "dtype": "int"}}],
     "defaults.supported_kernels[0].param: missing"),
    (("supergroup_pass_list",), "MatmulAdd", "supergroup_pass_list: expected an array"),
]


@pytest.mark.parametrize("path,value,message", ERRORS, ids=[m.split(":")[0] for _, _, m in ERRORS])
def test_errors_name_the_json_path(path, value, message):
    d = copy.deepcopy(_BASE)
    _set(d, path, value)
    with pytest.raises(ConfigError) as ei:
        load_config(d)
    assert str(ei.value).startswith(message), str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_error_kinds_covered():
    """At least six kinds of mistake: bad boolean, unknown key, unknown section, wrong type, bad value,
    missing required entry."""
    kinds = {"expected \"True\"", "unknown key", "unknown section", "expected an object", "expected a number",
             "at least 2 ops", "missing (required)", "min must be less than max"}
    found = {k for k in kinds for _, _, m in ERRORS if k in m}
    assert found == kinds


def test_top_level_and_file_errors(tmp_path):
    arr = tmp_path / "array.json"
    arr.write_text("[]")
    with pytest.raises(ConfigError, match=r"^\(top level\): expected an object, got an array"):
        load_config(arr)
    with pytest.raises(ConfigError, match="neither a named profile .* nor an existing JSON file"):
        load_config("no_such_profile")
    with pytest.raises(ConfigError, match="default, per_tensor, strict_symmetric_int8, layer_inputs"):
        load_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"defaults": {"ops": {}},\n  "params": {,}}')
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON \(line 2, column"):
        load_config(bad)
    with pytest.raises(ConfigError, match="profile name, a JSON path or a dict"):
        load_config(42)


def test_unknown_onnx_op_warns_but_loads():
    d = copy.deepcopy(_BASE)
    d["op_type"]["MyFusedOp"] = {"is_output_quantized": "False"}
    d["supergroups"].append({"op_list": ["Conv", "Swishy"]})
    with pytest.warns(ConfigWarning, match=r"op_type\.MyFusedOp.*Swishy"):
        cfg = load_config(d)
    assert not cfg.output_quantized("MyFusedOp")
    assert ("Conv", "Swishy") in cfg.supergroups


# ---------------------------------------------------------------------------------------------
# AIMET's own default config
# ---------------------------------------------------------------------------------------------
def test_aimet_default_config_loads():
    path = DATA / "aimet_default_config.json"
    cfg = _quiet_load(path)
    raw = json.loads(path.read_text())
    assert cfg.to_dict() == raw  # every entry understood, nothing lost
    assert not cfg.per_channel("Conv")
    assert cfg.param_rule("Conv", "weight") == ParamRule(True, True)
    assert not cfg.param_rule("Conv", "bias").is_quantized
    assert not cfg.param_rule("BatchNormalization", "running_var").is_quantized
    assert not cfg.output_quantized("Cast") and cfg.output_quantized("Conv")
    assert not cfg.activation_symmetric("Conv")
    assert cfg.supergroups == [("Conv", "Relu"), ("ConvTranspose", "Relu"), ("Conv", "Clip"), ("Add", "Relu"),
                               ("Gemm", "Relu")]
    assert cfg.supergroup_pass_list == ("MatmulAdd",)
    assert cfg.model_input_quantized and not cfg.model_output_quantized
    assert cfg.strict_symmetric is False


def test_save_and_reload(tmp_path):
    cfg = _quiet_load("default")
    cfg.save(tmp_path / "c.json")
    again = load_config(tmp_path / "c.json")
    assert again == cfg and again.source == str(tmp_path / "c.json")


# ---------------------------------------------------------------------------------------------
# save is atomic: a failed save leaves an existing file as it was
# ---------------------------------------------------------------------------------------------
def _saved_file(tmp_path):
    path = tmp_path / "c.json"
    _quiet_load("per_tensor").save(path)
    return path, path.read_bytes()


def _assert_untouched(path, old):
    assert path.read_bytes() == old
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind


def test_save_failing_to_serialize_leaves_the_existing_file(tmp_path, monkeypatch):
    path, old = _saved_file(tmp_path)
    new = _quiet_load("default")

    def failing_to_dict(self):
        raise TypeError("not serializable")

    monkeypatch.setattr(HardwareConfig, "to_dict", failing_to_dict)
    with pytest.raises(TypeError, match="not serializable"):
        new.save(path)
    _assert_untouched(path, old)


def test_save_failing_mid_write_leaves_the_existing_file(tmp_path, monkeypatch):
    path, old = _saved_file(tmp_path)
    new = _quiet_load("default")
    listings = []

    def failing_fsync(fd):  # the new text is in the temporary file; the disk fails before the rename
        listings.append(sorted(os.listdir(tmp_path)))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        new.save(path)
    monkeypatch.undo()
    assert len(listings[0]) == 2  # the temporary file sat beside the old one
    _assert_untouched(path, old)
    assert load_config(path) == _quiet_load("per_tensor")


def test_layer_inputs_profile_quantizes_only_the_matrix_products():
    """`layer_inputs`: the inputs and weights of Linear and Conv layers, nothing else (int8-GEMM targets)."""
    import collections
    import torch
    from torch import nn
    from pyquant import QuantSim

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 3), nn.LayerNorm(36)
            self.fc1, self.fc2 = nn.Linear(144, 16), nn.Linear(16, 5)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            y = self.norm(y.flatten(2)).flatten(1)
            return self.fc2(torch.relu(self.fc1(y)) + 1.0)

    sim = QuantSim(Net().eval(), torch.randn(2, 3, 8, 8), config="layer_inputs")
    kinds = collections.Counter((p.kind, p.op_type) for p in sim.placement.values())
    assert kinds == {("param", "Conv"): 1, ("param", "Gemm"): 2, ("op_input", "Conv"): 1, ("op_input", "Gemm"): 2}
    assert all(p.axis is not None for p in sim.placement.values() if p.is_param)  # per channel
    assert all(not p.symmetric for p in sim.placement.values() if not p.is_param)
