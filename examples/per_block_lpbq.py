"""Per-block weights and LPBQ: 4-bit weights with one scale per block of input channels.

    python examples/per_block_lpbq.py [--quick] [--out DIR]

At 4 bits, one scale per output channel leaves too few levels for the channel's many small weights;
`block_size=B` gives each block of B input channels its own scale. LPBQ (`decompressed_bw=D`) stores each
block scale as a float per channel times a small integer, as low-power targets decode it. The example
runs a decoder language model at W4A16 per channel, per block of 32 and LPBQ, prints the output SQNR of
each against FP32 (`<setting>: SQNR <dB> dB`), and exports the LPBQ simulation (int4 blocked QDQ ONNX at
opset 21, LPBQ entries in the encodings file).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import pyquant as pq
from pyquant.metrics import sqnr_db

from common import parse_args, tiny_decoder, token_batches


def main() -> None:
    args = parse_args(__doc__)
    model = tiny_decoder()
    batches = token_batches(model.config.vocab_size, 4 if args.quick else 16, 32)
    test = torch.cat([b["input_ids"] for b in token_batches(model.config.vocab_size, 4, 32, seed=1)])
    with torch.no_grad():
        ref = model(input_ids=test).logits

    settings = {"per channel": {}, "per block of 32": {"block_size": 32},
                "LPBQ (block 32, 8-bit decompressed)": {"block_size": 32, "decompressed_bw": 8}}
    for label, kwargs in settings.items():
        sim = pq.QuantSim(model, batches[0], quant_scheme="min_max", param_bw=4, output_bw=16, **kwargs)
        sim.compute_encodings(batches)
        with torch.no_grad():
            out = sim.model(input_ids=test).logits
        print(f"{label}: SQNR {sqnr_db(ref, out):.2f} dB")

    enc = sim.quantizer("model.layers.0.mlp.down_proj.weight").get_encoding()
    print(f"down_proj: per-channel scales {tuple(enc.per_channel_scale.shape)}, "
          f"integer block scales {tuple(enc.int_scale.shape)}")
    paths = sim.export(Path(args.out), "decoder_w4a16_lpbq", batches[0])
    entries = json.loads(paths["encodings"].read_text())["param_encodings"]
    lpbq = sum(1 for e in entries if e["enc_type"] == "LPBQ")
    print(f"exported: {paths['onnx']} (opset {paths.opset}), {lpbq} LPBQ weight encodings")


if __name__ == "__main__":
    main()
