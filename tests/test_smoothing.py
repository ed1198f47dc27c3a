"""Activation smoothing: the smoothed FP32 model computes what the original did (LLM, Gemma, BERT and module
models, grouped-query attention included), activation channel ranges flatten, and W8A8 with per-tensor
activations loses less."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyquant import NothingToDoWarning, QuantSim
from pyquant.techniques import SmoothingResult, smooth_activations

from zoo import GemmaStyleRMSNorm, LlamaStyleRMSNorm, tiny_llama

transformers = pytest.importorskip("transformers")


def _plant_gain_outliers(model: nn.Module, factor: float = 20.0, channels: int = 3) -> None:
    """Norm gains with a few large channels, as trained transformers have: the norm outputs get outlier
    channels. Gemma-style gains (1 + w) get w = factor - 1 there."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in model.named_modules():
            w = getattr(m, "weight", None)
            if "norm" not in type(m).__name__.lower() or not isinstance(w, torch.Tensor) or w.dim() != 1:
                continue
            w.add_(0.3 * torch.randn(w.shape, generator=g))
            idx = torch.randperm(w.numel(), generator=g)[:channels]
            w[idx] = factor - 1 if isinstance(m, GemmaStyleRMSNorm) or "Gemma" in type(m).__name__ else w[idx] * factor


def _outputs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    with torch.no_grad():
        outs = []
        for b in batches:
            y = model(**b) if isinstance(b, dict) else model(*b)
            outs.append((y.logits if hasattr(y, "logits") else y.last_hidden_state if hasattr(y, "last_hidden_state")
                         else y).clone())
        return outs


def _assert_same(before: list[torch.Tensor], after: list[torch.Tensor], rel: float = 1e-5) -> None:
    for a, b in zip(before, after):
        scale = float(a.abs().max())
        assert scale > 0
        torch.testing.assert_close(b, a, rtol=0, atol=rel * scale)


def _tokens(vocab: int, n: int = 3, seq: int = 12, mask: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        b = {"input_ids": torch.randint(1, vocab, (2, seq), generator=g)}
        if mask:
            m = torch.ones(2, seq, dtype=torch.long)
            m[1, seq // 2:] = 0  # one padded sequence
            b["attention_mask"] = m
        out.append(b)
    return out


def _changed(model: nn.Module, ref: nn.Module, name: str) -> bool:
    return not torch.equal(dict(model.named_parameters())[name], dict(ref.named_parameters())[name])


# ---- exactness ----------------------------------------------------------------------------------------
def test_llama_stays_exact_and_scales_every_pair():
    torch.manual_seed(0)
    model = tiny_llama()
    _plant_gain_outliers(model)
    data = _tokens(256)
    ref = copy.deepcopy(model)
    res = smooth_activations(model, data)
    assert isinstance(res, SmoothingResult)
    by_source = {p.source: p for p in res.pairs}
    for i in range(2):
        attn_norm = by_source[f"model.layers.{i}.input_layernorm"]
        assert attn_norm.layers == tuple(f"model.layers.{i}.self_attn.{x}_proj" for x in "qkv")
        assert by_source[f"model.layers.{i}.post_attention_layernorm"].layers == (
            f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj")
        assert by_source[f"model.layers.{i}.self_attn.v_proj"].layers == (f"model.layers.{i}.self_attn.o_proj",)
        up_down = by_source[f"model.layers.{i}.mlp.up_proj"]
        assert (up_down.kind, up_down.layers) == ("up-down", (f"model.layers.{i}.mlp.down_proj",))
        assert _changed(model, ref, f"model.layers.{i}.mlp.down_proj.weight")
        assert _changed(model, ref, f"model.layers.{i}.input_layernorm.weight")
        assert _changed(model, ref, f"model.layers.{i}.self_attn.q_proj.weight")
    assert by_source["model.norm"].layers == ("lm_head",)
    assert not res.skipped
    _assert_same(_outputs(ref, data), _outputs(model, data))


def test_gqa_value_scales_reach_every_output_column_that_reads_them():
    """4 query heads share 2 value heads: o_proj column (h, d) must take the scale of value channel
    (h // 2, d), and the model stays exact."""
    torch.manual_seed(0)
    model = tiny_llama()
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    data = _tokens(256)
    ref = copy.deepcopy(model)
    res = smooth_activations(model, data)
    assert any(p.kind == "value-output" for p in res.pairs)
    hd = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        att, att0 = model.model.layers[i].self_attn, ref.model.layers[i].self_attn
        # v's rows are divided by s (its columns also took the input norm's scales: one common factor per
        # column), o's columns multiplied by s
        s_v = (att0.v_proj.weight[:, 0] / att.v_proj.weight[:, 0]).detach()
        s_o = (att.o_proj.weight[0, :] / att0.o_proj.weight[0, :]).detach()
        # the independent GQA map: query head h reads value head h // group
        cols = torch.arange(cfg.num_attention_heads * hd)
        v_channel = (cols // hd) // group * hd + cols % hd
        ratio = s_o / s_v[v_channel]
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-5, atol=0)
        assert float(s_o.max() / s_o.min()) > 1.01  # not a uniform (trivial) scale
    _assert_same(_outputs(ref, data), _outputs(model, data))


def _tiny_gemma3() -> nn.Module:
    cfg = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64, sliding_window=8)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def test_gemma3_one_plus_weight_gains_stay_exact():
    torch.manual_seed(0)
    model = _tiny_gemma3()
    _plant_gain_outliers(model, factor=8.0)
    data = _tokens(128)
    ref = copy.deepcopy(model)
    res = smooth_activations(model, data)
    sources = {p.source for p in res.pairs}
    assert {f"model.layers.{i}.input_layernorm" for i in range(2)} <= sources
    assert {f"model.layers.{i}.pre_feedforward_layernorm" for i in range(2)} <= sources
    assert {f"model.layers.{i}.self_attn.v_proj" for i in range(2)} <= sources
    # the gain is 1 + w: the new w is (1 + w) / s - 1, so (1 + w_new) * s == 1 + w_old
    p = next(p for p in res.pairs if p.source == "model.layers.0.input_layernorm")
    assert p.max_scale > 1.5
    _assert_same(_outputs(ref, data), _outputs(model, data), rel=2e-5)


def _tiny_bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def test_bert_post_layernorms_are_skipped_and_named_values_smoothed_exactly():
    """Post-LN: each LayerNorm's output is also the next residual's input, so scaling its gain would change
    the model; those pairs are skipped with the reason, the value -> output pairs are smoothed."""
    torch.manual_seed(0)
    model = _tiny_bert()
    data = _tokens(100, mask=True)
    ref = copy.deepcopy(model)
    res = smooth_activations(model, data)
    assert {p.source for p in res.pairs} == {f"encoder.layer.{i}.attention.self.value" for i in range(2)}
    assert all(p.layers == (p.source.replace("self.value", "output.dense"),) for p in res.pairs)
    skipped = [k for k in res.skipped if k.startswith("encoder.layer.0.attention.output.LayerNorm")]
    assert skipped and "not a Linear" in res.skipped[skipped[0]]
    assert any(k.startswith("embeddings.LayerNorm") for k in res.skipped)
    assert not _changed(model, ref, "embeddings.LayerNorm.weight")
    assert "skipped embeddings.LayerNorm" in res.summary()
    _assert_same(_outputs(ref, data), _outputs(model, data))


class _NormBlock(nn.Module):
    def __init__(self, dim: int, norm: nn.Module):
        super().__init__()
        self.norm, self.q, self.k = norm, nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.out(torch.relu(self.q(h)) * self.k(F.dropout(h, 0.1, self.training)))


class _NormModel(nn.Module):
    """Blocks with nn.LayerNorm (with and without bias), nn.RMSNorm and the written-out RMSNorms, and a final
    norm whose output also feeds a sum (not smoothable)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.inp = nn.Linear(8, dim)
        norms = [nn.LayerNorm(dim), nn.LayerNorm(dim, bias=False), nn.RMSNorm(dim, eps=1e-6),
                 LlamaStyleRMSNorm(dim), GemmaStyleRMSNorm(dim)]
        self.blocks = nn.ModuleList([_NormBlock(dim, n) for n in norms])
        self.final = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        n = self.final(h)
        return self.head(n) + n.sum(-1, keepdim=True)


def test_module_norms_stay_exact_and_a_shared_norm_output_is_skipped():
    torch.manual_seed(0)
    model = _NormModel().eval()
    with torch.no_grad():
        for b in model.blocks:
            if getattr(b.norm, "bias", None) is not None:
                b.norm.bias.normal_(0, 0.5)
    _plant_gain_outliers(model)
    data = torch.randn(24, 5, 8)
    ref = copy.deepcopy(model)
    res = smooth_activations(model, data, batch_size=8)
    sources = {p.source for p in res.pairs if p.kind == "norm"}
    assert sources == {f"blocks.{i}.norm" for i in range(5)}
    assert all(p.layers == (p.source.replace("norm", "q"), p.source.replace("norm", "k"))
               for p in res.pairs if p.kind == "norm")
    assert list(res.skipped) == ["final -> head"] and "not a Linear" in res.skipped["final -> head"]
    for i in range(5):
        assert _changed(model, ref, f"blocks.{i}.norm.weight")
    assert _changed(model, ref, "blocks.0.norm.bias")
    _assert_same(_outputs(ref, [(data,)]), _outputs(model, [(data,)]))


# ---- what it is for --------------------------------------------------------------------------------------
class _Mlp(nn.Module):
    def __init__(self, dim: int = 32, norm: type = nn.LayerNorm):
        super().__init__()
        self.norm, self.up, self.down = norm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.norm(x))))


def _norm_output_spread(model: _Mlp, x: torch.Tensor) -> float:
    with torch.no_grad():
        r = model.norm(x).abs().reshape(-1, x.shape[-1]).amax(0)
    return float(r.max() / r.median())


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_outlier_channels_flatten(norm):
    torch.manual_seed(0)
    model = _Mlp(norm=norm).eval()
    _plant_gain_outliers(model, factor=30.0)
    x = torch.randn(64, 16, 32)
    before = _norm_output_spread(model, x)
    res = smooth_activations(model, x, batch_size=16)
    after = _norm_output_spread(model, x)
    assert before > 10
    assert after < before / 3
    assert res.pairs[0].spread_before == pytest.approx(before, rel=1e-4)
    assert res.pairs[0].spread_after == pytest.approx(after, rel=1e-3)


def _w8a8_error(model: nn.Module, calib: torch.Tensor, test: torch.Tensor) -> float:
    sim = QuantSim(model, calib[:8], quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="default")
    sim.compute_encodings(lambda m: [m(calib[i:i + 16]) for i in range(0, len(calib), 16)])
    with torch.no_grad():
        y, yq = model(test), sim.model(test)
    return float((yq - y).pow(2).mean() / y.pow(2).mean())


def test_w8a8_per_tensor_error_drops():
    torch.manual_seed(0)
    model = _Mlp().eval()
    _plant_gain_outliers(model, factor=40.0)
    calib, test = torch.randn(64, 16, 32), torch.randn(32, 16, 32)
    before = _w8a8_error(model, calib, test)
    smooth_activations(model, calib, batch_size=16)
    after = _w8a8_error(model, calib, test)
    assert after < 0.5 * before, (before, after)


# ---- settings and nothing to do --------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_alpha_is_a_clear_error(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        smooth_activations(_Mlp(), torch.randn(4, 3, 32), alpha=alpha)


def test_model_without_pairs_is_left_alone_with_a_warning():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    ref = copy.deepcopy(model)
    with pytest.warns(NothingToDoWarning, match="no norm"):
        res = smooth_activations(model, torch.randn(4, 8))
    assert res.pairs == []
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_alpha_one_flattens_the_activation_and_alpha_zero_the_weights():
    torch.manual_seed(0)
    x = torch.randn(16, 4, 32)
    model = _Mlp().eval()
    _plant_gain_outliers(model, factor=30.0)
    m0, m1 = copy.deepcopy(model), copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r0 = smooth_activations(m0, x, alpha=0.0)
        r1 = smooth_activations(m1, x, alpha=1.0)
    # alpha 0: s = 1 / max|W_j|, the activation spread scales with the weights' column maxima only;
    # alpha 1: s = max|X_j|, every activation channel's range becomes 1
    assert r1.pairs[0].spread_after == pytest.approx(1.0, rel=1e-4)
    wmax = model.up.weight.abs().amax(0)
    torch.testing.assert_close(m0.norm.weight, model.norm.weight * wmax, rtol=1e-5, atol=0)


# ---- AutoQuant ------------------------------------------------------------------------------------------
def test_autoquant_tries_smoothing_on_a_model_with_norm_pairs(tmp_path):
    from pyquant import AutoQuant

    torch.manual_seed(0)
    model = _Mlp().eval()
    _plant_gain_outliers(model, factor=40.0)
    x = torch.randn(64, 16, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    fn = lambda m: 1.0 - float((m(x) - ref).norm() / ref.norm())  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aq = AutoQuant(model, x[:1], x, fn, quant_schemes=("tf_enhanced",), bias_correction=None, adaround=False,
                       progress=False)
        res = aq.optimize(allowed_accuracy_drop=0.0, output_dir=tmp_path)
    st = {s.key: s for s in res.steps}
    assert st["smoothing"].status == "evaluated"
    # smoothing helps this model: it is the best step and the result says it carries it
    assert st["smoothing"].accuracy > st["quantsim"].accuracy
    assert res.best_step == "smoothing" and "activation smoothing" in res.applied
    assert fn(res.sim.model) == pytest.approx(res.accuracy, abs=1e-6)


def test_autoquant_smoothing_alpha_is_checked():
    from pyquant import AutoQuant

    with pytest.raises(ValueError, match=r"smoothing_alpha must be a number in \[0, 1\]"):
        AutoQuant(_Mlp(), torch.randn(1, 4, 32), torch.randn(8, 4, 32), lambda m: 0.0, smoothing_alpha=2.0)


class _GatedMLP(nn.Module):
    def __init__(self, leak: bool = False):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.leak = leak

    def forward(self, x):
        p = F.silu(self.gate(x)) * self.up(x)
        y = self.down(p)
        return y + p.mean(-1, keepdim=True) if self.leak else y


def test_gated_mlp_up_rows_absorb_the_down_projections_input_outliers():
    torch.manual_seed(0)
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:  # outlier channels in the product the down projection reads
            layer.mlp.up_proj.weight[[3, 17]] *= 40.0
    data = _tokens(256)
    ref = copy.deepcopy(model)
    res = smooth_activations(model, data, value_output=False)
    for i, (layer, layer0) in enumerate(zip(model.model.layers, ref.model.layers)):
        pair = next(p for p in res.pairs if p.source == f"model.layers.{i}.mlp.up_proj")
        assert pair.spread_after < pair.spread_before / 4
        # down's column j took exactly the factor up's row j gave up (up's columns also took the norm pair's
        # scales: one common factor per column)
        s_up = (layer0.mlp.up_proj.weight[:, 0] / layer.mlp.up_proj.weight[:, 0]).detach()
        s_down = (layer.mlp.down_proj.weight[0, :] / layer0.mlp.down_proj.weight[0, :]).detach()
        ratio = s_down / s_up
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-5, atol=0)
        assert float(s_down[[3, 17]].min()) > float(s_down.median()) * 4  # the outlier channels moved most
    _assert_same(_outputs(ref, data), _outputs(model, data))


def test_gated_product_read_elsewhere_is_skipped_and_named():
    from pyquant.techniques import smoothing_pairs

    x = torch.randn(4, 3, 8)
    assert smoothing_pairs(_GatedMLP().eval(), x) == ["up -> down"]
    model = _GatedMLP(leak=True).eval()
    ref = copy.deepcopy(model)
    assert smoothing_pairs(model, x) == []
    with pytest.warns(NothingToDoWarning):
        res = smooth_activations(model, [x], progress=False)
    assert "also feeds" in res.skipped["up -> down"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    with pytest.warns(NothingToDoWarning):
        assert smooth_activations(_GatedMLP().eval(), [x], gated_mlp=False, progress=False).pairs == []


def test_smoothing_pairs_lists_without_changing_anything():
    from pyquant.techniques import smoothing_pairs

    model = _NormModel().eval()
    ref = copy.deepcopy(model)
    pairs = smoothing_pairs(model, torch.randn(2, 5, 8))
    assert pairs == ([f"blocks.{i}.norm -> blocks.{i}.q, blocks.{i}.k" for i in range(5)]
                     + [f"blocks.{i}.k -> blocks.{i}.out" for i in range(5)])  # relu(q) * k gates k
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert smoothing_pairs(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 8)) == []


def _fake_quant_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> float:
    """W8A8 output error of y = x w^T after smoothing by s, in plain torch: x / s per tensor on the unsigned
    8-bit grid, w * s per output channel on the signed one."""
    xs, ws = x / s, w * s
    lo, hi = min(float(xs.min()), 0.0), max(float(xs.max()), 0.0)
    sx = (hi - lo) / 255
    ox = torch.round(torch.tensor(lo / sx))
    qx = (torch.clamp(torch.round(xs / sx) - ox, 0, 255) + ox) * sx
    sw = ws.abs().amax(1, keepdim=True) / 127
    qw = torch.clamp(torch.round(ws / sw), -128, 127) * sw
    return float((qx @ qw.T - x @ w.T).pow(2).sum())


def test_alpha_search_picks_the_least_w8a8_layer_error():
    torch.manual_seed(0)
    model = _Mlp().eval()
    _plant_gain_outliers(model, factor=40.0)
    x = torch.randn(32, 16, 32)
    candidates = (0.2, 0.5, 0.8, 1.0)
    with torch.no_grad():
        rows = model.norm(x).reshape(-1, 32)
        w = model.up.weight.clone()
    xmax, wmax = rows.abs().amax(0), w.abs().amax(0)
    errors = [_fake_quant_error(rows, w, xmax.pow(a) / wmax.pow(1 - a)) for a in candidates]
    best = candidates[min(range(len(candidates)), key=errors.__getitem__)]
    assert len({round(e, 3) for e in errors}) == len(errors)  # the candidates differ
    # every row goes into the search (search_rows covers the data), so the choice can be recomputed
    res = smooth_activations(model, x, alpha=candidates, batch_size=8, search_rows=len(rows))
    assert res.pairs[0].alpha == best
    with torch.no_grad():
        torch.testing.assert_close(model.up.weight, w * (xmax.pow(best) / wmax.pow(1 - best)), rtol=1e-5, atol=0)


def test_bad_alpha_sequence_and_search_rows_are_clear_errors():
    with pytest.raises(ValueError, match="empty sequence"):
        smooth_activations(_Mlp(), torch.randn(4, 3, 32), alpha=())
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        smooth_activations(_Mlp(), torch.randn(4, 3, 32), alpha=(0.5, 2.0))
    with pytest.raises(ValueError, match="search_rows must be a positive int"):
        smooth_activations(_Mlp(), torch.randn(4, 3, 32), alpha=(0.5, 0.6), search_rows=0)
