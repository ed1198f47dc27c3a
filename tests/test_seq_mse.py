"""SeqMSE: per channel and per block it picks the clipping range a brute-force loop over the candidates
picks (output error computed directly from the input rows in pure torch); on a tiny Llama (torch.export,
dict inputs) and an MLP (torch.fx) at W4 it lowers the model-output error against plain calibration,
freezes the encodings it sets, resumes after an interruption to the same result, and refuses bad
arguments by name."""
from __future__ import annotations

import importlib

import pytest
import torch

import pyquant
from pyquant.quant import QuantizeDequantize
from layerwise_sims import (block_sim, fx_outputs_mse, interrupted_then_resumed, llama_case, llama_sim, mlp_case,
                            mlp_sim, model_output_mse)

seq_mod = importlib.import_module("pyquant.techniques.seq_mse")


def _qdq(w, s, o, qmin, qmax):
    """Pure-torch fake quantization (round half to even, as the op)."""
    return (torch.clamp(torch.round(w / s) - o, qmin, qmax) + o) * s


def _scale_offset(mn, mx, bits, symmetric):
    """Pure-torch range -> (scale, offset) on the signed grid (symmetric) or the unsigned one."""
    mn, mx = torch.clamp(mn, max=0), torch.clamp(mx, min=0)
    if symmetric:
        qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
        return torch.maximum(mx / qmax, mn / qmin), torch.zeros_like(mn), qmin, qmax
    qmin, qmax = 0, 2 ** bits - 1
    s = (mx - mn) / (qmax - qmin)
    return s, torch.clamp(torch.round(mn / s) - qmin, -qmax, -qmin), qmin, qmax


def _brute_force(W, X, B, C, bits, symmetric):
    """For every (row, block of B columns): the index k (0: the full range) of the candidate range
    (C - k) / C * [min, max] whose block output error ||X_b (w_b - q(w_b))||^2 is least (first on ties)."""
    out, cols = W.shape
    pick = torch.zeros(out, cols // B, dtype=torch.long)
    for r in range(out):
        for b in range(cols // B):
            w, x = W[r, b * B:(b + 1) * B], X[:, b * B:(b + 1) * B]
            best = None
            for k in range(C):
                f = (C - k) / C
                s, o, qmin, qmax = _scale_offset(w.min() * f, w.max() * f, bits, symmetric)
                loss = float((x.double() @ (w - _qdq(w, s, o, qmin, qmax)).double()).pow(2).sum())
                if best is None or loss < best[0]:
                    best = (loss, k)
            pick[r, b] = best[1]
    return pick


def _picked(enc, W, B, C, bits, symmetric):
    """Which candidate each group's chosen scale is (the nearest candidate scale)."""
    out, cols = W.shape
    Wb = W.reshape(out, cols // B, B)
    cands = torch.stack([_scale_offset(Wb.amin(-1) * (C - k) / C, Wb.amax(-1) * (C - k) / C, bits, symmetric)[0]
                         for k in range(C)])                                      # [C, out, nb]
    return (cands - enc.scale.reshape(1, out, cols // B)).abs().argmin(0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [None, 8])
def test_picks_the_brute_force_candidate(symmetric, block):
    g = torch.Generator().manual_seed(3)
    out, cols, C = 12, 32, 10
    W = torch.randn(out, cols, generator=g) * torch.rand(out, 1, generator=g)
    W[0, 5] = 4.0  # an outlier: clipping pays off on that row
    X = torch.randn(200, cols, generator=g) * (1 + 3 * torch.rand(cols, generator=g))
    B = cols if block is None else block
    q = QuantizeDequantize((out, cols // B), 4, symmetric, block_size=None if block is None else (1, B))
    enc = pyquant.techniques.seq_mse_encoding(q, W, X.double().t() @ X.double(), C)
    want = _brute_force(W, X, B, C, 4, symmetric)
    assert torch.equal(_picked(enc, W, B, C, 4, symmetric), want)
    assert (want > 0).any()  # some group clips: the test can tell a search from plain min/max
    assert enc.block_size == q.block_size


def test_one_candidate_is_round_to_nearest():
    g = torch.Generator().manual_seed(4)
    W, X = torch.randn(8, 16, generator=g), torch.randn(50, 16, generator=g)
    q = QuantizeDequantize((8, 1), 4, True)
    enc = pyquant.techniques.seq_mse_encoding(q, W, X.t() @ X, 1)
    with q.compute_encodings():
        q(W)
    torch.testing.assert_close(enc.scale, q.get_encoding().scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(enc.quantize_dequantize(W), q(W).detach(), rtol=1e-6, atol=1e-7)


def test_tiny_llama_w4_beats_plain_calibration_and_freezes():
    model, calib, ev, ref = llama_case()
    plain = model_output_mse(llama_sim(model, calib), calib, ev, ref)
    sim = llama_sim(model, calib)
    res = pyquant.seq_mse(sim, calib, num_candidates=16)
    names = [r.name for r in res.layers]
    assert len(names) == 15 and "lm_head.weight" in names  # 7 per decoder layer and the head
    assert "model.embed_tokens.weight" in res.skipped       # a lookup table, not a linear layer
    assert all(r.mse_after <= r.mse_before for r in res.layers)
    assert sum(r.mse_after for r in res.layers) < sum(r.mse_before for r in res.layers)
    chosen = {n: sim.quantizer(n).get_encoding().scale.clone() for n in names}
    assert all(sim.quantizer(n).frozen for n in names)
    after = model_output_mse(sim, calib, ev, ref)
    assert after < plain
    for n in names:  # compute_encodings kept what SeqMSE chose
        assert torch.equal(sim.quantizer(n).get_encoding().scale, chosen[n])
    assert "SeqMSE" in res.summary()


def test_fx_module_model():
    res, mse, plain = fx_outputs_mse(pyquant.seq_mse, batch_size=16)
    assert [r.name for r in res.layers] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert all(r.rows == 64 for r in res.layers)
    assert mse < plain


def test_resume_after_interruption(tmp_path, monkeypatch):
    whole, resumed, res, calls = interrupted_then_resumed(pyquant.seq_mse, seq_mod, "seq_mse_encoding", tmp_path, monkeypatch)
    model, x, _ = mlp_case()
    assert calls == 3 and len(res.layers) == 3  # two layers from the checkpoint, one computed now
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # one file per layer, one for the job, the lock
        ".pyquant.lock", "seq_mse_checkpoint.pt", "seq_mse_layer_0000.pt", "seq_mse_layer_0001.pt", "seq_mse_layer_0002.pt"]
    for n in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert torch.equal(resumed.quantizer(n).get_encoding().scale, whole.quantizer(n).get_encoding().scale)
        assert resumed.quantizer(n).frozen
    with pytest.warns(UserWarning, match="num_candidates"):  # other settings: not resumed, and said why
        pyquant.seq_mse(mlp_sim(model, x), x, num_candidates=5, checkpoint_dir=tmp_path)


def test_bad_arguments():
    model, x, _ = mlp_case()
    sim = mlp_sim(model, x)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_candidates"):
            pyquant.seq_mse(sim, x, num_candidates=bad)
    with pytest.raises(ValueError, match="empty"):
        pyquant.seq_mse(sim, [])
    with pytest.raises(ValueError, match="at least one sample"):
        pyquant.seq_mse(sim, x[:0])
    with pytest.raises(TypeError, match="QuantSim"):
        pyquant.seq_mse(model, x)
    q = QuantizeDequantize((8, 1), 4, True)
    with pytest.raises(ValueError, match="gram"):
        pyquant.techniques.seq_mse_encoding(q, torch.randn(8, 16), torch.eye(8))


def test_nothing_to_do_when_every_weight_is_frozen():
    model, x, _ = mlp_case()
    sim = mlp_sim(model, x)
    sim.compute_encodings(x)
    for q in sim.param_quantizers.values():
        q.freeze()
    with pytest.warns(pyquant.NothingToDoWarning):
        res = pyquant.seq_mse(sim, x)
    assert res.layers == [] and set(res.skipped) == set(sim.param_quantizers)


def test_per_block_weight_quantizers_in_a_simulation():
    model, x, _ = mlp_case()
    sim = block_sim(model, x, 8)
    res = pyquant.seq_mse(sim, x)
    assert len(res.layers) == 3 and all(r.mse_after <= r.mse_before for r in res.layers)
    for r in res.layers:
        q, w = sim.quantizer(r.name), sim.weight(r.name)
        assert q.frozen and q.get_encoding().scale.shape == (w.shape[0], w.shape[1] // 8)


def test_candidates_in_several_calls_choose_the_same(monkeypatch):
    g = torch.Generator().manual_seed(9)
    W, X = torch.randn(12, 32, generator=g), torch.randn(100, 32, generator=g)
    q = QuantizeDequantize((12, 1), 4, False)
    one_call = pyquant.techniques.seq_mse_encoding(q, W, X.t() @ X, 9)
    monkeypatch.setattr(seq_mod, "_CHUNK_BYTES", 2 * W.numel() * 16)  # two candidates per call
    several = pyquant.techniques.seq_mse_encoding(q, W, X.t() @ X, 9)
    assert torch.equal(one_call.scale, several.scale) and torch.equal(one_call.offset, several.offset)


def test_tiny_llama_per_block_w4_beats_plain_calibration():
    model, calib, ev, ref = llama_case()
    plain = model_output_mse(pyquant.QuantSim(model, calib[0], quant_scheme="min_max", param_bw=4, output_bw=8,
                                              block_size=16), calib, ev, ref)
    sim = pyquant.QuantSim(model, calib[0], quant_scheme="min_max", param_bw=4, output_bw=8, block_size=16)
    res = pyquant.seq_mse(sim, calib, progress=False)
    assert len(res.layers) >= 14
    for r in res.layers:
        w = sim.weight(r.name)
        assert sim.quantizer(r.name).get_encoding().scale.shape == (w.shape[0], w.shape[1] // 16)
    assert model_output_mse(sim, calib, ev, ref) < plain
