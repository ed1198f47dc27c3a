"""The layer-wise techniques data-parallel under torch.distributed (gloo): two processes, each with half of
the calibration data, end where one process over all the data ends -- SeqMSE's and GPTQ's Gram matrices
and smoothing's activation maxima are reduced over the ranks."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import pyquant
from layerwise_sims import mlp_case, mlp_sim
from test_analyzers import socket_port


def _run(method: str, rank: int, world: int):
    """(weights, scales) after `method` on shard `rank` of `world` (world 1: all the data, no group)."""
    import torch.distributed as dist
    group = dist.group.WORLD if world > 1 else None
    if method == "smoothing":
        import zoo
        torch.manual_seed(0)
        model = zoo.tiny_llama()
        g = torch.Generator().manual_seed(3)
        data = [{"input_ids": torch.randint(0, 256, (2, 10), generator=g)} for _ in range(4)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pyquant.smooth_activations(model, data[rank::world], dummy_input=data[0], alpha=(0.3, 0.6),
                                       process_group=group, progress=False)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, {}
    model, x, _ = mlp_case()
    sim = mlp_sim(model, x)
    shard = x.reshape(4, -1, x.shape[1])[rank::world].reshape(-1, x.shape[1])
    fn = pyquant.seq_mse if method == "seq_mse" else pyquant.gptq
    fn(sim, shard, batch_size=8, process_group=group, progress=False)
    weights = {n: sim.weight(n).detach().clone() for n in sim.param_quantizers}
    scales = {n: q.get_encoding().scale.clone() for n, q in sim.param_quantizers.items()}
    return weights, scales


def _worker(rank, world, port, method, out):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = _run(method, rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["seq_mse", "gptq", "smoothing"])
def test_two_processes_end_where_one_over_all_the_data_ends(method):
    if method == "smoothing":
        pytest.importorskip("transformers")
    with socket_port() as port:
        out = mp.Manager().dict()
        mp.spawn(_worker, args=(2, port, method, out), nprocs=2, join=True)
    w1, s1 = _run(method, 0, 1)
    for rank in range(2):
        w2, s2 = out[rank]
        assert w2.keys() == w1.keys() and s2.keys() == s1.keys()
        for k in s1:  # the chosen grids: the same
            assert torch.equal(s2[k], s1[k]), (rank, k)
        for k in w1:  # float64 sums in another order: equal to float32 rounding
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=f"{rank} {k}")
    if method == "smoothing":  # and it did smooth something
        import zoo
        torch.manual_seed(0)
        ref = zoo.tiny_llama().state_dict()
        assert any(not torch.equal(ref[k], w1[k]) for k in w1)
