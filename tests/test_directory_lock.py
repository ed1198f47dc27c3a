"""Two processes sharing one cache or checkpoint directory: while one holds it, a second job there
(AutoQuant's cache_dir, AdaRound's, SeqMSE's and GPTQ's checkpoint_dir) is refused with
pyquant.DirectoryInUseError naming the directory and the holder's pid; the lock dies with its process, so a
SIGKILLed holder leaves the directory usable at once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import pyquant
from pyquant import DirectoryInUseError
from pyquant._dirlock import DirectoryLock
from pyquant.autoquant import AutoQuant
from layerwise_sims import mlp_case, mlp_sim

HOLDER = textwrap.dedent("""
    import sys, time
    from pyquant._dirlock import DirectoryLock
    lock = DirectoryLock(sys.argv[1], "checkpoint_dir").acquire()
    print("held", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """A second process holding tmp_path/"shared"'s lock: (its directory, the process)."""
    folder = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield folder, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def test_second_process_is_refused_and_a_sigkilled_holder_leaves_no_lock(holder):
    folder, proc = holder
    with pytest.raises(DirectoryInUseError, match=rf"{folder}.*process {proc.pid}"):
        DirectoryLock(folder, "checkpoint_dir").acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    with DirectoryLock(folder, "checkpoint_dir"):  # the kernel dropped the lock with the process
        pass


def test_autoquant_cache_dir_in_use_is_refused(holder):
    folder, proc = holder
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def fn(m):
        calls.append(1)
        return 1.0

    with pytest.raises(DirectoryInUseError, match=rf"cache_dir '{folder}'.*process {proc.pid}"):
        AutoQuant(model, x[:1], x, fn, progress=False).optimize(cache_dir=folder)
    assert calls == []  # refused before any step ran
    assert sorted(p.name for p in folder.iterdir()) == [".pyquant.lock"]  # and before writing a cache


def test_adaround_checkpoint_dir_in_use_is_refused(holder):
    folder, proc = holder
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(DirectoryInUseError, match=rf"checkpoint_dir '{folder}'.*process {proc.pid}"):
        pyquant.adaround(model, x[:1], x, iterations=5, checkpoint_dir=folder, progress=False)


def test_bias_correction_checkpoint_dir_in_use_is_refused(holder):
    folder, proc = holder
    model, x, _ = mlp_case()
    sim = mlp_sim(model, x)
    with pytest.raises(DirectoryInUseError, match=rf"checkpoint_dir '{folder}'.*process {proc.pid}"):
        pyquant.correct_bias(sim, model, x, checkpoint_dir=folder, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [".pyquant.lock"]  # refused before writing any state


@pytest.mark.parametrize("method", ["seq_mse", "gptq"])
def test_layerwise_checkpoint_dir_in_use_is_refused(holder, method):
    folder, proc = holder
    model, x, _ = mlp_case()
    with pytest.raises(DirectoryInUseError, match=rf"checkpoint_dir '{folder}'.*process {proc.pid}"):
        getattr(pyquant, method)(mlp_sim(model, x), x, checkpoint_dir=folder)


def test_a_finished_job_releases_its_directory(tmp_path):
    model, x, _ = mlp_case()
    pyquant.seq_mse(mlp_sim(model, x), x, num_candidates=4, checkpoint_dir=tmp_path)
    with DirectoryLock(tmp_path, "checkpoint_dir"):
        pass
    with DirectoryLock(tmp_path, "checkpoint_dir"):  # a second job in this process while one holds it
        with pytest.raises(DirectoryInUseError, match="another job in this process"):
            pyquant.seq_mse(mlp_sim(model, x), x, num_candidates=4, checkpoint_dir=tmp_path)
