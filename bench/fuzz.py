"""Fuzzing at scale: every target of tests/fuzz_targets.py (encodings reader, hardware-config loader, QuantSim
checkpoints, the command line, the public ops) with 10,000 hypothesis examples or more each, counting what
happened to every input: accepted, or refused with which exception type; and the failures (an undocumented
exception, a refusal naming nothing, an invalid value accepted, a hang, a crash).

    python -m bench.fuzz                          # 10,000 examples per target -> bench/results/fuzz.{json,md}
    python -m bench.fuzz --examples 500 --targets ops,cli --out /tmp/fuzz
    python -m bench.fuzz --fresh                  # ignore finished targets of an interrupted run

Each target runs in a child process, so that a crash (a signal from native code) is recorded as a failure
of that target instead of ending the run, and a child that stops answering is killed after --timeout
seconds. Within a child every example has its own time limit (fuzz_targets.EXAMPLE_TIME_LIMIT_S). A
finished target's counts are kept in OUT/.fuzz_partial/ until the run completes: rerun the same command
after an interruption and only the unfinished targets run again. Generation is derandomized: a rerun
tries the same inputs.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
TARGET_NAMES = ("encodings", "config", "checkpoint", "cli", "ops")
MAX_FAILURES_KEPT = 20


def run_target(name: str, examples: int, progress: bool) -> dict[str, Any]:
    """Runs one target in this process: its outcome counts, failures and time."""
    sys.path.insert(0, str(TESTS))
    os.chdir(TESTS)  # command-line SPECs import from the working directory, as pyquant's CLI does
    from hypothesis import HealthCheck, Phase, given, settings

    import fuzz_targets
    from pyquant._progress import Progress

    target = fuzz_targets.TARGETS[name]
    outcomes: collections.Counter = collections.Counter()
    failures: collections.Counter = collections.Counter()
    examples_of: dict[str, str] = {}
    bar = Progress(examples, f"fuzz {name}", enabled=progress)

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(target.strategy())
    def fuzz(example):
        try:
            outcomes[target.run(example)] += 1
        except Exception as exc:  # FuzzFailure; anything else is the judge's own error, kept as a failure too
            text = str(exc) if isinstance(exc, fuzz_targets.FuzzFailure) else \
                f"the judge raised {type(exc).__name__}: {exc}\ninput: {example!r}"[:2000]
            key = text.split("\n", 1)[0][:200]
            failures[key] += 1
            examples_of.setdefault(key, text[:2000])
            outcomes["FAILURE"] += 1
        bar.update(1)

    t0 = time.perf_counter()
    fuzz()
    bar.close()
    return {"target": name, "what": target.what, "examples": sum(outcomes.values()), "outcomes": dict(outcomes),
            "failures": sum(failures.values()), "failure_kinds": dict(failures.most_common(MAX_FAILURES_KEPT)),
            "failure_examples": [examples_of[k] for k, _ in failures.most_common(MAX_FAILURES_KEPT)],
            "seconds": round(time.perf_counter() - t0, 1)}


def _child(name: str, examples: int, timeout: float, progress: bool, partial: Path,
           memory_gb: float) -> dict[str, Any]:
    """Runs a target in a child process; a crash or a timeout is a failure of the target."""
    out = partial / f"{name}.json"
    cmd = [sys.executable, "-m", "bench.fuzz", "--worker", name, "--examples", str(examples),
           "--result", str(out), "--memory-limit-gb", str(memory_gb)] + (["--progress"] if progress else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, stdout=subprocess.PIPE, stderr=None, text=True)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    if code == 0 and out.is_file():
        return json.loads(out.read_text())
    reason = (f"no result after {timeout:.0f} s (a hang)" if code == "timeout" else
              f"the process ended by signal {-code} (a crash)" if isinstance(code, int) and code < 0 else
              f"the process exited with status {code}")
    return {"target": name, "what": "", "examples": 0, "outcomes": {}, "failures": 1,
            "failure_kinds": {reason: 1}, "failure_examples": [reason], "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=10_000, help="examples per target (default 10000)")
    p.add_argument("--targets", default=",".join(TARGET_NAMES), help=f"comma-separated, of {', '.join(TARGET_NAMES)}")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds a target may run (default 3600)")
    p.add_argument("--memory-limit-gb", type=float, default=8.0,
                   help="address-space limit of each target's process (default 8)")
    p.add_argument("--fresh", action="store_true", help="rerun targets an interrupted run finished")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.examples < 1:
        p.error(f"--examples must be >= 1, got {a.examples}")
    names = [n for n in a.targets.split(",") if n]
    unknown = [n for n in names if n not in TARGET_NAMES]
    if unknown:
        p.error(f"--targets: unknown {unknown}; the targets are {', '.join(TARGET_NAMES)}")
    progress = sys.stderr.isatty() if a.progress is None else a.progress
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.worker is not None:
        # a bug that allocates without bound becomes a MemoryError here, not the machine's OOM killer
        limit = int(a.memory_limit_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        from pyquant._io import atomic_write_text
        atomic_write_text(a.result, json.dumps(run_target(a.worker, a.examples, progress)))
        return 0

    from bench._harness import RESULTS, atomic_write, write_results
    out_dir = Path(a.out) if a.out else RESULTS
    partial = out_dir / ".fuzz_partial" / f"n{a.examples}"
    partial.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        kept = partial / f"{name}.json"
        if kept.is_file() and not a.fresh:
            print(f"{name}: kept from the interrupted run ({kept})", file=sys.stderr)
            results.append(json.loads(kept.read_text()))
            continue
        r = _child(name, a.examples, a.timeout, progress, partial, a.memory_limit_gb)
        atomic_write(kept, json.dumps(r))
        print(f"{name}: {r['examples']} examples, {r['failures']} failures, {r['seconds']} s", file=sys.stderr)
        results.append(r)
    rows = [{"target": r["target"], "examples": r["examples"],
             "accepted": r["outcomes"].get("accepted", 0),
             "refused (exception: count)": ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items())
                                                     if k not in ("accepted", "FAILURE")) or "-",
             "failures": r["failures"], "seconds": r["seconds"]} for r in results]
    notes = [f"{r['target']}: {r['what']}" for r in results if r["what"]]
    notes.append("encodings: ValueError / TypeError are refusals of the shapes= argument (tensor name -> scale "
                 "shape), EncodingsError those of the file")
    notes.append("cli outcomes are exit codes (main() returns them; 2 is a usage error, 1 a SPEC whose function "
                 "raised); the other targets' refusals are exception types")
    for r in results:
        notes += [f"FAILURE {r['target']}: {k} (x{v})" for k, v in r["failure_kinds"].items()]
    path = write_results("fuzz", rows, ["target", "examples", "accepted", "refused (exception: count)", "failures",
                                        "seconds"],
                         title=f"Fuzzing: {a.examples} hypothesis examples per target (derandomized)", notes=notes,
                         out_dir=out_dir)
    data = json.loads(path.read_text())
    data["targets"] = results  # the failure examples in full
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")
    shutil.rmtree(partial, ignore_errors=True)  # the run is complete: nothing left to resume
    with contextlib.suppress(OSError):
        partial.parent.rmdir()
    print(path.with_suffix(".md").read_text())
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
