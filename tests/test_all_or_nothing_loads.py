"""Every refused load leaves the simulation exactly as it was: an encodings file of each version (0.6.1,
1.0.0, 2.0.0, per-block and LPBQ entries) that is valid but for one entry near its end, a checkpoint that
does not fit, an AutoQuant cache made for other inputs, a hardware config the model cannot satisfy. Each
test compares the model's outputs, every quantizer's encoding, enabled flag and bit width before and
after the refused load."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import pyquant
from pyquant.autoquant import AutoQuant, AutoQuantCacheError
from pyquant.sim.config import ConfigError, profile_path
from pyquant.sim.encodings import EncodingsError
from helpers import output_fidelity


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 8)).eval()


def _x(n=16, seed=1):
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def _sim(seed=0, **kw):
    sim = pyquant.QuantSim(_mlp(seed), _x(2), quant_scheme="min_max", **kw)
    return sim


def _state(sim) -> dict:
    """What a load may change: the outputs, each quantizer's flags, encoding and tensors."""
    with torch.no_grad():
        out = sim.model(_x(8, seed=7)).clone()
    qs = {}
    for n, q in sim.quantizers.items():
        enc = q.get_encoding()
        qs[n] = (q.enabled, q.frozen, q.bitwidth, q.symmetric, q.signed, q.has_encoding,
                 None if enc is None else (enc.scale.clone(), enc.offset.clone()),
                 {k: v.detach().clone() for k, v in q.state_dict().items()},
                 [p.requires_grad for p in q.encoding_parameters()])
    weights = {k: v.detach().clone() for k, v in sim.model.state_dict().items()}
    return {"out": out, "quantizers": qs, "weights": weights}


def _assert_same(a: dict, b: dict) -> None:
    assert torch.equal(a["out"], b["out"])
    assert a["quantizers"].keys() == b["quantizers"].keys()
    for n, qa in a["quantizers"].items():
        qb = b["quantizers"][n]
        assert qa[:6] == qb[:6], n
        assert (qa[6] is None) == (qb[6] is None), n
        if qa[6] is not None:
            assert torch.equal(qa[6][0], qb[6][0]) and torch.equal(qa[6][1], qb[6][1]), n
        assert qa[7].keys() == qb[7].keys() and all(torch.equal(qa[7][k], qb[7][k]) for k in qa[7]), n
        assert qa[8] == qb[8], n
    assert all(torch.equal(v, b["weights"][k]) for k, v in a["weights"].items())


def _target(**kw):
    """The simulation a refused load must leave alone: calibrated on other data than the file's source,
    one quantizer disabled, one at another bit width."""
    sim = _sim(**kw)
    sim.compute_encodings(_x(16, seed=3) * 2)
    sim.enable("3.output", False)
    return sim


def _source_file(tmp_path, version, **kw):
    """An encodings file of `version` from a simulation calibrated on other data (its JSON, its path)."""
    src = _sim(**kw)
    src.compute_encodings(_x(16, seed=1))
    act, par = src.encodings()
    path = tmp_path / f"src_{version}.encodings"
    pyquant.write_encodings(path, act, par, version=version)
    return json.loads(path.read_text()), path


def _last_param_entry(doc, version):
    """(container, key) of the last parameter entry of a parsed encodings file."""
    if version == "2.0.0":
        return doc["encodings"], len(doc["encodings"]) - 1
    if version == "1.0.0":
        return doc["param_encodings"], len(doc["param_encodings"]) - 1
    return doc["param_encodings"], list(doc["param_encodings"])[-1]


def _entries_applied_before_the_last(sim, path) -> bool:
    """Whether the file's other entries would change the target (so that applying them first and failing
    on the last one would be seen)."""
    before = _state(sim)
    probe = _target()
    probe.load_encodings(path)
    return not torch.equal(before["out"], _state(probe)["out"])


def _spoil(doc, version, how):
    box, key = _last_param_entry(doc, version)
    e = box[key]
    if how == "unknown name":
        if version == "0.6.1":
            box["no.such.weight"] = box.pop(key)
        else:
            e["name"] = "no.such.weight"
    elif how == "channels":  # one scale too few for its quantizer
        if version == "0.6.1":
            e.pop()
        elif version == "1.0.0":
            e["scale"], e["offset"] = e["scale"][:-1], e["offset"][:-1]
        else:
            e["y_scale"] = e["y_scale"][:-1]
    elif how == "bad scale":  # the reader refuses it
        if version == "0.6.1":
            e[-1]["scale"] = -1.0
        elif version == "1.0.0":
            e["scale"][-1] = -1.0
        else:
            e["y_scale"][-1] = -1.0


@pytest.mark.parametrize("version", ["0.6.1", "1.0.0", "2.0.0"])
@pytest.mark.parametrize("how, err", [("unknown name", KeyError), ("channels", ValueError),
                                      ("bad scale", EncodingsError)])
def test_refused_encodings_file_leaves_the_sim_as_it_was(tmp_path, version, how, err):
    doc, good = _source_file(tmp_path, version)
    sim = _target()
    assert _entries_applied_before_the_last(sim, good)
    _spoil(doc, version, how)
    bad = tmp_path / "bad.encodings"
    bad.write_text(json.dumps(doc))
    before = _state(sim)
    with pytest.raises(err, match="no.such.weight" if how == "unknown name" else
                       ("4.weight" if how == "channels" else "scale")):
        sim.load_encodings(bad)
    _assert_same(before, _state(sim))
    sim.load_encodings(good)  # the valid file still loads
    assert not torch.equal(_state(sim)["out"], before["out"])


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
@pytest.mark.parametrize("lpbq", [False, True])
def test_refused_per_block_file_leaves_the_sim_as_it_was(tmp_path, version, lpbq):
    kw = dict(param_bw=4, block_size=16, decompressed_bw=8 if lpbq else None)
    doc, good = _source_file(tmp_path, version, **kw)
    sim = _sim(**kw)
    sim.compute_encodings(_x(16, seed=3) * 2)
    sim.set_bitwidth("2.weight", 3)
    sim.calibrate_weight("2.weight")
    box, key = _last_param_entry(doc, version)
    e = box[key]
    if version == "1.0.0":
        e["scale"], e["offset"] = e["scale"][:-1], e["offset"][:-1]
    elif "y_scale" in e:  # one block row short
        e["y_scale"] = e["y_scale"][:-1]
    else:  # LPBQ: one channel's scales short
        e["per_block_int_scale"] = e["per_block_int_scale"][:-1]
        e["per_channel_float_scale"] = e["per_channel_float_scale"][:-1]
    bad = tmp_path / "bad.encodings"
    bad.write_text(json.dumps(doc))
    before = _state(sim)
    with pytest.raises((ValueError, EncodingsError), match="4.weight"):
        sim.load_encodings(bad)
    _assert_same(before, _state(sim))


def test_a_quantizer_refusing_its_encoding_midway_rolls_every_quantizer_back(tmp_path):
    """The file passes every check before it is applied, and the last LPBQ weight still refuses its
    encoding (a 9-bit grid does not fit below its 8-bit decompressed_bw): the quantizers set before it
    go back, bit widths included."""
    kw = dict(param_bw=4, block_size=16, decompressed_bw=8)
    src = _sim(**kw)
    src.compute_encodings(_x(16, seed=1))
    act, par = src.encodings()
    last = list(par)[-1]
    enc = par[last]
    par[last] = pyquant.quant.from_scale_offset(enc.scale.clone(), torch.zeros_like(enc.scale), 9, True,
                                                enc.block_size)
    path = tmp_path / "e.encodings"
    pyquant.write_encodings(path, act, par, version="1.0.0")
    sim = _sim(**kw)
    sim.compute_encodings(_x(16, seed=3) * 2)
    before = _state(sim)
    with pytest.raises(ValueError):
        sim.load_encodings(path)
    _assert_same(before, _state(sim))


# ---- checkpoints ---------------------------------------------------------------------------------------
def _checkpoint_variant(tmp_path, change):
    sim = _sim()
    sim.compute_encodings(_x())
    path = tmp_path / "c.pt"
    sim.save_checkpoint(path)
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    return path


def _last(d):
    return list(d)[-1]


@pytest.mark.parametrize("change, match", [
    (lambda s: s["model"].pop(_last(s["model"])), "missing"),
    (lambda s: s["model"].__setitem__("extra.weight", torch.ones(1)), "unexpected"),
    (lambda s: s["model"].__setitem__(_last(s["model"]), torch.ones(3, 3)), "shape"),
    (lambda s: s["quantizers"][_last(s["quantizers"])].__setitem__("bitwidth", 99), "bit"),
    (lambda s: s["quantizers"][_last(s["quantizers"])].__setitem__("learn", [True]), "learn"),
    (lambda s: s["quantizers"].__setitem__("no.such.output", s["quantizers"][_last(s["quantizers"])]), "no.such"),
])
def test_refused_checkpoint_leaves_the_sim_as_it_was(tmp_path, change, match):
    path = _checkpoint_variant(tmp_path, change)
    sim = _target()
    before = _state(sim)
    with pytest.raises(ValueError, match=match):
        sim.load_checkpoint(path)
    _assert_same(before, _state(sim))


def test_checkpoint_with_other_optimizer_groups_changes_neither_sim_nor_optimizer(tmp_path):
    sim = _sim()
    sim.compute_encodings(_x())
    opt = torch.optim.SGD([{"params": sim.model_parameters()}, {"params": sim.quantizer_parameters()}], lr=0.1)
    sim.save_checkpoint(tmp_path / "c.pt", optimizer=opt)
    target = _target()
    other = torch.optim.SGD(target.model_parameters(), lr=0.5)
    before, opt_before = _state(target), other.state_dict()
    with pytest.raises(ValueError, match="parameter groups"):
        target.load_checkpoint(tmp_path / "c.pt", optimizer=other)
    _assert_same(before, _state(target))
    assert other.state_dict() == opt_before


def test_failure_while_applying_a_checkpoint_rolls_the_quantizers_back(tmp_path, monkeypatch):
    sim = _sim()
    sim.compute_encodings(_x())
    sim.set_bitwidth("0.weight", 4)
    sim.enable("1.output", False)
    sim.save_checkpoint(tmp_path / "c.pt")
    target = _target()
    before = _state(target)

    def fails(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(target.model, "load_state_dict", fails)  # after the flags were applied
    with pytest.raises(RuntimeError, match="device lost"):
        target.load_checkpoint(tmp_path / "c.pt")
    _assert_same(before, _state(target))


# ---- AutoQuant's cache, hardware configs ---------------------------------------------------------------
def test_refused_autoquant_cache_changes_neither_the_model_nor_the_cache(tmp_path):
    model = _mlp()
    x = _x(32)
    fidelity = output_fidelity(model, x)

    AutoQuant(model, x[:1], x, fidelity, progress=False, quant_schemes=("min_max",)).optimize(
        allowed_accuracy_drop=0.5, cache_dir=tmp_path / "c")
    files = {p: p.read_bytes() for p in sorted((tmp_path / "c").rglob("*")) if p.is_file()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AutoQuantCacheError, match="param_bw: cached 8, now 4"):
        AutoQuant(model, x[:1], x, fidelity, param_bw=4, progress=False, quant_schemes=("min_max",)).optimize(
            allowed_accuracy_drop=0.5, cache_dir=tmp_path / "c")
    assert {p: p.read_bytes() for p in sorted((tmp_path / "c").rglob("*")) if p.is_file()} == files
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def _default_config() -> dict:
    with open(profile_path("default"), encoding="utf-8") as f:
        return json.load(f)


def _config_refusing_8_bit_gemm():
    """A valid config whose Gemm runs 16-bit activations only: the MLP's 8-bit Gemms are refused once the
    graph is captured, after an in-place capture has prepared the model."""
    cfg = _default_config()
    cfg["op_type"]["Gemm"]["supported_kernels"] = [{"activation": {"bitwidth": 16, "dtype": "int"},
                                                    "param": {"bitwidth": 16, "dtype": "int"}}]
    return cfg


def test_refused_hardware_config_leaves_an_in_place_model_as_it_was(tmp_path):
    model = nn.Sequential(nn.Linear(32, 16), nn.LayerNorm(16), nn.RMSNorm(16), nn.Linear(16, 8))
    model.train()  # an in-place capture puts the model in eval mode and decomposes its RMSNorm
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with torch.no_grad():
        out = model(_x(4))
    with pytest.raises(ConfigError, match="Gemm"):
        pyquant.QuantSim(model, _x(2), config=_config_refusing_8_bit_gemm(), in_place=True)
    assert model.training and all(m.training for m in model.modules())
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    with torch.no_grad():
        assert torch.equal(model(_x(4)), out)
    # a config refused while it is read (a bad value in its last section) never reaches the model
    bad = _default_config()
    bad["supergroup_pass_list"] = [3]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="supergroup_pass_list"):
        pyquant.QuantSim(model, _x(2), config=str(path), in_place=True)
    assert model.training and [type(m) for m in model.modules()] == classes
    assert math.isfinite(float(out.sum()))


def test_a_range_that_learning_crossed_saves_and_loads_back(tmp_path):
    """Range learning can carry a min past its max (the quantizer reads that as its smallest step): what
    save_checkpoint writes of such a simulation loads back, with the same outputs."""
    sim = _sim(range_learning=True)
    sim.compute_encodings(lambda m: m(_x()))
    name = next(n for n, q in sim.param_quantizers.items() if hasattr(q, "min"))
    q = sim.quantizer(name)
    with torch.no_grad():
        q.min.view(-1)[0], q.max.view(-1)[0] = 0.25, -0.25
    assert bool((q.min > q.max).any())
    sim.save_checkpoint(tmp_path / "crossed.pt")
    fresh = _sim(range_learning=True)
    fresh.compute_encodings(lambda m: m(_x()))
    fresh.load_checkpoint(tmp_path / "crossed.pt")
    with torch.no_grad():
        assert torch.equal(fresh.model(_x(8, seed=7)), sim.model(_x(8, seed=7)))
    assert torch.equal(fresh.quantizer(name).min, q.min)
