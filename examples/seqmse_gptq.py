"""SeqMSE and GPTQ: 4-bit weights of a language model, chosen layer by layer by the output error.

    python examples/seqmse_gptq.py [--quick] [--out DIR]

Both work on a QuantSim, on the linear layers in graph order, each seeing the inputs it gets in the
simulation (earlier layers already quantized). SeqMSE picks each block's clipping range among
`num_candidates` fractions of its range by the layer's output error; GPTQ rounds column by column and
feeds each column's error into the columns not yet rounded (Hessian of the layer's inputs). Both freeze the
weight encodings they set, so calibrating the activations afterwards keeps them, and both resume from
`checkpoint_dir`. Prints `<method>: SQNR <dB> dB` for round-to-nearest, SeqMSE and GPTQ at W4A16 per
block of 32.
"""
from __future__ import annotations

from pathlib import Path

import torch

import pyquant as pq
from pyquant.metrics import sqnr_db

from common import parse_args, tiny_decoder, token_batches


def main() -> None:
    args = parse_args(__doc__)
    model = tiny_decoder()
    vocab = model.config.vocab_size
    batches = token_batches(vocab, 8 if args.quick else 32, 32)   # GPTQ wants more rows than columns
    test = torch.cat([b["input_ids"] for b in token_batches(vocab, 4, 32, seed=1)])
    with torch.no_grad():
        ref = model(input_ids=test).logits

    def simulation() -> pq.QuantSim:
        return pq.QuantSim(model, batches[0], quant_scheme="min_max", param_bw=4, output_bw=16, block_size=32)

    def score(sim: pq.QuantSim) -> float:
        with torch.no_grad():
            return sqnr_db(ref, sim.model(input_ids=test).logits)

    sim = simulation()
    sim.compute_encodings(batches)
    print(f"round to nearest: SQNR {score(sim):.2f} dB")

    sim = simulation()
    res = pq.seq_mse(sim, batches, num_candidates=20, checkpoint_dir=Path(args.out) / "seq_mse_ckpt")
    sim.compute_encodings(batches)                     # the activations; SeqMSE's weight encodings stay
    print(f"SeqMSE ({len(res.layers)} layers): SQNR {score(sim):.2f} dB")

    sim = simulation()
    res = pq.gptq(sim, batches, percdamp=0.01, act_order=False, checkpoint_dir=Path(args.out) / "gptq_ckpt")
    sim.compute_encodings(batches)
    print(f"GPTQ ({len(res.layers)} layers): SQNR {score(sim):.2f} dB")
    print("\n".join(res.summary().splitlines()[:3]))


if __name__ == "__main__":
    main()
