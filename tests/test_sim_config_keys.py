"""Every hardware-config key changes what QuantSim simulates: each test flips one key and asserts that
the simulation follows it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pyquant import QuantSim
from pyquant.sim.config import load_config

BASE = {
    "defaults": {"ops": {"is_output_quantized": "True"}, "params": {"is_quantized": "True", "is_symmetric": "True"},
                 "per_channel_quantization": "True"},
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {},
    "supergroups": [],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}


def _cfg(**changes) -> dict:
    """BASE with `changes` applied: keys are JSON paths joined by '__' (op_type__Relu__is_symmetric)."""
    cfg = copy.deepcopy(BASE)
    for path, value in changes.items():
        *keys, last = path.split("__")
        d = cfg
        for k in keys:
            d = d.setdefault(k, {})
        d[last] = value
    return cfg


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.relu(self.conv(x)) * 2.0
        return torch.softmax(self.fc(y.mean((2, 3))), dim=-1)


X = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _sim(cfg, **kw) -> QuantSim:
    sim = QuantSim(Net().eval(), X[:1], config=cfg, **kw)
    sim.compute_encodings(lambda m: m(X))
    return sim


# ---- encoding_constraints ---------------------------------------------------------------------------
def test_min_only_and_max_only_constraints_fix_one_side_and_calibrate_the_other():
    free = _sim(_cfg()).quantizer("relu.output").get_encoding()
    lo = _sim(_cfg(op_type__Relu__encoding_constraints={"min": -1.0})).quantizer("relu.output").get_encoding()
    hi = _sim(_cfg(op_type__Relu__encoding_constraints={"max": 0.5})).quantizer("relu.output").get_encoding()
    both = _sim(_cfg(op_type__Relu__encoding_constraints={"min": 0.0, "max": 0.5})).quantizer("relu.output")
    assert float(free.min) == 0.0 and float(free.max) > 1.0  # a ReLU's calibrated range
    # min fixed at -1 (on the grid: within a step), max calibrated as before
    assert abs(float(lo.min) + 1.0) <= float(lo.scale) and abs(float(lo.max) - float(free.max)) <= float(lo.scale)
    # max fixed at 0.5, min calibrated (0 for a ReLU)
    assert abs(float(hi.max) - 0.5) <= float(hi.scale) and float(hi.min) == 0.0
    torch.testing.assert_close(hi.scale, both.get_encoding().scale)
    with pytest.raises(ValueError, match="give min, max or both"):
        load_config(_cfg(op_type__Relu__encoding_constraints={}))
    assert load_config(_cfg(op_type__Relu__encoding_constraints={"max": 0.5})).to_dict()["op_type"]["Relu"] == \
        {"encoding_constraints": {"max": 0.5}}


# ---- is_input_quantized (per op and in defaults.ops) --------------------------------------------------
def test_op_input_quantizers_where_the_config_asks_and_the_input_is_not_quantized_yet():
    cfg = _cfg(op_type__Gemm__is_output_quantized="False")
    plain = QuantSim(Net().eval(), X[:1], config=cfg)
    assert not [n for n in plain.quantizers if ".input_" in n]
    cfg["op_type"]["Softmax"] = {"is_input_quantized": "True"}
    sim = _sim(cfg)
    assert [n for n in sim.quantizers if ".input_" in n] == ["softmax.input_0"]
    p = sim.placement["softmax.input_0"]
    assert (p.kind, p.op_type, p.source) == ("op_input", "Softmax", "fc")
    # it quantizes the logits on their way into the softmax: the output moves with it
    with torch.no_grad():
        with_q = sim.model(X)
        sim.enable("softmax.input_0", False)
        without = sim.model(X)
    assert not torch.equal(with_q, without)
    # an input already quantized by its producer gets no second quantizer
    cfg["op_type"]["Relu"] = {"is_input_quantized": "True"}  # the conv output is quantized already
    assert not [n for n in QuantSim(Net().eval(), X[:1], config=cfg).quantizers if n.startswith("relu.input")]
    # defaults.ops.is_input_quantized reaches every op whose input is not quantized yet
    every = _cfg(op_type__Gemm__is_output_quantized="False", defaults__ops__is_input_quantized="True")
    assert "softmax.input_0" in QuantSim(Net().eval(), X[:1], config=every).quantizers


# ---- supergroup_pass_list --------------------------------------------------------------------------
class MatmulBias(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(6, 4))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.relu(torch.matmul(x, self.w) + self.b)


def test_supergroup_pass_list_runs_the_named_passes():
    x = torch.randn(8, 6)
    without = QuantSim(MatmulBias(), x[:1], config=_cfg()).quantizers
    with_pass = QuantSim(MatmulBias(), x[:1], config=_cfg(supergroup_pass_list=["MatmulAdd"])).quantizers
    assert "matmul.output" in without and "add.output" in without
    assert "matmul.output" not in with_pass and "add.output" in with_pass  # MatMul + bias: one kernel
    with pytest.raises(ValueError, match=r"supergroup_pass_list\[0\]: unknown supergroup pass 'NoSuchPass'"):
        load_config(_cfg(supergroup_pass_list=["NoSuchPass"]))


# ---- supported_kernels -----------------------------------------------------------------------------
def _kernel(act, param=None, dtype="int"):
    k = {"activation": {"bitwidth": act, "dtype": dtype}}
    if param is not None:
        k["param"] = {"bitwidth": param, "dtype": "int"}
    return k


def test_supported_kernels_refuse_or_move_what_the_target_does_not_run():
    cfg = _cfg(defaults__supported_kernels=[_kernel(8, 8), _kernel(16, 8)],
               op_type__Conv__supported_kernels=[_kernel(16, 8)])
    with pytest.raises(ValueError, match=r"op_type.Conv.supported_kernels: op 'conv' \(Conv\) would run W8A8.*W8A16"):
        QuantSim(Net().eval(), X[:1], config=cfg)  # W8A8 everywhere, but the target runs Conv at W8A16 only
    with pytest.warns(RuntimeWarning, match=r"conv \(Conv\) W8A8 -> W8A16"):
        sim = QuantSim(Net().eval(), X[:1], config=cfg, unsupported_kernels="nearest")
    assert sim.quantizer("conv.weight").bitwidth == 8 and sim.quantizer("conv.output").bitwidth == 16
    assert sim.quantizer("fc.output").bitwidth == 8  # Gemm follows the defaults' kernels: W8A8 runs
    sim.compute_encodings(lambda m: m(X))
    assert sim.quantizer("conv.output").get_encoding().bitwidth == 16
    # without supported_kernels nothing is checked; a float kernel leaves the op unquantized
    assert QuantSim(Net().eval(), X[:1], config=_cfg(), param_bw=4, output_bw=4).quantizer("conv.output").bitwidth == 4
    fp = _cfg(op_type__Gemm__supported_kernels=[_kernel(16, dtype="float")])
    with pytest.warns(RuntimeWarning, match="fc"):
        sim = QuantSim(Net().eval(), X[:1], config=fp, unsupported_kernels="nearest")
    assert not sim.quantizer("fc.output").enabled and not sim.quantizer("fc.weight").enabled
    with pytest.raises(ValueError, match="unsupported_kernels must be one of"):
        QuantSim(Net().eval(), X[:1], config=cfg, unsupported_kernels="ignore")


# ---- strict_symmetric and unsigned_symmetric ----------------------------------------------------------
def test_strict_symmetric_drops_the_most_negative_code():
    sym = _cfg(defaults__ops__is_symmetric="True")
    full = _sim(sym)
    strict = _sim(_cfg(defaults__ops__is_symmetric="True", defaults__strict_symmetric="True",
                       op_type__Gemm__is_symmetric="False"))
    for name in ("conv.weight", "fc.weight", "conv.output", "input.x"):
        assert (full.quantizer(name).qmin, strict.quantizer(name).qmin) == (-128, -127), name
        e = strict.quantizer(name).get_encoding()
        assert e.strict and torch.allclose(e.min, -e.max)
    assert not strict.quantizer("fc.output").strict  # asymmetric quantizers keep the unsigned grid
    # what the target computes: nothing below -127 steps
    w = strict.weight("conv.weight")
    q = strict.quantizer("conv.weight")
    codes = torch.round(w / q.get_encoding().scale)
    assert (torch.clamp(codes, -127, 127) == torch.round(q(w) / q.get_encoding().scale)).all()
    assert load_config("strict_symmetric_int8").strict_symmetric  # the shipped profile now means it


def test_unsigned_symmetric_puts_non_negative_data_on_the_unsigned_grid():
    sym = dict(defaults__ops__is_symmetric="True")
    plain, unsigned = _sim(_cfg(**sym)), _sim(_cfg(defaults__unsigned_symmetric="True", **sym))
    a, b = plain.quantizer("relu.output").get_encoding(), unsigned.quantizer("relu.output").get_encoding()
    assert a.signed and (a.qmin, a.qmax) == (-128, 127)
    assert b.symmetric and not b.signed and (b.qmin, b.qmax) == (0, 255) and float(b.offset) == 0
    assert float(b.scale) < 0.6 * float(a.scale)  # twice the levels for the same range
    # data with negative values keeps the signed grid
    assert unsigned.quantizer("conv.output").get_encoding().signed
    with torch.no_grad():
        err_plain = (plain.model(X) - Net().eval()(X)).abs().mean()
        err_unsigned = (unsigned.model(X) - Net().eval()(X)).abs().mean()
    assert err_unsigned < err_plain


# ---- block_size, decompressed_bw and the default bit widths ------------------------------------------
def test_block_size_quantizes_gemm_weights_per_block_and_decompressed_bw_adds_lpbq():
    plain, blocked = _sim(_cfg(), param_bw=4), _sim(_cfg(defaults__block_size=4), param_bw=4)
    assert plain.quantizer("fc.weight").shape == (5, 1) and blocked.quantizer("fc.weight").shape == (5, 2)
    assert blocked.quantizer("conv.weight").shape == plain.quantizer("conv.weight").shape == (8, 1, 1, 1)
    w = plain.weight("fc.weight").detach()
    assert not torch.equal(plain.quantizer("fc.weight")(w), blocked.quantizer("fc.weight")(w))
    assert _sim(_cfg(defaults__block_size=4, op_type__Gemm__block_size=0), param_bw=4) \
        .quantizer("fc.weight").block_size is None
    lpbq = _sim(_cfg(defaults__block_size=4, defaults__decompressed_bw=5), param_bw=4)
    enc = lpbq.quantizer("fc.weight").get_encoding()
    assert enc.decompressed_bw == 5 and set(enc.int_scale.unique().tolist()) <= {1.0, 2.0}
    assert not torch.equal(lpbq.quantizer("fc.weight")(w), blocked.quantizer("fc.weight")(w))


def test_the_first_supported_kernel_sets_the_default_bit_widths():
    sim = QuantSim(Net().eval(), X[:1], config=_cfg(defaults__supported_kernels=[_kernel(16, 4), _kernel(8, 8)]))
    assert {q.bitwidth for q in sim.param_quantizers.values()} == {4}
    assert {q.bitwidth for q in sim.activation_quantizers.values()} == {16}
    sim = QuantSim(Net().eval(), X[:1], config=_cfg(defaults__supported_kernels=[_kernel(16, 4), _kernel(8, 8)]),
                   param_bw=8, output_bw=8)
    assert {q.bitwidth for q in sim.quantizers.values()} == {8}
