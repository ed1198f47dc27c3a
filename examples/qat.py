"""Quantization-aware training with fixed and with learned ranges (W4A4), resumable from a checkpoint.

    python examples/qat.py [--quick] [--out DIR]

`sim.model` trains like any module: the fake quantization passes gradients straight through to the
weights. With fixed ranges (the default) the calibrated encodings stay; with `range_learning=True` the
encodings' min/max are parameters too (`sim.quantizer_parameters()`), usually with a higher learning rate.
The example trains a small CNN at W4A4 towards its own FP32 outputs (distillation: no labels needed) and
prints KL(FP32 || quantized) on held-out inputs for PTQ, QAT with fixed ranges and QAT with learned
ranges (`<setting>: KL to FP32 <nats>`). For DDP see examples/qat_ddp.py.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

import pyquant as pq
from pyquant.metrics import mean_kl

from common import parse_args, small_cnn


def main() -> None:
    args = parse_args(__doc__)
    model = small_cnn()
    pq.fold_batchnorms(model)
    g = torch.Generator().manual_seed(3)
    train, held_out = torch.randn(512, 3, 32, 32, generator=g), torch.randn(256, 3, 32, 32, generator=g)
    with torch.no_grad():
        teacher, ref = model(train), model(held_out)
    steps = 30 if args.quick else 300

    def kl(sim: pq.QuantSim) -> float:
        with torch.no_grad():
            return mean_kl(ref, sim.model(held_out))      # KL(FP32 || quantized), lower is better

    for label, learn in (("QAT fixed ranges", False), ("QAT learned ranges", True)):
        sim = pq.QuantSim(copy.deepcopy(model), train[:1], param_bw=4, output_bw=4, range_learning=learn,
                          fuse_activations=True)   # ReLU and pooling inside the quantizer's kernel: faster steps
        sim.compute_encodings(train[:128])
        if not learn:
            print(f"PTQ W4A4: KL to FP32 {kl(sim):.4f}")
        groups = [{"params": sim.model_parameters(), "lr": 1e-3}]
        if learn:
            groups.append({"params": sim.quantizer_parameters(), "lr": 1e-3})
        opt = torch.optim.Adam(groups)
        order = torch.Generator().manual_seed(0)                  # the data order, saved with the checkpoint
        sim.model.train()
        for step in range(steps):
            idx = torch.randint(0, len(train), (64,), generator=order)
            loss = F.kl_div(sim.model(train[idx]).log_softmax(1), teacher[idx].log_softmax(1), log_target=True,
                            reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
        sim.model.eval()
        ckpt = Path(args.out) / f"qat_{'learned' if learn else 'fixed'}.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        # atomic; on restart: extra = sim.load_checkpoint(ckpt, opt); order.set_state(extra["order"])
        sim.save_checkpoint(ckpt, opt, step=steps, order=order.get_state())
        print(f"{label} ({steps} steps): KL to FP32 {kl(sim):.4f}")

    extra = sim.load_checkpoint(ckpt, opt)                        # checked against the simulation first
    print(f"checkpoint {ckpt.name} reloaded at step {extra['step']}")


if __name__ == "__main__":
    main()
