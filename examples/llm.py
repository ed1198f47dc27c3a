"""Language models: perplexity at W8A16, an 8-bit KV cache, generate() through the simulation, memory.

    python examples/llm.py [--quick]

A decoder language model is simulated without a second copy (`in_place=True`: the simulation shares the
model's parameters), with quantizers on the keys and values attention reads (`kv_bw=8`) and captured with
its key/value cache (`kv_cache=True`), so that `sim.model.generate(...)` decodes one simulated token per
step (layer-by-layer calibration, which holds only the values between two decoder layers, is in
examples/distributed_calibration.py). Uses Gemma-3-270M on Wikipedia summaries when both are installed and `--quick` is not given,
otherwise a small random Llama on random tokens. Prints `FP32 perplexity <p>`, `W8A16 + KV8 perplexity
<p> (<ratio>x FP32)`, the resident memory the simulation added and the generated token ids.
"""
from __future__ import annotations

import torch

import pyquant as pq
from pyquant.metrics import perplexity

from common import parse_args, require_assets, tiny_decoder


def resident_mib() -> float:
    """The process's resident memory (Linux), MiB; NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def load(quick: bool) -> tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(name, model, calibration windows, evaluation windows) as int64 [windows, length]."""
    if not quick:
        try:
            from pyquant.datasets import token_windows, wiki_text
            from pyquant.models import gemma3_270m

            require_assets()
            tok, model = gemma3_270m()
            return ("Gemma-3-270M", model, token_windows(tok, wiki_text("calibration"), 512, 8),
                    token_windows(tok, wiki_text("evaluation"), 512, 10))
        except ImportError as exc:       # pyquant.models.AssetMissingError is an ImportError
            print(f"note: {exc}; using a small random Llama instead")
    model = tiny_decoder()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    return "random Llama", model, torch.randint(0, vocab, (4, 64), generator=g), torch.randint(0, vocab, (4, 64), generator=g)


def main() -> None:
    args = parse_args(__doc__)
    name, model, calib, evalw = load(args.quick)
    fp32 = perplexity(model, evalw)
    print(f"{name}: FP32 perplexity {fp32:.2f}")

    before = resident_mib()
    sim = pq.QuantSim(model, {"input_ids": calib[:1]}, param_bw=8, output_bw=16, kv_bw=8, kv_cache=True,
                      in_place=True)
    added = resident_mib() - before
    sim.compute_encodings([{"input_ids": w[None]} for w in calib])
    quant = perplexity(sim.model, evalw)
    print(f"{name}: W8A16 + KV8 perplexity {quant:.2f} ({quant / fp32:.3f}x FP32)")
    kv = [n for n in sim.quantizers if n.endswith((".key", ".value"))]
    print(f"{len(kv)} key/value quantizers, e.g. {kv[0]}; the simulation added {added:.0f} MiB resident")

    prompt = evalw[:1, :8]
    tokens = sim.model.generate(prompt, max_new_tokens=8, do_sample=False)     # one simulated token per step
    print(f"generated: {tokens[0, 8:].tolist()}")


if __name__ == "__main__":
    main()
