"""Kill and resume: each resumable job (AdaRound's checkpoints, AutoQuant's step cache, bias correction's
checkpoints, a QAT loop on QuantSim.save_checkpoint) runs in a child process that is SIGKILLed at a point
drawn by a seeded generator -- just after a progress step, or half-way through writing a file -- and is
then rerun in a new child from what the first left. Checked: the killed child died by the signal, no file
where a complete one is expected is partial (a half-written file is only ever a temporary one), and the
resumed run's weights, encodings and reports equal an uninterrupted run's, bit for bit.

By default one kill point of each kind runs per job (the Llama job: one write); PYQUANT_KILL_POINTS=N
runs N of each kind, the extra ones marked slow."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

JOBS_SCRIPT = Path(__file__).with_name("kill_jobs.py")
JOBS = ["adaround", "bias_correction", "bias_correction_sequential", "bias_correction_llama", "autoquant", "qat"]
KINDS = ["progress", "write"]
POINTS = max(int(os.environ.get("PYQUANT_KILL_POINTS", "1")), 1)
# the kill points that run by default, beyond which a test is marked slow: the Llama job captures a
# transformers model with torch.export in each of its children
FAST = {"bias_correction_llama": {"write"}}


def _params():
    for job in JOBS:
        for kind in KINDS:
            for i in range(POINTS):
                slow = i > 0 or kind not in FAST.get(job, KINDS)
                yield pytest.param(job, kind, i, id=f"{job}-{kind}-{i}", marks=[pytest.mark.slow] if slow else [])


def _child(job: str, folder: Path, result: Path, kill: str = "",
           count: Optional[Path] = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYQUANT_TEST_KILL")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    if kill:
        env["PYQUANT_TEST_KILL_AT"] = kill
    if count is not None:
        env["PYQUANT_TEST_KILL_COUNT"] = str(count)
    return subprocess.run([sys.executable, str(JOBS_SCRIPT), job, str(folder), str(result)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """job -> (the result file of an uninterrupted run, its counts of progress steps and file writes)."""
    runs: dict[str, tuple[Path, dict[str, int]]] = {}

    def get(job: str) -> tuple[Path, dict[str, int]]:
        if job not in runs:
            root = tmp_path_factory.mktemp(f"{job}-whole")
            (root / "job").mkdir()
            p = _child(job, root / "job", root / "result.pt", count=root / "counts.json")
            assert p.returncode == 0, p.stderr[-4000:]
            runs[job] = root / "result.pt", json.loads((root / "counts.json").read_text())
        return runs[job]
    return get


def _temporary(p: Path) -> bool:
    """pyquant's atomic writes go through `.<name>.<random>.tmp` beside the final file."""
    return p.name.startswith(".") and p.name.endswith(".tmp")


def _assert_complete(folder: Path) -> list[Path]:
    """Every file at a final path reads whole; returns the temporary files found."""
    temps = []
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            continue
        if _temporary(p):
            temps.append(p)
            continue
        if p.suffix == ".lock":  # a directory lock: held by a live process, no state in it
            continue
        what = f"{p.relative_to(folder)} (a partial file where a complete one is expected)"
        if p.suffix in (".pt", ".pth"):
            try:
                torch.load(p, map_location="cpu", weights_only=False)  # this test's own files
            except Exception as e:  # noqa: BLE001 -- any failure to read is the finding
                pytest.fail(f"{what}: {type(e).__name__}: {e}")
        elif p.suffix in (".json", ".encodings"):
            try:
                json.loads(p.read_text(encoding="utf-8"))
            except ValueError as e:
                pytest.fail(f"{what}: {e}")
        elif p.suffix == ".html":
            assert p.read_text(encoding="utf-8").rstrip().endswith("</html>"), what
        elif p.suffix == ".onnx":
            import onnx
            onnx.load(str(p))
        else:
            pytest.fail(f"{p.relative_to(folder)}: a file of a kind this test cannot check whole")
    return temps


def _assert_same(expected: Path, got: Path) -> None:
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (expected, got))
    assert a["texts"] == b["texts"]
    assert list(a["tensors"]) == list(b["tensors"])
    assert a["tensors"], "the job's result holds no tensor"
    for name, x in a["tensors"].items():
        y = b["tensors"][name]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        # bytes, not values: -0.0 against 0.0 or NaN payloads count as differences too
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), name


def _kill_point(job: str, kind: str, i: int, counts: dict[str, int]) -> int:
    """The i-th of this job's kill points of this kind, drawn without repeats from the whole run."""
    total = counts[kind]
    if i >= total:
        pytest.skip(f"{job} makes only {total} {kind} events")
    return random.Random(f"{job}/{kind}").sample(range(1, total + 1), min(POINTS, total))[i]


@pytest.mark.parametrize("job,kind,i", list(_params()))
def test_killed_job_resumes_to_the_uninterrupted_result(job: str, kind: str, i: int, uninterrupted, tmp_path):
    expected, counts = uninterrupted(job)
    assert counts["progress"] > 1 and counts["write"] > 1, counts  # there is something to kill in the middle of
    point = _kill_point(job, kind, i, counts)
    folder = tmp_path / "job"
    folder.mkdir()

    killed = _child(job, folder, tmp_path / "killed.pt", kill=f"{kind}:{point}")
    assert killed.returncode == -signal.SIGKILL, f"{kind}:{point} of {counts}: {killed.stderr[-4000:]}"
    assert not (tmp_path / "killed.pt").exists()
    temps = _assert_complete(folder)
    if kind == "write":  # died in a write, and the half-written file is a temporary one
        assert temps, f"write {point}: no temporary file holds the half-written bytes"

    resumed = _child(job, folder, tmp_path / "resumed.pt")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    _assert_same(expected, tmp_path / "resumed.pt")
    _assert_complete(folder)
