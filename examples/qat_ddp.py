"""QAT under DistributedDataParallel: two processes, half the batch each, the same step as one process.

    python examples/qat_ddp.py [--quick]

A QuantSim's model is an ordinary module, so DDP wraps it unchanged: the quantizers' range parameters are
parameters like the weights and their gradients are all-reduced with them. The example spawns two CPU
processes (gloo), takes one range-learning step on each half of a batch, and checks the result against one
process stepping on the whole batch. Prints `DDP step equals single-process step: True` and the largest
difference.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import pyquant as pq

from common import parse_args, small_cnn


def build(x: torch.Tensor) -> pq.QuantSim:
    torch.manual_seed(0)
    model = small_cnn()
    pq.fold_batchnorms(model)
    sim = pq.QuantSim(model, x[:1], param_bw=8, output_bw=8, range_learning=True)
    sim.compute_encodings(x)
    sim.model.train()
    return sim


def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def worker(rank: int, world: int, port: int, x: torch.Tensor, y: torch.Tensor, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sim = build(x)                                   # every rank builds and calibrates the same simulation
    ddp = torch.nn.parallel.DistributedDataParallel(sim.model)
    half = len(x) // world
    step(ddp, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    if rank == 0:
        torch.save(sim.model.state_dict(), out)
    del ddp
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)   # skip interpreter teardown, where a gloo thread still being joined can abort the process


def main() -> None:
    parse_args(__doc__)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.pt")
        mp.spawn(worker, args=(2, port, x, y, out), nprocs=2, join=True)
        ddp_state = torch.load(out)
    sim = build(x)
    step(sim.model, x, y)
    diff = max(float((ddp_state[k] - v).abs().max()) for k, v in sim.model.state_dict().items()
               if v.is_floating_point())
    print(f"DDP step equals single-process step: {diff < 1e-5} (largest difference {diff:.2e})")


if __name__ == "__main__":
    main()
