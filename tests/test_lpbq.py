"""LPBQ (per-block integer scales under a per-channel float scale): the simulated weights against a pure-torch
computation of the formula, AIMET's integer scales, the encodings files AIMET writes (fixtures in its field
layout), round trips, checkpoints, the QDQ export run by onnxruntime, and the refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pyquant import QuantSim
from pyquant.quant import LpbqEncoding, LpbqQuantizeDequantize, lpbq_scales
from pyquant.sim.config import load_config
from pyquant.sim.encodings import EncodingsError, read_encodings
from helpers import assert_onnx_runs_simulation, one_thread  # noqa: F401  (fixture)
from test_sim_blocks import Mlp, _data
import zoo

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data"


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Mlp().eval()


def _lpbq_reference(w: torch.Tensor, block: int, bw: int, dbw: int) -> torch.Tensor:
    """LPBQ of a [out, in] weight in plain torch: symmetric per-block min/max scales s, c = max_blocks(s) / 2^k,
    n = clamp(round(s / c), 1, 2^k), codes on the bw-bit signed grid at scale c * n (k = dbw - bw)."""
    qmin, qmax, k = -(2 ** (bw - 1)), 2 ** (bw - 1) - 1, dbw - bw
    wb = w.reshape(w.shape[0], -1, block)
    s = torch.maximum(wb.amax(-1, keepdim=True).clamp(min=0) / qmax, wb.amin(-1, keepdim=True).clamp(max=0) / qmin)
    c = s.amax(dim=1, keepdim=True) / 2 ** k
    n = torch.clamp(torch.round(s / c), 1, 2 ** k)
    return (torch.clamp(torch.round(wb / (c * n)), qmin, qmax) * (c * n) + 0.0).reshape(w.shape)


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("bw,dbw", [(4, 8), (8, 12)])
def test_simulated_weights_are_the_formula(block, bw, dbw):
    x = _data(16)
    sim = QuantSim(_mlp(), x[:2], quant_scheme="min_max", param_bw=bw, block_size=block, decompressed_bw=dbw)
    q = sim.quantizer("fc1.weight")
    assert isinstance(q, LpbqQuantizeDequantize) and (q.shape, q.decompressed_bw) == ((32, 64 // block), dbw)
    sim.compute_encodings(lambda m: m(x))
    for name, layer in (("fc1.weight", "fc1"), ("fc2.weight", "fc2")):
        w = sim.weight(name).detach()
        got = sim.model.get_submodule(layer).weight.detach()
        # the per-block range is kept as min/max and its scale derived from them: equal to an ulp or so
        torch.testing.assert_close(got, _lpbq_reference(w, block, bw, dbw), rtol=1e-6, atol=0)
        enc = sim.quantizer(name).get_encoding()
        assert isinstance(enc, LpbqEncoding)
        n = enc.int_scale
        assert bool(((n >= 1) & (n <= 2 ** (dbw - bw)) & (n == n.round())).all())
        assert bool((n.amax(dim=1) == 2 ** (dbw - bw)).all())  # each channel's widest block is at the top
        assert torch.equal(enc.scale, enc.per_channel_scale * enc.int_scale)


def test_aimet_splits_block_scales_into_the_same_integers():
    """AIMET 2.42's LPBQ calibration of this [3, 8] weight (W4, decompressed 8, blocks of 4) gave integer
    block scales 16, 10 / 16, 8 / 16, 9 and per-channel scales 0.012889822, 0.009422835, 0.030450916."""
    w = torch.tensor([[0.46809640526771545, -0.1577124446630478, 1.4436601400375366, 0.26604941487312317,
                       0.16645534336566925, 0.8743818402290344, -0.14347384870052338, -0.1116093322634697],
                      [-0.6730899214744568, 0.8728312253952026, 1.0553574562072754, 0.17784371972084045,
                       -0.23033547401428223, -0.3917543888092041, 0.5432947278022766, -0.3951575458049774],
                      [-0.4462171792984009, 0.7440207004547119, 1.5209795236587524, 3.4105026721954346,
                       -1.5311843156814575, -1.2341350317001343, 1.8197252750396729, -0.5515286922454834]])
    q = LpbqQuantizeDequantize((3, 2), 4, 8, (1, 4))
    with q.compute_encodings():
        q(w)
    fixture = json.loads((DATA / "aimet_lpbq_v1.encodings").read_text())["param_encodings"][0]
    assert q.int_scale.reshape(-1).tolist() == fixture["per_block_int_scale"]
    torch.testing.assert_close(q.per_channel_scale.reshape(-1), torch.tensor(fixture["scale"]), rtol=1e-6, atol=0)
    # the split itself, from block scales: the widest block of a channel gets 2^k, the others round
    c, n = lpbq_scales(torch.tensor([[0.2, 0.05, 0.11]]), 4, axis=1)
    assert torch.equal(c, torch.tensor([[0.2 / 16]])) and n.tolist() == [[16.0, 4.0, 9.0]]


def _fixture_sim() -> tuple[QuantSim, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 3, bias=False)).eval()
    x = torch.randn(6, 8)
    return QuantSim(model, x[:2], param_bw=4, block_size=4, decompressed_bw=8), x


@pytest.mark.parametrize("name", ["aimet_lpbq_v1.encodings", "aimet_lpbq_v2.encodings"])
def test_aimet_files_load_and_simulate_the_values_their_fields_define(name):
    """Files in the field layout AIMET 2.42 writes for an LPBQ weight (1.0.0: bw = decompressed, compressed_bw,
    per-channel scale, offset -2^(bw-1), flat per_block_int_scale; 2.0.0: nested per_block_int_scale and
    per_channel_float_scale, the block axis, output_dtype of the codes); activation entries named after this
    simulation's quantizers."""
    path = DATA / name
    doc = json.loads(path.read_text())
    if name.endswith("v1.encodings"):
        e = doc["param_encodings"][0]
        c = torch.tensor(e["scale"]).reshape(3, 1)
        n = torch.tensor(e["per_block_int_scale"], dtype=torch.float32).reshape(3, 2)
    else:
        e = next(v for v in doc["encodings"] if v["name"] == "0.weight")
        c = torch.tensor(e["per_channel_float_scale"])
        n = torch.tensor(e["per_block_int_scale"], dtype=torch.float32)
    sim, x = _fixture_sim()
    sim.load_encodings(path)
    w = sim.weight("0.weight").detach()
    s = (c * n).repeat_interleave(4, dim=1)
    want = torch.clamp(torch.round(w / s), -8, 7) * s + 0.0
    assert torch.equal(sim.model.get_submodule("0").weight.detach(), want)
    enc = sim.quantizer("0.weight").get_encoding()
    assert (enc.bitwidth, enc.decompressed_bw, enc.block_size) == (4, 8, (1, 4))
    f = read_encodings(path, param_names=["0.weight"])
    assert f.params["0.weight"].decompressed_bw == 8  # 2.0.0 does not say: read from the integers' range
    assert torch.equal(f.params["0.weight"].int_scale, n)


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
def test_write_read_gives_an_identical_simulation(tmp_path, version):
    x = _data(16)
    sim = QuantSim(_mlp(), x[:2], param_bw=4, block_size=16, decompressed_bw=8)
    sim.compute_encodings(lambda m: m(x))
    paths = sim.export(tmp_path, "m", encoding_version=version)
    doc = json.loads(paths["encodings"].read_text())
    if version == "1.0.0":
        e = next(v for v in doc["param_encodings"] if v["name"] == "fc1.weight")
        assert (e["enc_type"], e["bw"], e["compressed_bw"], e["block_size"], set(e["offset"])) == \
            ("LPBQ", 8, 4, 16, {-128})
        assert len(e["scale"]) == 32 and len(e["per_block_int_scale"]) == 32 * 4
    else:
        e = next(v for v in doc["encodings"] if v["name"] == "fc1.weight")
        assert list(e) == ["name", "axis", "block_size", "per_block_int_scale", "per_channel_float_scale",
                           "output_dtype"]
        assert (e["axis"], e["block_size"], e["output_dtype"]) == (1, 16, "int4")
    want = sim.model(x)
    again = QuantSim(_mlp(), x[:2], param_bw=4, block_size=16, decompressed_bw=8)
    again.load_encodings(paths["encodings"])
    assert torch.equal(again.model(x), want)
    for name, q in sim.param_quantizers.items():
        assert torch.equal(again.quantizer(name).int_scale, q.int_scale)
        assert torch.equal(again.quantizer(name).per_channel_scale, q.per_channel_scale)
    plain = QuantSim(_mlp(), x[:2], param_bw=4, block_size=16)  # float block scales: the same products
    plain.load_encodings(paths["encodings"])
    assert torch.equal(plain.model(x), want)
    with pytest.raises(EncodingsError, match="0.6.1 has no per-block encodings"):
        sim.export(tmp_path, "old", encoding_version="0.6.1")


def test_checkpoints_and_training_keep_the_integer_scales(tmp_path):
    x = _data(16)
    sim = QuantSim(_mlp(), x[:2], param_bw=4, block_size=16, decompressed_bw=8, range_learning=True)
    sim.compute_encodings(lambda m: m(x))
    q = sim.quantizer("fc1.weight")
    assert not any(p.requires_grad for p in q.encoding_parameters())  # LPBQ ranges are not learned
    sim.model(x).square().sum().backward()
    assert sim.weight("fc1.weight").grad is not None and bool(sim.weight("fc1.weight").grad.abs().sum() > 0)
    sim.save_checkpoint(tmp_path / "ck.pt")
    want = sim.model(x)
    other = QuantSim(_mlp(), x[:2], param_bw=4, block_size=16, decompressed_bw=8)
    other.load_checkpoint(tmp_path / "ck.pt")
    assert torch.equal(other.quantizer("fc1.weight").int_scale, q.int_scale)
    assert torch.equal(other.model(x), want)


def test_export_runs_in_onnxruntime_as_the_simulation(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    x = _data(16)
    sim = QuantSim(_mlp(), x[:2], param_bw=4, block_size=16, decompressed_bw=8)
    sim.compute_encodings(lambda m: m(x))
    paths = sim.export(tmp_path, "m")
    model = onnx.load(str(paths["onnx"]))
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "fc1.weight")
    enc = sim.quantizer("fc1.weight").get_encoding()
    # the block scales as written: per-channel float x integer, one per block
    assert torch.equal(torch.from_numpy(scales[q.input[1]].copy()), enc.scale)
    assert_onnx_runs_simulation(sim, paths["onnx"], {"input": 2 * _data(8, seed=3)})


def test_config_key_and_refusals():
    x = _data(4)
    cfg = load_config("default").to_dict()
    cfg["defaults"]["block_size"] = 16
    cfg["defaults"]["decompressed_bw"] = 8
    sim = QuantSim(_mlp(), x, param_bw=4, config=cfg)
    assert isinstance(sim.quantizer("fc1.weight"), LpbqQuantizeDequantize)
    assert sim.quantizer("fc1.weight").decompressed_bw == 8
    assert isinstance(QuantSim(_mlp(), x, param_bw=4, config=cfg, decompressed_bw=12).quantizer("fc2.weight"),
                      LpbqQuantizeDequantize)
    with pytest.raises(ValueError, match=r"decompressed_bw must be an int in 5..16 \(above param_bw=4\)"):
        QuantSim(_mlp(), x, param_bw=4, block_size=16, decompressed_bw=4)
    with pytest.raises(ValueError, match="no weight is per block: give block_size"):
        QuantSim(_mlp(), x, param_bw=4, decompressed_bw=8)
    asym = load_config("default").to_dict()
    asym["defaults"]["params"]["is_symmetric"] = "False"
    asym["op_type"]["Gemm"]["params"] = {"weight": {"is_symmetric": "False"}}
    with pytest.raises(ValueError, match="'fc1.weight': LPBQ .* needs symmetric weights"):
        QuantSim(_mlp(), x, param_bw=4, block_size=16, decompressed_bw=8, config=asym)
    cfg["defaults"]["decompressed_bw"] = 40
    with pytest.raises(ValueError, match=r"defaults.decompressed_bw: expected an integer in 3..16"):
        load_config(cfg)
    with pytest.raises(ValueError, match="'fc1.weight': an LPBQ weight's bit width must stay below its "
                                         "decompressed_bw 8"):
        sim.set_bitwidth("fc1.weight", 8)
    sim.set_bitwidth("fc1.weight", 3)
    assert sim.quantizer("fc1.weight").int_bits == 5
    q = LpbqQuantizeDequantize((3, 2), 4, 6, (1, 4), name="w")  # 2-bit integer scales: up to 4
    with pytest.raises(ValueError, match="'w'.* up to 16 do not fit 2 bits"):
        q.set_encoding(read_encodings(DATA / "aimet_lpbq_v1.encodings").params["0.weight"])


def test_tiny_llama_with_lpbq_weights():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = zoo.tiny_llama()
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    sim = QuantSim(model, {"input_ids": ids}, param_bw=4, output_bw=16, block_size=16, decompressed_bw=8)
    lpbq = [n for n, q in sim.param_quantizers.items() if isinstance(q, LpbqQuantizeDequantize)]
    assert len(lpbq) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the output head
    sim.compute_encodings([{"input_ids": ids}])
    y = sim.model(input_ids=ids)
    logits = y["logits"] if isinstance(y, dict) else y[0]
    ref = model(input_ids=ids).logits
    sqnr = 10 * torch.log10(ref.square().mean() / (logits - ref).square().mean())
    assert sqnr > 5.0
    w = sim.weight("model.layers.0.mlp.down_proj.weight").detach()
    got = sim.quantizer("model.layers.0.mlp.down_proj.weight")(w).detach()
    assert (got - w).abs().max() <= sim.quantizer("model.layers.0.mlp.down_proj.weight").get_encoding().scale.max()
