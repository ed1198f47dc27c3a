"""Timing and reporting shared by the benchmarks: medians after warm-up, side-by-side ratios, and
results written atomically as bench/results/<name>.json plus a Markdown table."""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from pyquant._io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], Any], *, warmup: int = 3, reps: int = 15, device: str = "cpu",
                max_seconds: float = 20.0, inner: int = 10) -> float:
    """Median seconds per call. On CUDA, timed with events around `inner` back-to-back calls."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
        # Several calls between the events keep the GPU's queue ahead of the host, so the figure is
        # the device time per call rather than the launch latency of a lone call.
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3 / inner)
            if time.perf_counter() - start > max_seconds and len(times) >= 3:
                break
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - start > max_seconds and len(times) >= 3:
                break
    return statistics.median(times)


def interleaved_times(fns: list[Callable[[], Any]], *, warmup: int, reps: int) -> list[list[float]]:
    """Seconds per call of each fn, timed in turn round by round, so that a change in the machine's
    load hits all of them alike (their ratios are what the tables report)."""
    for _ in range(warmup):
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for f, t in zip(fns, times):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return times


def require_native(script: str) -> bool:
    """False (with the reason on stderr) when the imported pyquant has no compiled CPU module: its
    timings would be of the pure-torch fallback."""
    import pyquant

    info = pyquant.native_info()
    if info.get("cpu_module"):
        return True
    print(f"pyquant from {pyquant.__file__} has no compiled CPU module ({info.get('cpu_error')}); timings "
          f"would be of the pure-torch fallback. In the peer env run this file with -P from the checkout: "
          f"python -P {script} (see the module docstring).", file=sys.stderr)
    return False


def report(path: Path, rows: list[dict[str, Any]]) -> int:
    """Prints the Markdown table next to `path` and says how many targets were missed; returns 0."""
    print(open(path.with_suffix(".md")).read())
    failed = [r for r in rows if r.get("met") is False]
    if failed:
        print(f"{len(failed)} target(s) not met", file=sys.stderr)
    return 0


def publish(name: str, args: Any, rows: list[dict[str, Any]], columns: list[str], *, title: str,
            notes: Optional[list[str]] = None) -> int:
    """write_results under `name` (`_quick` added for a --quick run, into --out when given), then report."""
    path = write_results(name + ("_quick" if getattr(args, "quick", False) else ""), rows, columns, title=title,
                         notes=notes, out_dir=Path(args.out) if getattr(args, "out", None) else None)
    return report(path, rows)


def machine() -> dict[str, Any]:
    import pyquant

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "pyquant": pyquant.__version__,
        "native": pyquant.native_info(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> str:
    """pyquant's version and SIMD level, torch's version and its threads, for a results note."""
    import pyquant
    return (f"pyquant {pyquant.__version__}, native {pyquant.native_info()['simd']}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        if v is None:
            return "–"
        return str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


def write_results(name: str, rows: list[dict[str, Any]], columns: list[str], *, title: str,
                  notes: Optional[list[str]] = None, out_dir: Optional[Path] = None) -> Path:
    out_dir = Path(out_dir) if out_dir else RESULTS
    meta = machine()
    payload = {"name": name, "title": title, "machine": meta, "rows": rows, "notes": notes or [],
               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write(out_dir / f"{name}.json", json.dumps(payload, indent=2, default=str) + "\n")
    md = [f"# {title}", "",
          f"{meta['cpu']}, {meta['cpu_threads']} threads, torch {meta['torch']}, "
          f"pyquant SIMD {meta['native'].get('simd')}" + (f", GPU {meta['gpu']}" if "gpu" in meta else ""),
          "", markdown_table(rows, columns), ""]
    for n in notes or []:
        md.append(f"- {n}")
    atomic_write(out_dir / f"{name}.md", "\n".join(md) + "\n")
    return out_dir / f"{name}.json"


def padded_batches(sel: "torch.Tensor", size: int):
    """(indices, n) for batches of exactly `size` indices of `sel`, the last one padded by repeating its
    first index (n = the real ones): models captured at a fixed batch shape take every batch."""
    import torch
    for i in range(0, len(sel), size):
        s = sel[i:i + size]
        k = len(s)
        if k < size:
            s = torch.cat([s, s[:1].repeat(size - k)])
        yield s, k
