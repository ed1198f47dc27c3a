"""Distributed and layer-wise calibration: shard the data over processes, calibrate one block at a time.

    python examples/distributed_calibration.py [--quick]

`sim.compute_encodings(batches, layerwise=True)` calibrates a decoder layer at a time, each on its inputs
as the simulation computes them (the layers before already quantized), and keeps only the values between
two layers: memory stays near the model's own. With `process_group=`, every rank runs its share of the
batches, the statistics are all-reduced before the encodings are computed (histogram schemes fix their
ranges first), and every rank ends with the encodings one process computes over all the data. The example
spawns two CPU processes (gloo), each with half the batches, and compares their encodings with one
process over all of them. Prints `sharded == one process: True` and the largest scale difference.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyquant as pq

from common import parse_args, tiny_decoder, token_batches


def scales(sim: pq.QuantSim) -> dict[str, torch.Tensor]:
    act, par = sim.encodings()
    return {n: e.scale for n, e in {**act, **par}.items()}


def worker(rank: int, world: int, port: int, batches: list, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)   # NCCL on GPUs
    torch.set_num_threads(1)
    sim = pq.QuantSim(tiny_decoder(), batches[0], param_bw=8, output_bw=8, quant_scheme="tf_enhanced")
    mine = batches[rank::world]                                     # this rank's share
    sim.compute_encodings(mine, layerwise=True, process_group=dist.group.WORLD)
    if rank == 0:
        torch.save(scales(sim), out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)   # skip interpreter teardown, where a gloo thread still being joined can abort the process


def main() -> None:
    args = parse_args(__doc__)
    batches = token_batches(256, 4 if args.quick else 16, 32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "scales.pt")
        mp.spawn(worker, args=(2, port, batches, out), nprocs=2, join=True)
        sharded = torch.load(out)

    sim = pq.QuantSim(tiny_decoder(), batches[0], param_bw=8, output_bw=8, quant_scheme="tf_enhanced")
    sim.compute_encodings(batches, layerwise=True)                  # one process, all the data
    single = scales(sim)
    diff = max(float((sharded[n] - single[n]).abs().max()) for n in single)
    print(f"{len(single)} encodings; sharded == one process: {sharded.keys() == single.keys() and diff == 0.0} "
          f"(largest scale difference {diff:.3g})")


if __name__ == "__main__":
    main()
