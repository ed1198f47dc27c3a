"""The resumable jobs of the kill-and-resume tests, each run as a child process:

    python tests/kill_jobs.py JOB FOLDER RESULT

runs JOB with its checkpoints (or cache) in FOLDER, resuming from whatever an earlier, killed run left
there, and writes its final weights and encodings to RESULT. `kill_points.install()` sets up the kill the
environment asks for; `kill_points.arm()` marks where the resumable work starts. Seeds, data and models
are fixed, one thread: two runs compute the same bits."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

import kill_points
import zoo


def _conv_net(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """Conv-BN-ReLU x2, pool, Linear: BN statistics spread so that folding and bias correction matter."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8, 10))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-1, 1, generator=g)
            bn.running_var.uniform_(0.2, 2, generator=g)
            bn.weight.uniform_(0.1, 3, generator=g)
            bn.bias.uniform_(-0.5, 1.5, generator=g)
    return m.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def adaround(folder: Path, result: str) -> None:
    import pyquant
    x = _images(32, 1)
    kill_points.arm()
    res = pyquant.adaround(_conv_net(), x[:1], x, param_bw=4, iterations=40, lr=1e-2, batch_size=8,
                           positions_per_sample=16, checkpoint_dir=folder / "ckpt", seed=3, progress=False)
    kill_points.save_result(result, _state(res.model), encodings=Path(res.encodings_path).read_text())


def _calibrated_sim(model: nn.Module, dummy, data, **kw):
    from pyquant.sim.quantsim import QuantSim
    sim = QuantSim(model, dummy, **kw)
    sim.compute_encodings(data, progress=False)
    return sim


def bias_correction(folder: Path, result: str, method: str = "staged") -> None:
    from pyquant.techniques import correct_bias
    x = _images(32, 1)
    fp32 = _folded(x)
    sim = _calibrated_sim(_folded(x), x[:1], x, param_bw=4)
    kill_points.arm()
    report = correct_bias(sim, fp32, x, method=method, batch_size=8, checkpoint_dir=folder / "ckpt", progress=False)
    kill_points.save_result(result, _state(sim.model), report=json.dumps(report))


def _folded(x: torch.Tensor) -> nn.Module:
    import pyquant
    m = _conv_net()
    pyquant.fold_batchnorms(m, x[:1])
    return m


def bias_correction_sequential(folder: Path, result: str) -> None:
    bias_correction(folder, result, method="sequential")


def bias_correction_llama(folder: Path, result: str) -> None:
    """A torch.export simulation (transformers Llama) corrected at its linear ops, with keyword batches."""
    from pyquant.techniques import correct_bias
    g = torch.Generator().manual_seed(5)
    batches = [{"input_ids": torch.randint(0, 256, (2, 16), generator=g)} for _ in range(3)]
    torch.manual_seed(0)
    fp32 = zoo.tiny_llama()
    torch.manual_seed(0)
    sim = _calibrated_sim(zoo.tiny_llama(), batches[0], batches, param_bw=4)
    kill_points.arm()
    report = correct_bias(sim, fp32, batches, checkpoint_dir=folder / "ckpt", progress=False)
    kill_points.save_result(result, _state(sim.model), report=json.dumps(report))


def autoquant(folder: Path, result: str) -> None:
    from pyquant.autoquant import AutoQuant
    model = _conv_net()
    x_cal, x_eval = _images(32, 1), _images(64, 2)
    with torch.no_grad():
        ref = model(x_eval)

    def fidelity(m: nn.Module) -> float:
        with torch.no_grad():
            return 1.0 - float((m(x_eval) - ref).norm() / ref.norm())

    aq = AutoQuant(model, x_cal[:1], x_cal, fidelity, param_bw=4, config="per_tensor", progress=False,
                   quant_schemes=("tf_enhanced", "min_max"),
                   adaround_kwargs={"iterations": 20, "batch_size": 16, "positions_per_sample": 16})
    kill_points.arm()
    res = aq.optimize(allowed_accuracy_drop=0.0, cache_dir=folder / "cache", output_dir=folder / "out")
    steps = [(s.key, s.status, s.accuracy) for s in res.steps]
    kill_points.save_result(result, _state(res.sim.model), encodings=res.encodings_path.read_text(),
                            steps=json.dumps(steps), best=str(res.best_step))


def qat(folder: Path, result: str, steps: int = 12, every: int = 2) -> None:
    """A QAT loop as a user writes it, resumable: shuffled batches (their order drawn from a generator
    saved with the checkpoint), dropout (the global RNG, saved too), range learning, Adam."""
    import torch.nn.functional as F

    from pyquant._progress import Progress
    x, y = _images(64, 1), torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    model = _folded(x)
    model[8].p = 0.25
    sim = _calibrated_sim(model, x[:1], x, param_bw=4, range_learning=True)
    opt = torch.optim.Adam(sim.model.parameters(), lr=1e-2)
    torch.manual_seed(7)
    order_rng = torch.Generator().manual_seed(11)
    path = folder / "qat.pt"
    kill_points.arm()
    step, order = 0, None
    if path.exists():
        extra = sim.load_checkpoint(path, opt)
        step, order = int(extra["step"]), extra["order"]
        torch.set_rng_state(extra["rng"])
        order_rng.set_state(extra["order_rng"])
    sim.model.train()
    bar = Progress(steps, "qat", enabled=False)
    bar.n = step
    per_epoch = 4
    while step < steps:
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=order_rng)
        idx = order[(step % per_epoch) * 16:(step % per_epoch + 1) * 16]
        opt.zero_grad()
        F.cross_entropy(sim.model(x[idx]), y[idx]).backward()
        opt.step()
        step += 1
        if step % every == 0:
            sim.save_checkpoint(path, opt, step=step, order=order, rng=torch.get_rng_state(),
                                order_rng=order_rng.get_state())
        bar.update()
    state = _state(sim.model)
    state.update({f"opt.{i}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()})
    kill_points.save_result(result, state)


JOBS = {f.__name__: f for f in (adaround, bias_correction, bias_correction_sequential, bias_correction_llama,
                                autoquant, qat)}

if __name__ == "__main__":
    job, folder, out = sys.argv[1:4]
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.environ["PYQUANT_TEST_KILL_DIR"] = folder
    kill_points.install()
    JOBS[job](Path(folder), out)
