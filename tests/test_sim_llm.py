"""QuantSim for decoder language models: a simulation built on the model itself (in_place), one capture for
every batch size and sequence length (also in the ONNX export), quantizers on the keys and values attention
reads (kv_bw), and generate() with a key/value cache through the simulation (kv_cache)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import pyquant
from pyquant.sim import memory
from pyquant.sim.config import ConfigError, load_config
from pyquant.sim.export import run_onnx
from pyquant.sim.quantsim import QuantSim
import zoo
from helpers import assert_onnx_runs_simulation, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")

VOCAB, MAX_POS = 256, 64


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _llama():
    torch.manual_seed(0)
    return zoo.tiny_llama()


def _gemma(impl: str = "sdpa"):
    torch.manual_seed(0)
    return zoo.tiny_gemma3(impl)


def _sim(model, **kw) -> QuantSim:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QuantSim(model, {"input_ids": _ids(2, 16, 1)}, **kw)


def _kv_names(sim: QuantSim) -> list[str]:
    return [n for n in sim.placement if n.endswith((".key", ".value"))]


# ---- no second copy -----------------------------------------------------------------------------------
def test_in_place_shares_the_model_parameters_and_a_copy_does_not():
    model = _llama()
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    shared = _sim(model, in_place=True)
    assert shared.in_place
    for n, ptr in ptrs.items():  # every parameter, quantized (weights) or not (norms), under its own name
        assert shared.model.get_parameter(n).data_ptr() == ptr, n
    for n in shared.param_quantizers:
        assert shared.weight(n).data_ptr() == ptrs[n], n
    with torch.no_grad():  # a technique writing the simulation's weight writes the model's
        shared.weight("lm_head.weight").mul_(0.5)
    assert model.lm_head.weight.data_ptr() == ptrs["lm_head.weight"]
    assert torch.equal(model.lm_head.weight, shared.weight("lm_head.weight"))

    other = _llama()
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    copied = _sim(other)
    for n in copied.param_quantizers:
        assert copied.weight(n).data_ptr() != other.get_parameter(n).data_ptr(), n
    with torch.no_grad():
        copied.weight("lm_head.weight").mul_(0.5)
    for n, p in other.named_parameters():
        assert torch.equal(p, before[n]), n


def test_in_place_simulates_like_a_copy():
    ids = _ids(2, 16, 1)
    sims = [_sim(_llama(), in_place=flag) for flag in (False, True)]
    outs = []
    for sim in sims:
        sim.compute_encodings(lambda m: m(input_ids=ids))
        outs.append(sim.model(input_ids=_ids(3, 9, 2)).logits)
    assert torch.equal(outs[0], outs[1])


def test_a_copy_that_does_not_fit_fails_before_copying(monkeypatch):
    model = _llama()
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    need += sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory.model_bytes(model) == {torch.device("cpu"): need}
    monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)
    copies = []
    monkeypatch.setattr("pyquant.sim.quantsim.copy.deepcopy", lambda m: copies.append(m) or m)
    with pytest.raises(MemoryError, match=rf"needs {need} bytes .* only {need - 1} bytes .*in_place=True"):
        _sim(model)
    assert not copies
    _sim(model, in_place=True)  # needs no copy


def test_model_bytes_counts_a_tied_weight_once():
    emb = torch.nn.Embedding(100, 8)
    head = torch.nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.Sequential(emb, head)
    assert memory.model_bytes(model)[torch.device("cpu")] == 100 * 8 * 4


def test_available_bytes_reads_meminfo():
    have = memory.available_bytes(torch.device("cpu"))
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert have is not None and 0 < have <= total


def test_in_place_and_kv_bw_are_checked():
    model = _llama()
    with pytest.raises(TypeError, match="in_place must be True or False"):
        _sim(model, in_place=1)
    for bad in (1, 17, 8.0, True):
        with pytest.raises(ValueError, match=r"kv_bw must be None or an integer bit width in 2\.\.16"):
            _sim(model, kv_bw=bad)
    with pytest.raises(TypeError, match="kv_cache must be True or False"):
        _sim(model, kv_cache="yes")
    with pytest.raises(ValueError, match="kv_cache=True captures a transformers language model"):
        QuantSim(torch.nn.Linear(4, 4), torch.randn(2, 4), kv_cache=True)


# ---- dynamic lengths ----------------------------------------------------------------------------------
MODELS = {"llama": _llama, "gemma3": _gemma, "gemma3-eager": lambda: _gemma("eager")}


def _mask(batch: int, length: int, pad_right: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_right:
        mask[0, length - pad_right:] = 0
    return mask


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("with_mask", [False, True])
def test_one_simulation_runs_every_length_and_batch_size(name, with_mask):
    model = MODELS[name]()
    calib = _ids(2, 16, 1)
    dummy = {"input_ids": calib, "attention_mask": _mask(2, 16, 3)} if with_mask else {"input_ids": calib}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantSim(model, dummy, kv_bw=8)
    sim.compute_encodings(lambda m: m(**dummy))
    long_ids = _ids(3, 40, 2)
    for length in (1, 5, 40):
        kw = {"input_ids": long_ids[:, :length]}
        if with_mask:
            kw["attention_mask"] = _mask(3, length, 2 if length > 4 else 0)
        got = sim.model(**kw).logits
        assert got.shape == (3, length, VOCAB)
        # causal: the logits of a prefix are those of the longer sequence (fixed encodings, elementwise)
        full = {"input_ids": long_ids, "attention_mask": _mask(3, 40, 0)} if with_mask else {"input_ids": long_ids}
        if with_mask:
            full["attention_mask"][:, :length] = kw["attention_mask"]
        ref = sim.model(**full).logits[:, :length]
        step = float(sim.quantizer(_last_output(sim)).get_encoding().scale.max())
        assert (got - ref).abs().max() <= 2 * step + 1e-5, (name, length)


def _last_output(sim: QuantSim) -> str:
    return [n for n, p in sim.placement.items() if p.kind == "output"][-1]


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_the_capture_is_the_model_at_every_length(name):
    model = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantSim(model, {"input_ids": _ids(2, 16, 1), "attention_mask": _mask(2, 16, 0)})
    for q in sim.quantizers.values():
        q.enabled = False
    for batch, length in ((1, 1), (3, 7), (2, MAX_POS)):
        ids = _ids(batch, length, 3)
        mask = _mask(batch, length, 1 if length > 2 else 0)
        want = model(input_ids=ids, attention_mask=mask).logits
        got = sim.model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_batch_of_one_in_the_example_leaves_batch_and_length_free():
    model = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantSim(model, {"input_ids": _ids(1, 1, 1)})
    for q in sim.quantizers.values():
        q.enabled = False
    ids = _ids(4, 11, 2)
    torch.testing.assert_close(sim.model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_cache", [False, True])
def test_a_sequence_beyond_the_largest_position_is_refused(kv_cache):
    sim = _sim(_llama(), kv_cache=kv_cache)
    for q in sim.quantizers.values():
        q.enabled = False
    sim.model(input_ids=_ids(1, MAX_POS, 1))
    with pytest.raises(ValueError, match=rf"input_ids: a sequence of {MAX_POS + 1} tokens .*"
                                         rf"max_position_embeddings = {MAX_POS}\).*1\.\.{MAX_POS}"):
        sim.model(input_ids=_ids(1, MAX_POS + 1, 1))


@pytest.mark.parametrize("name, with_mask", [("llama", True), ("llama", False), ("gemma3", True)])
def test_the_onnx_export_runs_other_batch_sizes_and_lengths_as_the_simulation(tmp_path, name, with_mask):
    model = MODELS[name]()
    ids, mask = _ids(2, 8, 1), _mask(2, 8, 0)
    dummy = {"input_ids": ids, "attention_mask": mask} if with_mask else {"input_ids": ids}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantSim(model, dummy, kv_bw=8)
    sim.compute_encodings(lambda m: m(**dummy))
    paths = sim.export(tmp_path, "lm")
    for batch, length in ((1, 5), (3, 13)):
        feed = {"input_ids": _ids(batch, length, 4)}
        if with_mask:
            feed["attention_mask"] = _mask(batch, length, 2)
        got = run_onnx(paths["onnx"], *feed.values(), optimize=False)[0]
        want = sim.model(**feed).logits
        assert got.shape == want.shape == (batch, length, VOCAB)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    if name == "llama" and with_mask:  # each key/value quantizer is one QDQ pair, pair by pair the simulation's
        assert_onnx_runs_simulation(sim, paths["onnx"], feed)


def test_a_kv_cache_simulation_exports_the_full_sequence_model(tmp_path, w8a8_kv8):
    paths = w8a8_kv8.export(tmp_path, "lm")
    for batch, length in ((1, 5), (3, 11)):
        ids = _ids(batch, length, 5)
        got = run_onnx(paths["onnx"], ids, optimize=False)
        assert len(got) == 1
        torch.testing.assert_close(got[0], w8a8_kv8.model(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_external_data_beside_the_model_and_large_models_traced_through_a_file(tmp_path, monkeypatch):
    """An export can put its weights in `<prefix>.onnx.data` (automatic beyond 1.5 GiB: protobuf's 2 GiB limit);
    onnxruntime runs it as the in-memory export. A model above the in-memory trace limit goes through a
    temporary file: the same graph."""
    import onnx

    from pyquant.sim import export as E
    from pyquant.sim import onnx_trace
    model = MODELS["llama"]()
    ids = _ids(2, 8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantSim(model, {"input_ids": ids}, param_bw=4, output_bw=8, block_size=16)
    sim.compute_encodings(lambda m: m(input_ids=ids))
    plain = sim.export(tmp_path / "a", "lm")
    assert "onnx_data" not in plain
    ext = sim.export(tmp_path / "b", "lm", external_data=True)
    assert ext["onnx_data"] == tmp_path / "b" / "lm.onnx.data" and ext["onnx_data"].stat().st_size > 100_000
    assert ext["onnx"].stat().st_size < 0.5 * plain["onnx"].stat().st_size  # small tensors (scales) stay inside
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["lm.encodings", "lm.onnx", "lm.onnx.data", "lm.pth"]
    x = _ids(3, 11, 2)
    torch.testing.assert_close(run_onnx(ext["onnx"], x, optimize=False)[0], run_onnx(plain["onnx"], x, optimize=False)[0],
                               rtol=0, atol=0)
    monkeypatch.setattr(E, "EXTERNAL_DATA_BYTES", 1000)  # automatic above the limit
    monkeypatch.setattr(onnx_trace, "TRACE_IN_MEMORY_BYTES", 1000)
    auto = sim.export(tmp_path / "c", "lm")
    assert "onnx_data" in auto
    a, b = onnx.load(str(plain["onnx"])), onnx.load(str(auto["onnx"]))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    torch.testing.assert_close(run_onnx(auto["onnx"], x, optimize=False)[0], run_onnx(plain["onnx"], x, optimize=False)[0],
                               rtol=0, atol=0)


# ---- key/value quantizers -----------------------------------------------------------------------------
def _attention_kv(model, ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values each attention call of the FP32 model reads (scaled_dot_product_attention's)."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((k.detach().clone(), v.detach().clone()))
        return sdpa(q, k, v, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return seen


@pytest.mark.parametrize("name", list(MODELS))
def test_kv_quantizers_read_the_keys_after_rope_and_the_values(name):
    model = MODELS[name]()
    sim = _sim(model, kv_bw=8)
    layers = model.config.num_hidden_layers
    assert _kv_names(sim) == [f"model.layers.{i}.self_attn.{w}" for i in range(layers) for w in ("key", "value")]
    for n in _kv_names(sim):
        p = sim.placement[n]
        q = sim.quantizer(n)
        assert (p.kind, p.op_type, q.bitwidth, q.shape) == ("op_input", "Attention", 8, ())
    for q in sim.quantizers.values():
        q.enabled = False
    seen: dict[str, torch.Tensor] = {}
    hooks = [sim.quantizer(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach()))
             for n in _kv_names(sim)]
    ids = _ids(2, 12, 5)
    sim.model(input_ids=ids)
    for h in hooks:
        h.remove()
    # the FP32 model run with SDPA: the keys it reads are after the rotary embedding (and Gemma's key norm)
    ref_model = MODELS[name.split("-")[0]]()
    want = _attention_kv(ref_model, ids)
    assert len(want) == layers
    for i, (k, v) in enumerate(want):
        got_k = seen[f"model.layers.{i}.self_attn.key"]
        got_v = seen[f"model.layers.{i}.self_attn.value"]
        if name.endswith("eager"):  # eager attention multiplies by K^T
            got_k = got_k.transpose(-1, -2)
        # the capture repeats the key/value heads for the query heads where the model lets SDPA do it
        k, v = (t.repeat_interleave(got_k.shape[1] // t.shape[1], dim=1) for t in (k, v))
        torch.testing.assert_close(got_k, k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_v, v, rtol=1e-5, atol=1e-5)


def test_llama_keys_are_the_projected_keys_after_rope():
    """An independent reference: k_proj's output, rotated with transformers' rotary embedding, heads repeated."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    model = _llama()
    sim = _sim(model, kv_bw=8)
    for q in sim.quantizers.values():
        q.enabled = False
    got = []
    h = sim.quantizer("model.layers.0.self_attn.key").register_forward_hook(lambda m, a, o: got.append(a[0]))
    ids = _ids(2, 10, 6)
    sim.model(input_ids=ids)
    h.remove()
    proj = []
    hk = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, o: proj.append(o))
    with torch.no_grad():
        model(input_ids=ids)
    hk.remove()
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    k = proj[0].view(2, 10, cfg.num_key_value_heads, hd).transpose(1, 2)
    cos, sin = model.model.rotary_emb(k, torch.arange(10).unsqueeze(0))
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)
    torch.testing.assert_close(got[0], k, rtol=1e-5, atol=1e-5)


def test_fewer_kv_bits_move_the_outputs_more():
    ids = _ids(2, 16, 1)
    with torch.no_grad():
        fp = _llama()(input_ids=ids).logits
    errs = {}
    for bw in (8, 4):
        sim = _sim(_llama(), kv_bw=bw)
        sim.compute_encodings(lambda m: m(input_ids=ids))
        for n in _kv_names(sim):
            assert sim.quantizer(n).has_encoding and sim.quantizer(n).bitwidth == bw
        for n, q in sim.quantizers.items():  # only the cache quantized
            q.enabled = n in _kv_names(sim)
        with torch.no_grad():
            errs[bw] = float((sim.model(input_ids=ids).logits - fp).abs().mean())
    assert 0 < errs[8] < errs[4]
    assert errs[8] < 0.2 * errs[4]


def test_no_kv_quantizers_unless_asked():
    assert _kv_names(_sim(_llama())) == []


def test_the_config_kv_cache_section_places_them_and_kv_bw_overrides_it():
    cfg = load_config("default").to_dict()
    cfg["kv_cache"] = {"bitwidth": 6, "is_symmetric": "False"}
    loaded = load_config(cfg)
    assert loaded.kv_bitwidth == 6 and not loaded.kv_symmetric()
    assert load_config(loaded.to_dict()) == loaded
    sim = _sim(_llama(), config=loaded)
    assert {(sim.quantizer(n).bitwidth, sim.quantizer(n).symmetric) for n in _kv_names(sim)} == {(6, False)}
    sim = _sim(_llama(), config=loaded, kv_bw=4)
    assert {sim.quantizer(n).bitwidth for n in _kv_names(sim)} == {4}
    for bad, msg in (({"bitwidth": 1}, "kv_cache.bitwidth: expected an integer in 2..16"),
                     ({"bits": 8}, "kv_cache.bits: unknown key")):
        with pytest.raises(ConfigError, match=msg):
            load_config({**cfg, "kv_cache": bad})


# ---- generate() with a key/value cache ----------------------------------------------------------------
@pytest.fixture(scope="module")
def w8a8_kv8():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantSim(zoo.tiny_llama(), {"input_ids": _ids(2, 8, 1)}, kv_bw=8, kv_cache=True)
        sim.compute_encodings(lambda m: m(input_ids=_ids(4, 16, 2)))
    return sim


def test_layerwise_calibration_of_a_cache_capture_is_a_clear_error(w8a8_kv8):
    before = {n: q.get_encoding().scale.clone() for n, q in w8a8_kv8.quantizers.items() if q.has_encoding}
    assert w8a8_kv8.kv_cache
    with pytest.raises(ValueError, match="kv_cache=True.*layerwise=False"):
        w8a8_kv8.compute_encodings([{"input_ids": _ids(2, 8, 3)}], layerwise=True)
    assert all(torch.equal(w8a8_kv8.quantizer(n).get_encoding().scale, s) for n, s in before.items())


def _greedy_by_hand(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding by full recomputation, each step the whole sequence through `model`."""
    seq = prompt
    for _ in range(new):
        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def _calls(model):
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple((kw.get("input_ids") if "input_ids" in kw else a[0]).shape)),
        with_kwargs=True, prepend=True)
    return shapes, handle


def test_generate_with_the_cache_equals_full_recomputation_token_for_token(w8a8_kv8):
    sim = w8a8_kv8
    prompt = _ids(2, 5, 7)
    new = 12
    shapes, handle = _calls(sim.model)
    kv_seen = []
    hook = sim.quantizer("model.layers.1.self_attn.key").register_forward_hook(
        lambda m, a, o: kv_seen.append(a[0].shape[2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = sim.model.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=True)
    handle.remove()
    hook.remove()
    # one graph call per new token: the prompt, then one token at a time on the cache
    assert shapes == [(2, 5)] + [(2, 1)] * (new - 1)
    # the key quantizer read the cached positions too: prompt, then one more each step
    assert kv_seen == [5 + i for i in range(new)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recomputed = sim.model.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, _greedy_by_hand(sim.model, prompt, new))
    assert cached.shape == (2, 5 + new)


def test_a_cached_step_computes_the_full_sequence_logits(w8a8_kv8):
    sim = w8a8_kv8
    ids = _ids(2, 9, 8)
    full = sim.model(input_ids=ids).logits
    first = sim.model(input_ids=ids[:, :6], use_cache=True)
    assert isinstance(first.cache, transformers.DynamicCache) and first.cache.get_seq_length() == 6
    rest = sim.model(input_ids=ids[:, 6:], cache=first.cache, use_cache=True)
    assert rest.cache.get_seq_length() == 9
    step = float(sim.quantizer(_last_output(sim)).get_encoding().scale.max())
    assert (torch.cat([first.logits, rest.logits], 1) - full).abs().max() <= 2 * step + 1e-5
    assert sim.model(input_ids=ids).cache is None  # no cache unless asked for


def test_generate_through_gemma3_with_a_sliding_window_and_the_cache():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantSim(_gemma(), {"input_ids": _ids(2, 8, 1)}, kv_bw=8, kv_cache=True)
        sim.compute_encodings(lambda m: m(input_ids=_ids(4, 16, 2)))
        prompt = _ids(1, 6, 9)  # 6 + 10 positions: beyond the sliding window of 8
        cached = sim.model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(cached, _greedy_by_hand(sim.model, prompt, 10))


def test_a_deep_copy_generates_through_its_own_graph(w8a8_kv8):
    copied = copy.deepcopy(w8a8_kv8.model)
    prompt = _ids(1, 4, 11)
    shapes, handle = _calls(copied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = copied.generate(prompt, max_new_tokens=4, do_sample=False)
        want = w8a8_kv8.model.generate(prompt, max_new_tokens=4, do_sample=False)
    handle.remove()
    assert torch.equal(got, want)
    assert shapes == [(1, 4)] + [(1, 1)] * 3  # the copy's graph ran, with the cache


def test_a_cache_of_sliding_window_layers_is_refused(w8a8_kv8):
    from transformers.cache_utils import DynamicSlidingWindowLayer
    cache = transformers.DynamicCache()
    cache.layers.append(DynamicSlidingWindowLayer(sliding_window=4))
    with pytest.raises(TypeError, match="cache: .*full layers.*DynamicSlidingWindowLayer"):
        w8a8_kv8.model(input_ids=_ids(1, 3, 1), cache=cache)
    with pytest.raises(TypeError, match="inputs_embeds"):
        w8a8_kv8.model(input_ids=_ids(1, 3, 1), inputs_embeds=torch.randn(1, 3, 64))


def test_generate_stops_at_the_largest_position(w8a8_kv8):
    with warnings.catch_warnings(), pytest.raises(ValueError, match="max_position_embeddings"):
        warnings.simplefilter("ignore")
        w8a8_kv8.model.generate(_ids(1, MAX_POS - 2, 3), max_new_tokens=5, do_sample=False)


def test_only_a_kv_cache_simulation_generates():
    assert not hasattr(_sim(_llama()).model, "generate")
    assert pyquant.QuantSim is QuantSim


def test_token_ids_from_another_tokenizer_are_caught_at_the_first_batch():
    model = MODELS["llama"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantSim(model, {"input_ids": _ids(2, 8, 1)})
    bad = _ids(2, 8, 2)
    bad[1, 3] = VOCAB + 40  # a bigger vocabulary's id
    with pytest.raises(ValueError, match=f"batch 0.*largest integer input is {VOCAB + 40}.*another tokenizer"):
        sim.compute_encodings([{"input_ids": bad}, {"input_ids": _ids(2, 8, 3)}])
