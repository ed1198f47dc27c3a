"""Simulations for the layer-wise techniques' tests (SeqMSE, GPTQ): a tiny Llama captured with torch.export
and a small MLP traced with torch.fx, at 4-bit per-channel weights, with calibration data as dicts of
keyword inputs (input_ids + attention_mask) or tensors, and the model-output error against FP32."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pyquant
import zoo


def llama_case():
    """(FP32 tiny Llama, calibration batches as dicts, evaluation batch as a dict, its FP32 logits)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = zoo.tiny_llama()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (16, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 18:] = 0  # some sequences are padded
    calib = [{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4]} for i in range(0, 16, 4)]
    ev = {"input_ids": torch.randint(0, 256, (6, 24), generator=g),
          "attention_mask": torch.ones(6, 24, dtype=torch.long)}
    with torch.no_grad():
        ref = model(**ev).logits
    return model, calib, ev, ref


def llama_sim(model, calib) -> pyquant.QuantSim:
    return pyquant.QuantSim(model, calib[0], quant_scheme="min_max", param_bw=4, output_bw=8)


def logits(out):
    if isinstance(out, dict):
        return out["logits"]
    return out.logits if hasattr(out, "logits") else out[0]


def model_output_mse(sim, calib, ev, ref) -> float:
    """Calibrates the activations (weight encodings a technique froze stay) and measures the logits' MSE."""
    sim.compute_encodings(calib)
    with torch.no_grad():
        return float((logits(sim.model(**ev)) - ref).pow(2).mean())


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(24, 48), nn.Linear(48, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp_case():
    """(FP32 MLP, calibration samples as one tensor, evaluation samples)."""
    g = torch.Generator().manual_seed(2)
    return Mlp().eval(), torch.randn(64, 24, generator=g), torch.randn(32, 24, generator=g)


def mlp_sim(model, x) -> pyquant.QuantSim:
    return pyquant.QuantSim(model, x[:2], quant_scheme="min_max", param_bw=4, output_bw=8)


def block_sim(model, x, block: int, decompressed_bw=None) -> pyquant.QuantSim:
    """The MLP's simulation with per-block weight quantizers (blocks of `block` input columns; LPBQ with
    `decompressed_bw`), as QuantSim places them."""
    return pyquant.QuantSim(model, x[:2], quant_scheme="min_max", param_bw=4, output_bw=8, block_size=block,
                            decompressed_bw=decompressed_bw)


def fx_outputs_mse(method, **kw):
    """`method` (pyquant.seq_mse or pyquant.gptq) on the MLP's simulation: (its result, the simulation's output
    MSE against FP32 after calibrating the activations, the same for plain calibration)."""
    model, x, ev = mlp_case()
    ref = model(ev)
    plain_sim = mlp_sim(model, x)
    plain_sim.compute_encodings(x)
    sim = mlp_sim(model, x)
    res = method(sim, x, **kw)
    sim.compute_encodings(x)
    with torch.no_grad():
        return res, float((sim.model(ev) - ref).pow(2).mean()), float((plain_sim.model(ev) - ref).pow(2).mean())


def interrupted_then_resumed(method, module, per_layer: str, tmp_path, monkeypatch):
    """`method` on the MLP's simulation stopped (KeyboardInterrupt) in its third call of `module.per_layer`,
    then rerun from `tmp_path` on a fresh simulation: (uninterrupted sim, resumed sim, resumed result, calls
    of the per-layer function in all)."""
    model, x, _ = mlp_case()
    whole = mlp_sim(model, x)
    method(whole, x)
    real, calls = getattr(module, per_layer), []

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(module, per_layer, dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        method(mlp_sim(model, x), x, checkpoint_dir=tmp_path)
    monkeypatch.setattr(module, per_layer, real)
    resumed = mlp_sim(model, x)
    res = method(resumed, x, checkpoint_dir=tmp_path)
    return whole, resumed, res, len(calls)
