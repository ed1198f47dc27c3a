"""Every resumable job (AdaRound, SeqMSE, GPTQ, AutoQuant's cache) resumes only the work of identical
inputs: one weight element changed in the middle of a large tensor, one element of the last batch, or
one setting makes the saved work another job's, refused with a message naming what differs (the model's
weights, the calibration data, the setting), and the job starts over (AutoQuant refuses the cache)."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn

import pyquant
from pyquant._fingerprint import differences, fingerprint
from pyquant.autoquant import AutoQuant, AutoQuantCacheError
from helpers import counted
from layerwise_sims import mlp_case, mlp_sim

ada_mod = importlib.import_module("pyquant.techniques.adaround")
seq_mod = importlib.import_module("pyquant.techniques.seq_mse")
gptq_mod = importlib.import_module("pyquant.techniques.gptq")


def _nudge_middle(t: torch.Tensor) -> None:
    """One element in the middle of `t`, far past any prefix a partial hash would read, made different."""
    with torch.no_grad():
        flat = t.view(-1)
        flat[flat.numel() // 2] += 1e-3


def test_fingerprint_sees_one_element_of_a_large_tensor_and_of_the_last_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 512), nn.Linear(512, 4))  # 2 MiB of weights in the first layer
    data = [torch.randn(8, 1024) for _ in range(5)]
    fp = fingerprint(model=model, data=data, settings={"iterations": 100})
    _nudge_middle(model[0].weight)
    assert differences(fp, fingerprint(model=model, data=data, settings={"iterations": 100})) == \
        ["the model's weights differ"]
    _nudge_middle(model[0].weight)  # back is not exact in float: compare against a new reference instead
    fp = fingerprint(model=model, data=data, settings={"iterations": 100})
    late = [d.clone() for d in data]
    late[-1][-1, -1] += 1.0
    assert differences(fp, fingerprint(model=model, data=late, settings={"iterations": 100})) == \
        ["the calibration data differs"]
    assert differences(fp, fingerprint(model=model, data=data, settings={"iterations": 101}), then="saved") == \
        ["iterations: saved 100, now 101"]


def _refused(run, match: str) -> None:
    with pytest.warns(UserWarning, match=match):
        run()


# ---- AdaRound ------------------------------------------------------------------------------------------
def _ada_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 8)).eval()


def _ada(model, data, tmp_path, **kw):
    args = dict(param_bw=4, iterations=5, batch_size=4, positions_per_sample=1, checkpoint_dir=tmp_path,
                progress=False)
    args.update(kw)
    return pyquant.adaround(model, data[:1], data, **args)


@pytest.mark.parametrize("change, match", [
    ("weight", "the model's weights differ"),
    ("last batch", "the calibration data differs"),
    ("setting", r"reg_param: saved 0.01, now 0.02"),
])
def test_adaround_checkpoint_of_other_inputs_is_not_resumed(tmp_path, monkeypatch, change, match):
    data = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    _ada(_ada_model(), data, tmp_path)
    calls = counted(monkeypatch, ada_mod, "_optimize_layer")
    _ada(_ada_model(), data, tmp_path)
    assert calls == []  # the same inputs: everything resumed from the checkpoint
    model, kw = _ada_model(), {}
    if change == "weight":
        _nudge_middle(model[0].weight)
    elif change == "last batch":
        data = data.clone()
        data[-1, -1] += 1.0
    else:
        kw["reg_param"] = 0.02
    _refused(lambda: _ada(model, data, tmp_path, **kw), match)
    assert len(calls) == 2  # started over: both layers optimized again


# ---- SeqMSE and GPTQ -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method, per_layer, setting", [
    ("seq_mse", "seq_mse_encoding", {"num_candidates": 5}),
    ("gptq", "gptq_weight", {"percdamp": 0.02}),
])
@pytest.mark.parametrize("change", ["weight", "last batch", "setting"])
def test_layerwise_checkpoint_of_other_inputs_is_not_resumed(tmp_path, monkeypatch, method, per_layer, setting,
                                                             change):
    run, module = getattr(pyquant, method), {"seq_mse": seq_mod, "gptq": gptq_mod}[method]
    model, x, _ = mlp_case()
    base = {"num_candidates": 4} if method == "seq_mse" else {}
    run(mlp_sim(model, x), x, batch_size=16, checkpoint_dir=tmp_path, **base)
    calls = counted(monkeypatch, module, per_layer)
    sim, kw = mlp_sim(model, x), dict(base)
    if change == "weight":
        _nudge_middle(sim.weight("fc2.weight"))
        match = "the model's weights differ"
    elif change == "last batch":
        x = x.clone()
        x[-1, -1] += 1.0  # the last sample of the last batch of 16
        match = "the calibration data differs"
    else:
        kw.update(setting)
        (k, v), = setting.items()
        match = rf"{k}: saved .*, now {v}"
    _refused(lambda: run(sim, x, batch_size=16, checkpoint_dir=tmp_path, **kw), match)
    assert len(calls) == 3  # every layer computed again


# ---- AutoQuant's cache -----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    ("weight", "the model's weights differ"),
    ("last batch", "the calibration data differs"),
    ("setting", "output_bw: cached 8, now 6"),
])
def test_autoquant_cache_of_other_inputs_is_refused(tmp_path, change, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 8)).eval()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    batches = [x[i:i + 8] for i in range(0, 32, 8)]

    def fn(m):
        return 1.0

    AutoQuant(model, x[:1], batches, fn, progress=False, quant_schemes=("min_max",)).optimize(
        allowed_accuracy_drop=0.5, cache_dir=tmp_path)
    kw = {}
    if change == "weight":
        _nudge_middle(model[0].weight)
    elif change == "last batch":
        batches = [b.clone() for b in batches]
        batches[-1][-1, -1] += 1.0
    else:
        kw["output_bw"] = 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AutoQuantCacheError, match=match):
            AutoQuant(model, x[:1], batches, fn, progress=False, quant_schemes=("min_max",), **kw).optimize(
                allowed_accuracy_drop=0.5, cache_dir=tmp_path)
