"""Layer-wise calibration (QuantSim.compute_encodings(layerwise=...)) and calibration sharded over
torch.distributed ranks (process_group=...): segments of the graph, encodings equal to calibrating each
block with the blocks before it already quantized, memory kept to the values between blocks, and
sharded statistics equal to one process over all the data."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import pyquant as pq
from pyquant.sim import layerwise_calibration as L

from test_analyzers import socket_port
import zoo

transformers = pytest.importorskip("transformers")


def _llama_sim(scheme: str = "min_max", **kw):
    torch.manual_seed(0)
    m = zoo.tiny_llama()
    x = torch.randint(0, 256, (2, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = pq.QuantSim(m, {"input_ids": x}, quant_scheme=scheme, **kw)
    data = [{"input_ids": torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(i))}
            for i in range(4)]
    return m, sim, data


def test_segments_follow_the_decoder_layers():
    _, sim, _ = _llama_sim()
    assert L.block_stack(sim.model) == "model.layers"
    segs = L.segments(sim.model)
    assert [s.block for s in segs] == [None, "model.layers.0", "model.layers.1"]
    order = {n: i for i, n in enumerate(sim.model.graph.nodes)}
    flat = [n for s in segs for n in s.nodes]
    assert [order[n] for n in flat] == sorted(order[n] for n in flat)  # graph order, each node once
    # what crosses a boundary is small: no weight (data-independent values are computed where read)
    data_dep = L.data_dependent(sim.model)
    for names in L._live_after(sim.model, segs)[:-1]:
        assert names and all(n in {x.name for x in data_dep} for n in names)
    assert L._live_after(sim.model, segs)[-1] == set()  # the logits are never kept


def test_a_segment_run_frees_its_values_without_the_garbage_collector():
    # a reference cycle would keep a run's values (a language model's logits) until the collector passed
    import gc
    import weakref
    _, sim, data = _llama_sim()
    sim.compute_encodings(data)
    segs = L.segments(sim.model)
    inputs = L.SegmentInputs(sim.model, [L.placeholder_values(sim.model, b) for b in data[:1]])
    seen: list[weakref.ref] = []
    orig = L._call

    def spy(gm, n, val):
        out = orig(gm, n, val)
        if isinstance(out, torch.Tensor):
            seen.append(weakref.ref(out))
        return out

    gc.collect()
    gc.disable()
    try:
        L._call = spy
        with torch.no_grad():
            for seg in segs:
                inputs.envs[0] = inputs.run(seg, 0, keep=L._live_after(sim.model, segs)[seg.index])
        assert inputs.envs[0] == {}  # the last segment keeps nothing
        owned = {t.untyped_storage().data_ptr() for t in [*sim.model.parameters(), *sim.model.buffers()]}
        alive = [t for t in (r() for r in seen) if t is not None and t.untyped_storage().data_ptr() not in owned]
        assert len(seen) > 50 and alive == []  # only the model's own tensors (a no-op .to()) outlive the run
    finally:
        L._call = orig
        gc.enable()


def test_module_model_segments_and_calibrates():
    torch.manual_seed(0)
    m = zoo.PaddedBert().eval()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    sim = pq.QuantSim(m, (ids, mask), quant_scheme="min_max")
    assert L.block_stack(sim.model) == "layers"
    assert [s.block for s in L.segments(sim.model)] == [None, "layers.0", "layers.1"]
    data = [{"input_ids": ids, "attention_mask": mask}, {"input_ids": torch.randint(0, 100, (2, 8)),
                                                         "attention_mask": mask}]
    sim.compute_encodings(data, layerwise="layers")
    out = sim.model(ids, mask)
    assert pq.metrics.sqnr_db(m(ids, mask), out) > 20


@pytest.mark.parametrize("scheme", ["min_max", "tf_enhanced"])
def test_each_block_calibrates_on_the_quantized_blocks_before_it(scheme):
    """Reference: the ordinary calibration of one block's quantizers, all other quantizers on with the
    layer-wise encodings: the same encodings (min_max exactly; tf_enhanced's histograms are filled in two
    passes layer-wise, so the reference fills them the same way)."""
    m, sim, data = _llama_sim(scheme)
    sim.compute_encodings(data, layerwise=True)
    segs = L.segments(sim.model)
    acts = {id(q): n for n, q in sim.activation_quantizers.items() if q.enabled}
    owned = L._quantizers_by_segment(sim.model, segs, acts)
    last = owned[-1]
    assert len(last) > 10
    got = {n: sim.quantizer(n).get_encoding() for n in last}
    qs = [sim.quantizer(n) for n in last]
    import contextlib
    with contextlib.ExitStack() as st, torch.no_grad():
        for q in qs:
            st.enter_context(q.compute_encodings())
        with L.range_pass([q.encoding_analyzer for q in qs]):
            for b in data:
                sim.model(**b)
        for b in data:
            sim.model(**b)
    for n in last:
        e = sim.quantizer(n).get_encoding()
        assert torch.equal(e.scale, got[n].scale) and torch.equal(e.offset, got[n].offset), n
    # and the first block's inputs are the model's, so it equals the ordinary calibration there (min_max)
    if scheme == "min_max":
        _, ref, _ = _llama_sim(scheme)
        ref.compute_encodings(data)
        for n in owned[0]:
            assert torch.equal(ref.quantizer(n).get_encoding().scale, sim.quantizer(n).get_encoding().scale), n


def test_layerwise_predicts_like_the_ordinary_calibration():
    m, sim, data = _llama_sim("tf_enhanced")
    _, ref, _ = _llama_sim("tf_enhanced")
    sim.compute_encodings(data, layerwise=True)
    ref.compute_encodings(data)
    x = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(9))  # another length
    with torch.no_grad():
        y, a, b = m(x).logits, sim.model(x).logits, ref.model(x).logits
    sa, sb = pq.metrics.sqnr_db(y, a), pq.metrics.sqnr_db(y, b)
    assert sa > 20 and abs(sa - sb) < 3


def test_layerwise_bad_input():
    m, sim, data = _llama_sim()
    with pytest.raises(TypeError, match="not a callback"):
        sim.compute_encodings(lambda mm: mm(**data[0]), layerwise=True)
    with pytest.raises(ValueError, match="model.blocks"):
        sim.compute_encodings(data, layerwise="model.blocks")
    with pytest.raises(TypeError, match="layerwise"):
        sim.compute_encodings(data, layerwise=1)
    with pytest.raises(TypeError, match="takes"):
        sim.compute_encodings([{"input_idz": data[0]["input_ids"]}], layerwise=True)
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    s2 = pq.QuantSim(seq, torch.randn(2, 4))
    with pytest.raises(ValueError, match="repeated stack"):
        s2.compute_encodings(torch.randn(8, 4), layerwise=True)


# ---- sharded over torch.distributed --------------------------------------------------------------------
def _encodings(sim):
    return {n: (q.get_encoding().scale.clone(), q.get_encoding().offset.clone())
            for n, q in sim.activation_quantizers.items() if q.enabled and q.has_encoding}


def _worker(rank, world, port, scheme, layerwise, out):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _, sim, data = _llama_sim(scheme)
        sim.compute_encodings(data[rank::world], layerwise=layerwise, process_group=dist.group.WORLD,
                              progress=False)
        out[rank] = _encodings(sim)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("scheme,layerwise", [("tf_enhanced", True), ("min_max", False), ("tf_enhanced", False)])
def test_two_processes_equal_one_over_all_the_data(scheme, layerwise):
    with socket_port() as port:
        out = mp.Manager().dict()
        mp.spawn(_worker, args=(2, port, scheme, layerwise, out), nprocs=2, join=True)
    _, sim, data = _llama_sim(scheme)
    if layerwise or scheme == "min_max":
        sim.compute_encodings(data, layerwise=layerwise, progress=False)
        want = _encodings(sim)
    else:  # one process in a group of one: the same two-pass histograms as the sharded run
        with socket_port() as port:
            one = mp.Manager().dict()
            mp.spawn(_worker_all, args=(port, scheme, one), nprocs=1, join=True)
        want = one[0]
    assert len(want) > 20
    for rank in range(2):
        got = out[rank]
        assert got.keys() == want.keys()
        for n in want:
            assert torch.equal(got[n][0], want[n][0]) and torch.equal(got[n][1], want[n][1]), (rank, n)


def _worker_all(rank, port, scheme, out):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        _, sim, data = _llama_sim(scheme)
        sim.compute_encodings(data, process_group=dist.group.WORLD, progress=False)
        out[0] = _encodings(sim)
    finally:
        dist.destroy_process_group()
