"""Memory of a QuantSim with and without a copy of the model (QuantSim(..., in_place=True)).

A random Llama of about 150 MiB (hidden 1024, vocabulary 8192, 2 layers) is built in a fresh process; the
process's resident memory (VmRSS) is read before and after constructing the simulation, and the simulated
graph's parameters are checked for sharing the model's storage (data_ptr equality).

    python -m bench.sim_memory            # both settings, each in its own process

Writes bench/results/sim_memory.{json,md}.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pyquant._io import atomic_write_text


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def measure(in_place: bool) -> dict:
    """One setting, in this process: model size, RSS before and after construction, shared parameters."""
    import gc
    import warnings

    import torch
    import transformers

    from pyquant import QuantSim

    warnings.simplefilter("ignore")
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    before = _rss()
    sim = QuantSim(model, {"input_ids": torch.randint(0, 8192, (1, 8))}, in_place=in_place)
    gc.collect()
    after = _rss()
    own = {p.data_ptr() for p in model.parameters()}
    graph = [p for n, p in sim.model.named_parameters() if "_pq_" not in n and "parametrizations.weight.0" not in n]
    return {"in_place": in_place, "model_mib": model_bytes / 2**20, "rss_before_mib": before / 2**20,
            "rss_after_mib": after / 2**20, "added_mib": (after - before) / 2**20,
            "shared_parameters": sum(p.data_ptr() in own for p in graph), "graph_parameters": len(graph)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2] == "in_place")))
        return
    rows = []
    for setting in ("in_place", "copy"):
        out = subprocess.run([sys.executable, "-m", "bench.sim_memory", "--one", setting], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    results = Path(__file__).parent / "results"
    atomic_write_text(results / "sim_memory.json", json.dumps(rows, indent=2) + "\n")
    lines = ["| setting | model (MiB) | RSS before -> after (MiB) | added (MiB) | graph parameters sharing the model's |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'in_place=True' if r['in_place'] else 'copy (default)'} | {r['model_mib']:.1f} | "
                     f"{r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} | {r['added_mib']:.1f} | "
                     f"{r['shared_parameters']}/{r['graph_parameters']} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(results / "sim_memory.md", "# QuantSim memory, with and without a copy\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
