"""The contracts the layers share: one batching helper, one fingerprint and checkpoint for resumable work,
one table of layer types, warning categories, the quantizer's public API with its two range
parametrizations, QuantSim's placement and weight accessors, and the deprecated names that keep
working."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import pyquant
from pyquant import QuantSim
from pyquant._batches import as_batches, iter_batches
from pyquant._checkpoint import Checkpoint
from pyquant._fingerprint import differences, fingerprint
from pyquant._layers import TECHNIQUE_LAYERS, batchnorm_scale_shift, layers_for, weight_axis
from pyquant.quant import RANGE_PARAMS, MinMaxRange, QuantizeDequantize, ScaleOffsetRange, from_range


# ---- batches ---------------------------------------------------------------------------------------
def test_batches_from_tensors_loaders_pairs_and_dicts():
    x = torch.randn(10, 3)
    assert [b[0].shape[0] for b in as_batches(x, 4)] == [4, 4, 2]
    assert [b[0].shape[0] for b in as_batches(x, 4, max_samples=6)] == [4, 2]
    assert [b[0].shape[0] for b in as_batches(x, None)] == [10]
    labelled = as_batches([(x, torch.arange(10))], None)
    assert len(labelled[0]) == 1 and labelled[0][0] is x  # integer labels dropped
    two_inputs = as_batches([(x, x * 2)], None)  # float second member: a second input
    assert len(two_inputs[0]) == 2
    kw = as_batches([{"a": x, "b": x}], max_samples=3)
    assert kw[0]["a"].shape[0] == 3 and kw[0]["b"].shape[0] == 3
    stream = iter_batches((x[i:i + 2] for i in range(0, 10, 2)), max_samples=5)
    assert [b[0].shape[0] for b in stream] == [2, 2, 1]


@pytest.mark.parametrize("data,kw,err,match", [
    ([], {}, ValueError, "data: the iterable yielded no batches"),
    (torch.zeros(0, 3), {}, ValueError, "at least one sample"),
    (5, {}, TypeError, "data must be a tensor or an iterable of batches"),
    ("text", {}, TypeError, "data must be a tensor or an iterable"),
    ([torch.ones(2), "x"], {}, TypeError, r"data\[1\]: batches must be tensors"),
    (torch.ones(4, 2), {"batch_size": 0}, ValueError, "batch_size must be a positive int"),
    (torch.ones(4, 2), {"max_samples": 0}, ValueError, "max_samples must be a positive int"),
])
def test_batches_refuse_bad_data_naming_it(data, kw, err, match):
    with pytest.raises(err, match=match):
        as_batches(data, **kw)


# ---- fingerprint and checkpoint --------------------------------------------------------------------
def _big_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def test_fingerprint_covers_every_weight_byte_every_batch_and_the_settings():
    m = _big_model()
    data = [torch.randn(4, 64) for _ in range(3)]
    fp = fingerprint(model=m, data=data, settings={"lr": 0.1})
    assert fp["pyquant"] == pyquant.__version__
    assert differences(fp, fingerprint(model=m, data=data, settings={"lr": 0.1})) == []
    with torch.no_grad():  # past the first 4 KB of the tensor
        m[0].weight.view(-1)[-1] += 1e-3
    assert differences(fp, fingerprint(model=m, data=data, settings={"lr": 0.1})) == \
        ["the model's weights differ"]
    with torch.no_grad():
        m[0].weight.view(-1)[-1] -= 1e-3
    late = [d.clone() for d in data]
    late[2][-1, -1] += 1.0  # the third batch
    assert differences(fp, fingerprint(model=m, data=late, settings={"lr": 0.1})) == ["the calibration data differs"]
    assert differences(fp, fingerprint(model=m, data=data, settings={"lr": 0.2}), then="saved") == \
        ["lr: saved 0.1, now 0.2"]
    swapped = _big_model()
    swapped[1] = nn.ReLU6()  # same state dict, other module type
    assert differences(fp, fingerprint(model=swapped, data=data, settings={"lr": 0.1})) == \
        ["the model's module types differ"]


def test_checkpoint_resumes_only_its_own_job_and_runs_no_code(tmp_path):
    fp = fingerprint(settings={"a": 1})
    ck = Checkpoint(tmp_path / "job.pt", fp)
    assert ck.load() == (None, [])
    ck.save({"done": ["x"], "w": {"x": torch.ones(2)}})
    state, diff = ck.load()
    assert diff == [] and state["done"] == ["x"] and torch.equal(state["w"]["x"], torch.ones(2))
    assert Checkpoint(tmp_path / "job.pt", fingerprint(settings={"a": 2})).load() == (None, ["a: saved 1, now 2"])
    with pytest.raises(ValueError, match="fingerprint"):
        ck.save({"fingerprint": 1})

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))
    evil = tmp_path / "evil.pt"
    torch.save({"fingerprint": fp, "done": Boom()}, evil)
    with pytest.raises(pyquant.UnsafeFileError, match="posix.system"):
        Checkpoint(evil, fp).load()
    assert not (tmp_path / "ran").exists()


# ---- layers ----------------------------------------------------------------------------------------
def test_layer_table():
    assert nn.ConvTranspose2d in layers_for("adaround") and nn.Conv3d not in layers_for("cle")
    assert weight_axis(nn.ConvTranspose1d(2, 3, 1)) == 1 and weight_axis(nn.Linear(2, 3)) == 0
    assert weight_axis(nn.ReLU()) is None
    with pytest.raises(KeyError, match="known"):
        layers_for("nope")
    assert set(TECHNIQUE_LAYERS) >= {"bn_fold", "cle", "bias_correction", "adaround"}
    bn = nn.BatchNorm1d(4).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    a, shift = batchnorm_scale_shift(bn)
    y = torch.randn(5, 4)
    torch.testing.assert_close(bn(y), a * y + shift)


# ---- warnings --------------------------------------------------------------------------------------
def test_nothing_to_do_is_a_category_and_verbose_is_deprecated():
    m = nn.Sequential(nn.Linear(3, 3))
    with pytest.warns(pyquant.NothingToDoWarning, match="no batch norm"):
        pyquant.fold_batchnorms(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", pyquant.NothingToDoWarning)
        pyquant.fold_batchnorms(m)  # filtered by category: nothing else is raised
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pyquant.equalize(m, verbose=False)
    kinds = [type(w.message) for w in rec]
    assert DeprecationWarning in kinds and pyquant.NothingToDoWarning not in kinds


# ---- quantizer API ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rp", sorted(RANGE_PARAMS))
def test_range_params_are_two_classes_behind_one_api(rp):
    q = QuantizeDequantize((3, 1), 8, False, range_params=rp)
    assert isinstance(RANGE_PARAMS[rp], MinMaxRange if rp == "minmax" else ScaleOffsetRange)
    assert [n for n, _ in q.named_parameters()] == list(RANGE_PARAMS[rp].names)
    assert not q.has_encoding
    enc = from_range(torch.tensor([-1.0, -2.0, 0.0]).reshape(3, 1), torch.tensor([1.0, 3.0, 4.0]).reshape(3, 1), 8,
                     False)
    q.set_encoding(enc)
    assert q.has_encoding
    s, o = q.scale_offset()
    torch.testing.assert_close(s, enc.scale)
    torch.testing.assert_close(o, enc.offset)
    q.set_range_learning(True)
    assert all(p.requires_grad for p in q.encoding_parameters())
    q.freeze()
    assert not any(p.requires_grad for p in q.encoding_parameters())
    q.unfreeze()
    flags = q.state_flags()
    q2 = QuantizeDequantize((3, 1), 8, False, range_params=rp)
    q2.load_state_flags(flags)
    assert q2.state_flags() == flags
    k = torch.tensor([2.0, 0.5, 3.0])
    before = q.get_encoding()
    assert q.rescale_encoding(k, 0)
    torch.testing.assert_close(q.get_encoding().scale, before.scale * k.reshape(3, 1))
    assert not q.rescale_encoding(torch.tensor([2.0]), 0)  # not per channel: recalibrate instead


def test_symmetric_scale_offset_keeps_its_offset_fixed_and_refuses_a_negative_factor():
    q = QuantizeDequantize((2,), 8, True, range_params="scale_offset")
    q.set_encoding(from_range(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]), 8, True))
    q.set_range_learning(True)
    assert q.scale.requires_grad and not q.offset.requires_grad
    assert not q.rescale_encoding(torch.tensor([1.0, -1.0]), 0)


def test_param_mode_is_a_deprecated_name_of_range_params():
    with pytest.warns(DeprecationWarning, match="range_params"):
        q = QuantizeDequantize((), 8, False, param_mode="scale_offset")
    assert q.range_params == "scale_offset"
    with pytest.warns(DeprecationWarning):
        assert q.param_mode == "scale_offset"
    with pytest.raises(TypeError, match="range_params"):
        QuantizeDequantize((), 8, False, param_mode="minmax", range_params="minmax")
    with pytest.raises(ValueError, match="range_params must be one of"):
        QuantizeDequantize((), 8, False, range_params="lsq")


# ---- QuantSim accessors ----------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.c(x))).mean((2, 3)))


def test_placement_and_weight_accessors():
    x = torch.randn(2, 3, 8, 8)
    sim = QuantSim(_Net().eval(), x, batchnorm="fold_each_step")
    assert set(sim.placement) == set(sim.quantizers)
    p = sim.placement["c.weight"]
    assert (p.kind, p.op_type, p.axis, p.shape) == ("param", "Conv", 0, (4, 1, 1, 1))
    assert sim.op_type("c.weight") == "Conv" and sim.op_types["fc.weight"] == "Gemm"
    assert all(sim.placement[n].kind in ("output", "input") for n in sim.activation_quantizers)
    with pytest.raises(KeyError, match="no quantizer named"):
        sim.op_type("nope")
    assert sim.weight("c.weight") is sim.model.c.parametrizations.weight.original
    assert sim.folds_batchnorm_each_step("c.weight") and not sim.folds_batchnorm_each_step("fc.weight")
    folded = sim.quantizer_input("c.weight")
    assert not torch.equal(folded, sim.weight("c.weight"))  # the batch norm folded in
    sim.calibrate_weight("c.weight")
    assert sim.quantizer("c.weight").has_encoding
    sim.stop_folding_batchnorm("c.weight")
    assert not sim.folds_batchnorm_each_step("c.weight")
    assert torch.equal(sim.quantizer_input("c.weight"), sim.weight("c.weight"))
    with pytest.raises(KeyError, match="no weight quantizer"):
        sim.weight("fc.output")


def test_adaround_num_samples_is_a_deprecated_name_of_max_samples():
    m = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(16, 4)
    with pytest.warns(DeprecationWarning, match="max_samples"):
        res = pyquant.adaround(m, x[:1], x, num_samples=8, iterations=2, progress=False)
    assert res.report[0].rows == 8
