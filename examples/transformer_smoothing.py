"""Transformers at W8A8: activation smoothing and the output-aware activation range search.

    python examples/transformer_smoothing.py [--quick]

Two fixes for activations whose few outlier channels spoil a per-tensor 8-bit grid:

1. `pq.smooth_activations` (SmoothQuant) divides each input channel of a Linear layer's activation by
   s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and multiplies the weight's column by it, exactly in FP32;
   a norm, a value projection or a gated MLP's up projection absorbs the division. It helps where the
   outliers sit in a Linear layer's input. Here: a decoder language model (whose input norm gains are
   given a few large channels, as trained LLMs have) under the `layer_inputs` profile (int8 GEMMs).
2. `pq.search_activation_ranges` chooses each activation quantizer's clipping range by the loss of the
   model's output against FP32, for outliers that the output does not need (a BERT's residual stream).
   Here: a sentence encoder (all-MiniLM-L6-v2 when installed) at W8A8, loss "cosine".

Prints `<setting>: SQNR <dB> dB` for the decoder and `<setting>: cosine <c>` for the encoder.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import pyquant as pq
from pyquant.metrics import output_tensor, sqnr_db

from common import parse_args, text_encoder, tiny_decoder, token_batches


def decoder_smoothing(quick: bool) -> None:
    model = tiny_decoder()
    with torch.no_grad():                    # outlier channels, as trained LLMs' norms produce them
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 30.0
            layer.post_attention_layernorm.weight[5:7] *= 30.0
    vocab = model.config.vocab_size
    batches = token_batches(vocab, 2 if quick else 16, 32)
    test = torch.cat([b["input_ids"] for b in token_batches(vocab, 4, 32, seed=1)])
    with torch.no_grad():
        ref = model(input_ids=test).logits

    def score(m: torch.nn.Module) -> float:
        sim = pq.QuantSim(m, batches[0], param_bw=8, output_bw=8, config="layer_inputs")
        sim.compute_encodings(batches)
        with torch.no_grad():
            return sqnr_db(ref, sim.model(input_ids=test).logits)

    print(f"decoder W8A8 (Linear inputs): SQNR {score(model):.2f} dB")
    smoothed = copy.deepcopy(model)
    res = pq.smooth_activations(smoothed, batches, alpha=(0.3, 0.5, 0.7))   # alpha searched per pair
    print(res.summary().splitlines()[0])
    print(f"decoder W8A8 (Linear inputs) + smoothing: SQNR {score(smoothed):.2f} dB")


def encoder_range_search(quick: bool) -> None:
    name, tok, model, texts = text_encoder(quick)
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    batches = [{"input_ids": enc["input_ids"][i:i + 8], "attention_mask": enc["attention_mask"][i:i + 8]}
               for i in range(0, len(texts), 8)]

    def cosine(m: torch.nn.Module) -> float:
        with torch.no_grad():
            outs = [output_tensor(m(**b)) for b in batches]        # last_hidden_state, whatever m returns
            refs = [output_tensor(model(**b)) for b in batches]
        return float(torch.cat([F.cosine_similarity(o, r, dim=-1).flatten() for o, r in zip(outs, refs)]).mean())

    sim = pq.QuantSim(model, batches[0], param_bw=8, output_bw=8)
    sim.compute_encodings(batches)
    print(f"{name} W8A8: cosine {cosine(sim.model):.4f}")
    # in quick mode, only the first 6 activation quantizers are searched
    names = list(sim.activation_quantizers)[:6] if quick else None
    res = pq.search_activation_ranges(sim, batches, loss="cosine", quantizers=names)
    print(res.summary().splitlines()[0])
    print(f"{name} W8A8 + range search: cosine {cosine(sim.model):.4f}")


def main() -> None:
    args = parse_args(__doc__)
    decoder_smoothing(args.quick)
    encoder_range_search(args.quick)


if __name__ == "__main__":
    main()
