"""The CPU kernels' thread pool (csrc/cpu/thread_pool.cpp, opt-in: PYQUANT_CPU_POOL=1): every chunk of a
call runs once whichever thread claims it, so results are deterministic and equal to the OpenMP path's;
calls from several Python threads at once and calls in a forked child still complete correctly."""
from __future__ import annotations

import multiprocessing as mp
import threading

import pytest
import torch

import pyquant.ops  # noqa: F401  (registers torch.ops.pyquant)
from pyquant import _native
from pyquant.ops import _reference as ref

from helpers import ds_tolerance, rand_input, rand_params

op = torch.ops.pyquant

pytestmark = pytest.mark.skipif(_native.cpu_module() is None, reason="native CPU module not built")


@pytest.fixture
def two_threads():
    c = _native.cpu_module()
    before, pool = c.num_threads(), c.cpu_pool_enabled()
    c.set_num_threads(2)
    c.set_cpu_pool_enabled(True)
    yield c
    c.set_num_threads(0 if before == 0 else before)
    c.set_cpu_pool_enabled(pool)


def _call(x, s, o, g):
    y = op.quantize_dequantize(x, s, o, 0, 255)
    dx, ds, do = op.quantize_dequantize_backward(g, x, s, o, 0, 255, 1.0, [True, True, True])
    return y, dx, ds, do


def test_results_do_not_depend_on_which_thread_ran_which_chunk(two_threads):
    x = rand_input((4, 300_001))
    s, o = rand_params(x, (1, 1), 8, False)  # per-tensor: one sum over chunks of every row
    g = rand_input(x.shape, seed=5, scale=1.0)
    first = _call(x, s, o, g)
    assert two_threads.pool_helpers() >= 1  # the call was split and a helper started
    for _ in range(8):
        for a, b in zip(first, _call(x, s, o, g)):
            assert torch.equal(a, b)
    two_threads.set_cpu_pool_enabled(False)  # the same ranges in OpenMP regions: the same sums, bit for bit
    for a, b in zip(first, _call(x, s, o, g)):
        assert torch.equal(a, b)
    two_threads.set_cpu_pool_enabled(True)
    ry = ref.quantize_dequantize(x, s, o, 0, 255)
    assert torch.equal(first[0], ry)
    rdx, rds, rdo = ref.quantize_dequantize_backward(g, x, s, o, 0, 255, 1.0, [True, True, True])
    tol = ds_tolerance(g, x, s, o, 0, 255, s.shape)
    assert torch.equal(first[1], rdx) and ((first[2] - rds).abs() <= tol).all() and ((first[3] - rdo).abs() <= tol).all()


def test_calls_from_several_python_threads_at_once_are_each_correct(two_threads):
    cases = []
    for i in range(4):
        x = rand_input((3, 200_003), seed=10 + i)
        s, o = rand_params(x, (3, 1), 8, False, seed=20 + i)
        g = rand_input(x.shape, seed=30 + i, scale=1.0)
        cases.append((x, s, o, g, _call(x, s, o, g)))
    bad: list[str] = []

    def work(i):
        x, s, o, g, want = cases[i]
        for _ in range(10):
            got = _call(x, s, o, g)
            if not all(torch.equal(a, b) for a, b in zip(got, want)):
                bad.append(f"thread {i}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a kernel call did not return"
    assert not bad


def _child(q):
    # torch's own OpenMP threads do not survive a fork (a DataLoader worker runs torch on one thread); the
    # kernels' pool is asked for two threads all the same
    torch.set_num_threads(1)
    x = rand_input((2, 300_007), seed=3)
    s, o = rand_params(x, (1, 1), 8, False)
    y = op.quantize_dequantize(x, s, o, 0, 255)
    q.put((bool(torch.equal(y, ref.quantize_dequantize(x, s, o, 0, 255))), _native.cpu_module().pool_helpers()))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork on this platform")
def test_a_forked_child_gets_a_pool_of_its_own(two_threads):
    x = rand_input((2, 300_007), seed=3)
    s, o = rand_params(x, (1, 1), 8, False)
    op.quantize_dequantize(x, s, o, 0, 255)  # the parent's pool has a helper now
    assert two_threads.pool_helpers() >= 1
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(timeout=120)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child's kernel call did not return (the parent's helpers do not exist there)")
    assert p.exitcode == 0 and q.get(timeout=5) == (True, 1)  # a helper of its own, and the right result
