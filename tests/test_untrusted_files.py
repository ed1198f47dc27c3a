"""No code runs from a file pyquant reads: a crafted pickle whose unpickling would create a marker file,
placed where pyquant reads a QuantSim checkpoint, an AutoQuant cached simulation, an AdaRound checkpoint
and a SeqMSE/GPTQ job or layer file, is refused with pyquant.UnsafeFileError naming the file, and the
marker never appears; files pyquant writes read back; nothing in pyquant unpickles freely."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import pyquant
from pyquant import UnsafeFileError
from pyquant.autoquant import AutoQuant
from helpers import output_fidelity
from layerwise_sims import mlp_case, mlp_sim


class _RunsCode:
    """Unpickling this object would run `touch marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path, around=None) -> None:
    """Writes a torch file at `path` that would create `marker` when unpickled freely; `around`: the plain
    state it hides in (the object goes in as one more value)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(around or {}), "payload": _RunsCode(marker)}, path)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _x(n=16, seed=1):
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))


def test_quantsim_checkpoint_with_code_is_refused_and_the_sim_is_untouched(tmp_path):
    sim = pyquant.QuantSim(_mlp(), _x(2))
    sim.compute_encodings(_x())
    with torch.no_grad():
        before = sim.model(_x()).clone()
    good = tmp_path / "good.pt"
    sim.save_checkpoint(good, step="x", epoch=3)
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    # the crafted object hides inside an otherwise valid checkpoint
    _plant(evil, marker, torch.load(good, weights_only=True))
    with pytest.raises(UnsafeFileError, match=r"checkpoint .*evil\.pt.*posix\.system"):
        sim.load_checkpoint(evil)
    assert not marker.exists()
    with torch.no_grad():
        assert torch.equal(sim.model(_x()), before)
    # what pyquant writes reads back under the same rule
    assert sim.load_checkpoint(good) == {"step": "x", "epoch": 3}


def test_save_checkpoint_refuses_values_that_would_not_read_back(tmp_path):
    sim = pyquant.QuantSim(_mlp(), _x(2))
    sim.compute_encodings(_x())
    with pytest.raises(TypeError, match=r"extra values\['note'\].*Path"):
        sim.save_checkpoint(tmp_path / "c.pt", note=tmp_path)
    assert not (tmp_path / "c.pt").exists()


def test_optimizer_state_round_trips_without_unpickling_objects(tmp_path):
    sim = pyquant.QuantSim(_mlp(), _x(2))
    sim.compute_encodings(_x())
    opt = torch.optim.Adam(sim.model_parameters(), lr=1e-3)
    sim.model(_x()).pow(2).mean().backward()
    opt.step()
    sim.save_checkpoint(tmp_path / "c.pt", optimizer=opt)
    opt2 = torch.optim.Adam(sim.model_parameters(), lr=5e-2)
    sim.load_checkpoint(tmp_path / "c.pt", optimizer=opt2)
    assert opt2.param_groups[0]["lr"] == 1e-3
    assert all(torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"]) for p in sim.model_parameters())


def test_autoquant_cached_simulation_with_code_is_refused(tmp_path):
    model = _mlp()
    x = _x(32)
    fidelity = output_fidelity(model, x)

    def run():
        return AutoQuant(model, x[:1], x, fidelity, config="default", progress=False,
                         quant_schemes=("min_max",)).optimize(allowed_accuracy_drop=0.5, cache_dir=tmp_path / "c")

    first = run()
    assert first.best_step == "quantsim"
    states = list((tmp_path / "c" / "states").glob("*.pt"))
    assert len(states) == 1  # the best step's simulation, read back on the next run
    marker = tmp_path / "ran"
    _plant(states[0], marker, torch.load(states[0], weights_only=True))
    with pytest.raises(UnsafeFileError, match=re.escape(str(states[0]))):
        run()
    assert not marker.exists()


def test_adaround_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    _plant(tmp_path / "ck" / "adaround_checkpoint.pt", marker, {"done": [], "weights": {}, "report": []})
    with pytest.raises(UnsafeFileError, match="adaround_checkpoint.pt"):
        pyquant.adaround(_mlp(), _x(1), _x(), param_bw=4, iterations=5, batch_size=4, positions_per_sample=4,
                         checkpoint_dir=tmp_path / "ck", progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("method", ["seq_mse", "gptq"])
@pytest.mark.parametrize("which", ["job", "layer"])
def test_layerwise_checkpoint_with_code_is_refused(tmp_path, method, which):
    run = getattr(pyquant, method)
    model, x, _ = mlp_case()
    kw = {"num_candidates": 4} if method == "seq_mse" else {}
    run(mlp_sim(model, x), x, checkpoint_dir=tmp_path / "ck", **kw)  # a finished job: every layer's file
    marker = tmp_path / "ran"
    target = tmp_path / "ck" / (f"{method}_checkpoint.pt" if which == "job" else f"{method}_layer_0001.pt")
    _plant(target, marker, torch.load(target, weights_only=True))
    with pytest.raises(UnsafeFileError, match=re.escape(target.name)):
        run(mlp_sim(model, x), x, checkpoint_dir=tmp_path / "ck", **kw)
    assert not marker.exists()


def test_a_torch_file_that_is_not_one_is_a_clear_error(tmp_path):
    sim = pyquant.QuantSim(_mlp(), _x(2))
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="junk.pt.*cannot be read"):
        sim.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a QuantSim checkpoint"):
        sim.load_checkpoint(tmp_path / "other.pt")


def test_no_reader_in_pyquant_unpickles_freely():
    """Every torch.load in pyquant reads tensors and plain values only; nothing uses pickle, eval, exec,
    yaml.load or numpy's allow_pickle on file contents."""
    root = Path(pyquant.__file__).parent
    risky = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\(|"
                       r"yaml\.(?:unsafe_)?load\(|allow_pickle\s*=\s*True|"
                       r"torch\.load\((?![^)]*weights_only\s*=\s*True)")
    found = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in sorted(root.rglob("*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if risky.search(line) and not line.lstrip().startswith("#")]
    assert found == []
