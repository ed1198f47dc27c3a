"""GPTQ: on random linear layers it equals a straightforward pure-torch GPTQ (one column at a time, no lazy
batches) written here, per channel (with act_order and a dead input too) and per block, and its layer
output error is below round-to-nearest's; on a tiny Llama (torch.export, dict inputs) and an MLP (torch.fx)
at W4 it lowers the model-output error against plain calibration, with weights the frozen quantizer
reproduces exactly; it resumes after an interruption to the same weights and refuses bad arguments by
name."""
from __future__ import annotations

import importlib

import pytest
import torch

import pyquant
from pyquant.quant import QuantizeDequantize
from layerwise_sims import (block_sim, fx_outputs_mse, interrupted_then_resumed, llama_case, llama_sim, mlp_case,
                            mlp_sim, model_output_mse)

gptq_mod = importlib.import_module("pyquant.techniques.gptq")


def _qdq(w, s, o, qmin, qmax):
    return (torch.clamp(torch.round(w / s) - o, qmin, qmax) + o) * s


def _reference_gptq(W, H, s, o, qmin, qmax, percdamp=0.01, act_order=False, block=None):
    """GPTQ written plainly: per column, round to nearest, then subtract the scaled error from every later
    column. `s`, `o`: per-row scale/offset [out, 1]; with `block`, each block's symmetric scale comes from
    the updated weights at its first column instead."""
    W, H = W.clone(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        if block is not None and j % block == 0:
            part = W[:, j:j + block]
            mx, mn = part.amax(1, keepdim=True).clamp(min=0), part.amin(1, keepdim=True).clamp(max=0)
            s, o = torch.maximum(mx / qmax, mn / qmin), torch.zeros_like(mx)
        Q[:, j] = _qdq(W[:, j:j + 1], s, o, qmin, qmax)[:, 0]
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return Q[:, torch.argsort(perm)]


def _layer(seed, out=16, cols=48, rows=300):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g)
    X = torch.randn(rows, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3  # correlated inputs
    return W, X, 2.0 * X.t() @ X / rows


def _calibrated(shape, W, symmetric=True, block_size=None):
    q = QuantizeDequantize(shape, 4, symmetric, block_size=block_size)
    with q.compute_encodings():
        q(W)
    return q


def _out_err(X, W, Wq):
    return float((X @ (W - Wq).t()).pow(2).mean())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_equals_reference_and_beats_nearest(act_order, symmetric):
    W, X, H = _layer(5)
    X[:, 7] = 0  # a dead input
    H = 2.0 * X.t() @ X / X.shape[0]
    q = _calibrated((16, 1), W, symmetric)
    s, o = q.scale_offset()
    Wq, enc = pyquant.techniques.gptq_weight(q, W, H, act_order=act_order, block_columns=128)
    ref = _reference_gptq(W, H, s.detach(), o.detach(), q.qmin, q.qmax, act_order=act_order)
    assert torch.equal(Wq, ref)
    assert torch.equal(Wq[:, 7], torch.zeros(16))
    assert _out_err(X, W, Wq) < 0.8 * _out_err(X, W, q(W).detach())
    assert torch.equal(enc.quantize_dequantize(Wq), Wq)  # on the encoding's grid


def test_lazy_batches_change_only_the_summation_order():
    W, X, H = _layer(6, cols=96)
    q = _calibrated((16, 1), W)
    s, o = q.scale_offset()
    ref = _reference_gptq(W, H, s.detach(), o.detach(), q.qmin, q.qmax)
    Wq, _ = pyquant.techniques.gptq_weight(q, W, H, block_columns=16)
    codes, ref_codes = torch.round(Wq / s.detach()), torch.round(ref / s.detach())
    assert (codes != ref_codes).float().mean() < 0.01  # a rounding tie may flip, no more
    assert _out_err(X, W, Wq) == pytest.approx(_out_err(X, W, ref), rel=0.02)


def test_per_block_scales_from_updated_weights():
    W, X, H = _layer(7, cols=64)
    B = 16
    q = QuantizeDequantize((16, 64 // B), 4, True, block_size=(1, B))  # needs no calibration: blocks are dynamic
    Wq, enc = pyquant.techniques.gptq_weight(q, W, H, block_columns=40)  # lazy batches round up to whole blocks
    ref = _reference_gptq(W, H, None, None, q.qmin, q.qmax, block=B)
    codes = torch.round(Wq / enc.scale.repeat_interleave(B, 1))
    ref_codes = torch.round(ref / enc.scale.repeat_interleave(B, 1))
    assert (codes != ref_codes).float().mean() < 0.01
    assert enc.scale.shape == (16, 4) and enc.block_size == (1, B)
    rtn = _calibrated((16, 64 // B), W, block_size=(1, B))
    assert _out_err(X, W, Wq) < 0.8 * _out_err(X, W, rtn(W).detach())


def test_tiny_llama_w4_beats_plain_calibration_with_exact_integers():
    model, calib, ev, ref = llama_case()
    plain = model_output_mse(llama_sim(model, calib), calib, ev, ref)
    sim = llama_sim(model, calib)
    res = pyquant.gptq(sim, calib, act_order=True)
    assert len(res.layers) == 15 and "model.embed_tokens.weight" in res.skipped
    assert sum(r.mse_after for r in res.layers) < sum(r.mse_before for r in res.layers)
    weights = {r.name: sim.weight(r.name).detach().clone() for r in res.layers}
    after = model_output_mse(sim, calib, ev, ref)
    assert after < plain
    for n, w in weights.items():
        q = sim.quantizer(n)
        assert q.frozen
        with torch.no_grad():
            assert torch.equal(q(w), w)  # the simulation keeps GPTQ's values as they are
        s = q.get_encoding().scale
        assert torch.allclose(w / s, torch.round(w / s), atol=1e-3)  # integers times the scale
    assert "GPTQ" in res.summary()


def test_fx_module_model():
    res, mse, plain = fx_outputs_mse(pyquant.gptq, batch_size=16)
    assert [r.name for r in res.layers] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert all(r.mse_after < r.mse_before for r in res.layers)
    assert mse < plain


def test_resume_after_interruption(tmp_path, monkeypatch):
    whole, resumed, res, calls = interrupted_then_resumed(pyquant.gptq, gptq_mod, "gptq_weight", tmp_path, monkeypatch)
    model, x, _ = mlp_case()
    assert calls == 3 and len(res.layers) == 3
    for n in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert torch.equal(resumed.weight(n), whole.weight(n))
        assert torch.equal(resumed.quantizer(n).get_encoding().scale, whole.quantizer(n).get_encoding().scale)
    with pytest.warns(UserWarning, match="percdamp"):
        pyquant.gptq(mlp_sim(model, x), x, percdamp=0.1, checkpoint_dir=tmp_path)


def test_bad_arguments():
    model, x, _ = mlp_case()
    sim = mlp_sim(model, x)
    for bad in (-0.01, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="percdamp"):
            pyquant.gptq(sim, x, percdamp=bad)
    with pytest.raises(ValueError, match="block_columns"):
        pyquant.gptq(sim, x, block_columns=0)
    with pytest.raises(ValueError, match="empty"):
        pyquant.gptq(sim, [])
    with pytest.raises(ValueError, match="at least one sample"):
        pyquant.gptq(sim, x[:0])
    W, _, H = _layer(8)
    with pytest.raises(ValueError, match="no encoding"):
        pyquant.techniques.gptq_weight(QuantizeDequantize((16, 1), 4, True), W, H)
    with pytest.raises(ValueError, match="not positive definite"):  # no dampening of a singular Hessian
        q = _calibrated((16, 1), W)
        pyquant.techniques.gptq_weight(q, W, -torch.eye(48), percdamp=0.0, name="fc9")


def test_per_block_weight_quantizers_in_a_simulation():
    model, x, _ = mlp_case()
    sim = block_sim(model, x, 8)
    res = pyquant.gptq(sim, x)
    assert len(res.layers) == 3 and all(r.mse_after < r.mse_before for r in res.layers)
    for r in res.layers:
        q, w = sim.quantizer(r.name), sim.weight(r.name).detach()
        assert q.frozen and q.get_encoding().scale.shape == (w.shape[0], w.shape[1] // 8)
        with torch.no_grad():
            assert torch.equal(q(w), w)


def test_tiny_llama_per_block_w4_beats_plain_calibration():
    model, calib, ev, ref = llama_case()
    plain = model_output_mse(pyquant.QuantSim(model, calib[0], quant_scheme="min_max", param_bw=4, output_bw=8,
                                              block_size=16), calib, ev, ref)
    sim = pyquant.QuantSim(model, calib[0], quant_scheme="min_max", param_bw=4, output_bw=8, block_size=16)
    res = pyquant.gptq(sim, calib, progress=False)
    assert len(res.layers) >= 14
    for r in res.layers:
        w = sim.weight(r.name)
        assert sim.quantizer(r.name).get_encoding().scale.shape == (w.shape[0], w.shape[1] // 16)
    assert model_output_mse(sim, calib, ev, ref) < plain


def test_lpbq_weight_quantizers_keep_exact_integers():
    model, x, _ = mlp_case()
    sim = block_sim(model, x, 8, decompressed_bw=8)
    res = pyquant.gptq(sim, x, progress=False)
    assert len(res.layers) == 3 and all(r.mse_after < r.mse_before for r in res.layers)
    for r in res.layers:
        q, w = sim.quantizer(r.name), sim.weight(r.name).detach()
        assert type(q).__name__ == "LpbqQuantizeDequantize"
        with torch.no_grad():
            assert torch.equal(q(w), w)


def test_fewer_calibration_rows_than_input_columns_is_warned():
    import warnings

    from layerwise_sims import Mlp, mlp_sim

    model = Mlp().eval()
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(3))
    with pytest.warns(pyquant.PyquantWarning, match=r"'fc1.weight' has 8 calibration rows for 24 input columns"):
        pyquant.gptq(mlp_sim(model, x[:8]), x[:8])
    with warnings.catch_warnings():
        warnings.simplefilter("error", pyquant.PyquantWarning)
        pyquant.gptq(mlp_sim(model, x), x)            # 64 rows >= 48 columns: no warning
