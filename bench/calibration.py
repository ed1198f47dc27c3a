"""Calibration: TF-enhanced encodings (per channel and per tensor) and per-channel min/max, pyquant
against AIMET's TfEnhancedEncodingAnalyzer, torch's HistogramObserver, torch.aminmax and copy
bandwidth, in one process (medians after warm-up), with the quality (SQNR) of the encodings and their
agreement with AIMET channel by channel.

    python -m bench.calibration              # dev env: AIMET columns stay empty (no aimet_torch)
    python -m bench.calibration --quick      # smaller sizes (a smoke run)
    python -m bench.calibration --out DIR    # results elsewhere than bench/results

With AIMET: pyquant links no libtorch, so it is installed into the peer env (aimet-torch 2.42) and run
on that env's torch. From a checkout, ``python -m`` would import the source tree's ``pyquant`` (no
compiled ``_C`` there) instead of the installed one, so run this file with ``-P`` (no checkout on the
front of sys.path); run as a file, it appends the checkout to the *end* of sys.path so that ``bench``
still imports while ``pyquant`` comes from site-packages::

    PYQUANT_CUDA=OFF /tmp/pyquant-peers/bin/pip install -q /work/main -Cbuild-dir=/tmp/pq-peer-build
    cd /work/main && /tmp/pyquant-peers/bin/python -P bench/calibration.py

(the install is a snapshot: reinstall after pyquant changes). The run refuses to time the pure-torch
fallback: it exits with status 2 when the imported pyquant has no compiled CPU module.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a file (python -P bench/calibration.py): checkout last on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

import pyquant
from pyquant.quant import TfEnhanced

from bench._harness import interleaved_times, median_time, report, require_native, write_results

COLUMNS = ["case", "data", "scheme", "pyquant_ms", "pyquant_update_ms", "pyquant_compute_ms", "baseline",
           "baseline_ms", "baseline_update_ms", "baseline_compute_ms", "speedup", "pyquant_sqnr_db",
           "baseline_sqnr_db", "sqnr_gain_db", "identical_enc", "identical_via_minmax", "max_rel_scale_diff",
           "fraction_of_bw", "target", "met"]

AIMET = "AIMET TfEnhancedEncodingAnalyzer"


def _aimet():
    """(TfEnhancedEncodingAnalyzer class, version) or (None, why not)."""
    try:
        from aimet_torch.quantization.encoding_analyzer import TfEnhancedEncodingAnalyzer
    except Exception as exc:  # ImportError, or a broken install
        return None, f"{type(exc).__name__}: {exc}"
    try:
        from importlib.metadata import version
        v = version("aimet-torch")
    except Exception:
        v = "?"
    return TfEnhancedEncodingAnalyzer, v


# ---- data (fixed seeds) -------------------------------------------------------------------------
def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _laplace(shape, seed, b=1.0):
    """Laplace(0, b) by inverting the CDF of a uniform in (-1/2, 1/2)."""
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5
    u = u.clamp(-0.5 + 1e-12, 0.5 - 1e-12)
    return (-b * torch.sign(u) * torch.log1p(-2 * u.abs())).float()


# ---- quality ------------------------------------------------------------------------------------
def _grid(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _qdq(x, s, o, qmin, qmax):
    """Plain-torch fake quantization (docs/design.md's contract), independent of pyquant's kernels."""
    return (torch.clamp(torch.round(x / s) - o, qmin, qmax) + o) * s


def _sqnr_db(x, s, o, qmin, qmax, per_row: bool) -> float:
    """SQNR of x vs its fake-quantized version in dB: per row (then the mean over rows) or overall."""
    err = (x - _qdq(x, s, o, qmin, qmax)).double()
    xd = x.double()
    if per_row:
        sig, noise = xd.pow(2).sum(1), err.pow(2).sum(1)
    else:
        sig, noise = xd.pow(2).sum(), err.pow(2).sum()
    return float((10 * torch.log10(sig / noise)).mean())


def _aimet_scale_offset(mn, mx, bits: int, symmetric: bool):
    """AIMET's (min, max) -> scale/offset as its quantizer derives them (scale = (max - min)/ns; asym offset
    = round(min/scale) on the unsigned grid; symmetric: offset 0 on the signed grid)."""
    ns = 2**bits - 1
    mn, mx = mn.float(), mx.float()
    s = torch.clamp((mx - mn) / ns, min=float(torch.finfo(torch.float32).eps))
    if symmetric:
        return s, torch.zeros_like(s)
    return s, torch.clamp(torch.round(mn / s), -ns, 0)


def _agreement(s_pq, o_pq, s_b, o_b, bits: int = 8, symmetric: bool = False) -> dict[str, Any]:
    """Channels where pyquant's scale/offset equal the baseline's bit for bit (identical_enc), and where
    they do once pyquant's encoding takes the same (min, max) round trip as AIMET's result: min = o·s,
    max = min + ns·s on the unsigned grid (o = -2^(b-1) for symmetric), then _aimet_scale_offset."""
    ns = 2**bits - 1
    s_pq, o_pq = s_pq.reshape(-1).float(), o_pq.reshape(-1).float()
    s_b, o_b = s_b.reshape(-1).float(), o_b.reshape(-1).float()
    n = s_pq.numel()
    rel = (s_pq.double() - s_b.double()).abs() / s_b.double()
    ident = (s_pq == s_b) & (o_pq == o_b)
    o_u = torch.full_like(o_pq, float(-(2 ** (bits - 1)))) if symmetric else o_pq
    mn = o_u * s_pq
    s_r, o_r = _aimet_scale_offset(mn, mn + ns * s_pq, bits, symmetric)
    via = (s_r == s_b) & (o_r == o_b)
    return dict(identical_enc=f"{int(ident.sum())}/{n}", identical_via_minmax=f"{int(via.sum())}/{n}",
                identical_offset=f"{int((o_pq == o_b).sum())}/{n}",
                max_rel_scale_diff=float(rel.max()), _differ=torch.nonzero(~via).flatten().tolist())


# ---- timing -------------------------------------------------------------------------------------
class _Split:
    """Timings of update / compute / both (seconds per rep) and the last result."""

    def __init__(self):
        self.update, self.compute, self.total, self.result = [], [], [], None

    @property
    def medians(self) -> tuple[float, float, float]:
        return tuple(statistics.median(v) for v in (self.update, self.compute, self.total))

    def raw_ms(self) -> list[float]:
        return [round(t * 1e3, 3) for t in self.total]


def _split_time(make: Callable[[], Any], update: Callable[[Any], None], compute: Callable[[Any], Any], *,
                warmup: int, reps: int, max_seconds: float = 20.0, min_reps: int = 3) -> _Split:
    """update(a) then compute(a) on a fresh a = make() per rep, after `warmup` untimed reps. Both stages
    are timed inside the same rep, so 'together' is exactly their sum per rep (its median is not the sum
    of the stages' medians when the times scatter)."""
    for _ in range(warmup):
        a = make()
        update(a)
        compute(a)
    out = _Split()
    start = time.perf_counter()
    for _ in range(reps):
        a = make()
        t0 = time.perf_counter()
        update(a)
        t1 = time.perf_counter()
        out.result = compute(a)
        t2 = time.perf_counter()
        out.update.append(t1 - t0)
        out.compute.append(t2 - t1)
        out.total.append(t2 - t0)
        if time.perf_counter() - start > max_seconds and len(out.total) >= min_reps:
            break
    return out


def _timing_cols(prefix: str, sp: _Split) -> dict[str, float]:
    tu, tc, tt = sp.medians
    return {f"{prefix}_ms": tt * 1e3, f"{prefix}_update_ms": tu * 1e3, f"{prefix}_compute_ms": tc * 1e3,
            f"{prefix}_times_ms": sp.raw_ms()}


def _interleaved(fns: list[Callable[[], Any]], *, warmup: int, reps: int) -> list[float]:
    """Median seconds per call of each fn, timed in turn round by round."""
    return [statistics.median(t) for t in interleaved_times(fns, warmup=warmup, reps=reps)]


# ---- case 1: per-channel TF-enhanced of a weight ---------------------------------------------------
def per_channel_rows(n: int, aimet_cls, aimet_label: str, aimet_reps: int, log) -> list[dict[str, Any]]:
    rows = []
    datasets = [("randn", _randn((n, n), 0)), ("laplace(0,1)", _laplace((n, n), 1))]
    case = f"per-channel TF-enhanced {n}x{n} (update_stats + compute_encodings)"
    for dname, w in datasets:
        for sym in (False, True):
            scheme = "sym 8-bit" if sym else "asym 8-bit"
            qmin, qmax = _grid(8, sym)
            pq = _split_time(lambda: TfEnhanced((n, 1)), lambda a: a.update_stats(w),
                             lambda a: a.compute_encodings(8, sym), warmup=2, reps=7)
            enc = pq.result
            row = dict(case=case, data=dname, scheme=scheme, **_timing_cols("pyquant", pq), baseline=AIMET,
                       pyquant_sqnr_db=_sqnr_db(w, enc.scale, enc.offset, qmin, qmax, per_row=True),
                       target=">= 100x AIMET")
            if aimet_cls is not None:
                # warm AIMET's code paths on a 64-channel slice (a full asymmetric call takes seconds)
                _split_time(lambda: aimet_cls(shape=(64, 1)), lambda a: a.update_stats(w[:64]),
                            lambda a: a.compute_encodings(num_steps=255, is_symmetric=sym), warmup=0, reps=1)
                reps = aimet_reps + (2 if sym else 0)  # symmetric calls are ~5x cheaper: 2 more reps
                ai = _split_time(lambda: aimet_cls(shape=(n, 1)), lambda a: a.update_stats(w),
                                 lambda a: a.compute_encodings(num_steps=255, is_symmetric=sym), warmup=0,
                                 reps=reps, max_seconds=1e9, min_reps=reps)
                mn, mx = ai.result
                s_b, o_b = _aimet_scale_offset(mn, mx, 8, sym)
                agree = _agreement(enc.scale, enc.offset, s_b, o_b, 8, sym)
                differ = agree.pop("_differ")
                if differ:
                    i = differ[0]
                    log(f"{dname} {scheme}: {len(differ)} channel(s) differ from AIMET even via (min, max), e.g. "
                        f"#{i}: pyquant scale {float(enc.scale.reshape(-1)[i]):.9g} offset "
                        f"{float(enc.offset.reshape(-1)[i]):g}, AIMET scale {float(s_b.reshape(-1)[i]):.9g} "
                        f"offset {float(o_b.reshape(-1)[i]):g}")
                speedup = ai.medians[2] / pq.medians[2]
                row.update(baseline=aimet_label, **_timing_cols("baseline", ai), speedup=speedup,
                           baseline_sqnr_db=_sqnr_db(w, s_b, o_b, qmin, qmax, per_row=True), met=speedup >= 100,
                           **agree)
            log(f"{dname} {scheme}: pyquant {row['pyquant_ms']:.1f} ms" +
                (f", AIMET {row['baseline_times_ms']} ms" if row.get("baseline_ms") else ""))
            rows.append(row)
    return rows


# ---- case 2: per-tensor TF-enhanced of activations -------------------------------------------------
def per_tensor_rows(shape, n_batches: int, aimet_cls, aimet_label: str, log) -> list[dict[str, Any]]:
    from torch.ao.quantization.observer import HistogramObserver

    xs = [torch.relu(_randn(shape, 100 + i)) for i in range(n_batches)]
    allx = torch.cat([x.reshape(1, -1) for x in xs], 1)
    qmin, qmax = _grid(8, False)
    data = f"relu(randn) {n_batches} x {'x'.join(map(str, shape))}"
    case = f"per-tensor TF-enhanced, {n_batches} batches (update_stats each + compute_encodings)"

    def upd_all(a):
        for x in xs:
            a.update_stats(x)

    pq = _split_time(lambda: TfEnhanced(()), upd_all, lambda a: a.compute_encodings(8, False), warmup=3, reps=15)
    enc = pq.result
    base = dict(case=case, data=data, scheme="asym 8-bit", **_timing_cols("pyquant", pq),
                pyquant_sqnr_db=_sqnr_db(allx, enc.scale, enc.offset, qmin, qmax, per_row=False))
    t_pq = pq.medians[2]
    rows = []
    row = dict(base, baseline=AIMET, target=">= 10x AIMET")
    if aimet_cls is not None:
        ai = _split_time(lambda: aimet_cls(shape=()), upd_all,
                         lambda a: a.compute_encodings(num_steps=255, is_symmetric=False), warmup=2, reps=9)
        mn, mx = ai.result
        s_b, o_b = _aimet_scale_offset(mn, mx, 8, False)
        agree = _agreement(enc.scale, enc.offset, s_b, o_b)
        agree.pop("_differ")
        speedup = ai.medians[2] / t_pq
        row.update(baseline=aimet_label, **_timing_cols("baseline", ai), speedup=speedup,
                   baseline_sqnr_db=_sqnr_db(allx, s_b, o_b, qmin, qmax, per_row=False), met=speedup >= 10, **agree)
    rows.append(row)

    def obs_all(ob):
        for x in xs:
            ob(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        ho = _split_time(HistogramObserver, obs_all, lambda ob: ob.calculate_qparams(), warmup=2, reps=9)
    s_h, zp_h = ho.result
    s_h, o_h = s_h.float().reshape(()), (-zp_h.float()).reshape(())
    speedup = ho.medians[2] / t_pq
    rows.append(dict(base, baseline="torch HistogramObserver (2048 bins, quint8)", **_timing_cols("baseline", ho),
                     speedup=speedup, baseline_sqnr_db=_sqnr_db(allx, s_h, o_h, qmin, qmax, per_row=False),
                     target=">= 2x HistogramObserver", met=speedup >= 2))
    log(f"per-tensor: pyquant {t_pq * 1e3:.2f} ms, AIMET {row.get('baseline_ms')} ms, "
        f"HistogramObserver {ho.medians[2] * 1e3:.1f} ms")
    return rows


# ---- case 3: per-channel min/max -----------------------------------------------------------------
def minmax_rows(n: int, log) -> list[dict[str, Any]]:
    x = _randn((n, n), 0)
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    mm = torch.ops.pyquant.minmax
    t_pq, t_clone, t_copy, t_sum = _interleaved([lambda: mm(x, [n, 1]), lambda: x.clone(), lambda: y.copy_(x),
                                                  lambda: x.sum()], warmup=3, reps=25)
    t_am = median_time(lambda: torch.aminmax(x, dim=1), warmup=3, reps=15)
    mn, mx, _ = mm(x, [n, 1])
    amn, amx = torch.aminmax(x, dim=1)
    same = int(((mn.reshape(-1) == amn) & (mx.reshape(-1) == amx)).sum())
    case = f"per-channel min/max {n}x{n} float32 (torch.ops.pyquant.minmax)"
    gbs = nbytes / t_pq / 1e9
    log(f"minmax: pyquant {t_pq * 1e3:.2f} ms ({gbs:.0f} GB/s read), clone {t_clone * 1e3:.2f} ms, "
        f"copy_ {t_copy * 1e3:.2f} ms, sum {t_sum * 1e3:.2f} ms, aminmax {t_am * 1e3:.2f} ms")
    r = dict(case=case, data="randn", pyquant_ms=t_pq * 1e3, pyquant_read_gb_s=gbs)
    f_clone, f_copy, f_sum = t_clone / (2 * t_pq), t_copy / (2 * t_pq), t_sum / t_pq
    return [dict(r, baseline="x.clone() (copy bandwidth: 2 x bytes / time)", baseline_ms=t_clone * 1e3,
                 fraction_of_bw=f_clone, target=">= 60% of copy bandwidth", met=f_clone >= 0.6),
            dict(r, baseline="y.copy_(x) into a preallocated y (copy bandwidth)", baseline_ms=t_copy * 1e3,
                 fraction_of_bw=f_copy, target=">= 60% of copy bandwidth", met=f_copy >= 0.6),
            dict(r, baseline="x.sum() (read bandwidth: bytes / time)", baseline_ms=t_sum * 1e3, fraction_of_bw=f_sum),
            dict(r, baseline="torch.aminmax(x, dim=1)", baseline_ms=t_am * 1e3, speedup=t_am / t_pq,
                 identical_enc=f"{same}/{n} (min, max)")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (1024x1024 weight, small activations)")
    p.add_argument("--aimet-reps", type=int, default=3,
                   help="timed repetitions of AIMET's per-channel analyzer (seconds each; default 3)")
    p.add_argument("--no-aimet", action="store_true", help="skip AIMET even when aimet_torch imports")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    a = p.parse_args(argv)

    if not require_native("bench/calibration.py"):
        return 2
    info = pyquant.native_info()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    aimet_cls, aimet_info = (None, "skipped (--no-aimet)") if a.no_aimet else _aimet()
    aimet_label = f"{AIMET} {aimet_info}"
    if aimet_cls is None:
        log(f"AIMET not available ({aimet_info}): AIMET columns stay empty")

    t0 = time.perf_counter()
    n = 1024 if a.quick else 4096
    act = (2, 64, 28, 28) if a.quick else (8, 256, 28, 28)
    rows = per_channel_rows(n, aimet_cls, aimet_label, a.aimet_reps, log)
    rows += per_tensor_rows(act, 4, aimet_cls, aimet_label, log)
    rows += minmax_rows(n, log)
    wall = time.perf_counter() - t0
    for r in rows:
        if r.get("pyquant_sqnr_db") is not None and r.get("baseline_sqnr_db") is not None:
            r["sqnr_gain_db"] = r["pyquant_sqnr_db"] - r["baseline_sqnr_db"]

    aimet_note = (f"AIMET: aimet-torch {aimet_info}, `aimet_torch.quantization.encoding_analyzer."
                  f"TfEnhancedEncodingAnalyzer(shape)`, `update_stats(x)` + `compute_encodings(num_steps=255, "
                  f"is_symmetric=...)`; per-channel: timed {a.aimet_reps}x (asym) / {a.aimet_reps + 2}x (sym) on "
                  f"fresh analyzers after a warm-up on a 64-channel slice (each full call takes seconds); "
                  f"per-tensor: 9x after 2 warm-ups; every rep's time is in the JSON (*_times_ms)"
                  if aimet_cls is not None else
                  f"AIMET columns are empty: aimet_torch does not import here ({aimet_info}); run in the peer env "
                  f"as bench/calibration.py's docstring says")
    notes = [
        "pyquant: `pyquant.quant.TfEnhanced(shape)` (512 bins, range growth capped at 3x, SQNR search over AIMET's "
        "candidates), `update_stats(x)` + `compute_encodings(8, symmetric)`; imported from "
        f"`{Path(pyquant.__file__).parent}`, native {info.get('simd')}, {info.get('threads')} OpenMP threads; "
        "timed 7x (per-channel) / 15x (per-tensor) after warm-up",
        aimet_note,
        "*_ms: median of update_stats + compute_encodings per rep, each rep on a fresh analyzer; *_update_ms and "
        "*_compute_ms are the medians of the two stages timed inside the same reps (so they need not add up to "
        "*_ms when times scatter); per-tensor rows: update_stats on each of the 4 batches; "
        "speedup = baseline_ms / pyquant_ms",
        "sqnr_db: 10·log10(Σx² / Σ(x - x̂)²), x̂ = plain-torch fake quantization (docs/design.md's formula) with each "
        "method's own scale/offset; per-channel rows: mean over channels; per-tensor rows: over all 4 batches; "
        "sqnr_gain_db = pyquant's minus the baseline's",
        "AIMET returns (min, max) per channel → scale = (max - min)/255; asym offset = round(min/scale) on "
        "0..255; "
        "sym: offset 0 on -128..127. identical_enc: channels whose pyquant scale and offset equal these bit for "
        "bit. identical_via_minmax: the same after pyquant's encoding takes AIMET's round trip (min = o·s, max = "
        "min + 255·s with o the unsigned-grid offset, -128 for sym, then the conversion above), i.e. the same "
        "search candidate chosen; max_rel_scale_diff: max over channels of |s_pq - s_aimet| / s_aimet",
        "torch HistogramObserver: `torch.ao.quantization.observer.HistogramObserver()` (defaults: 2048 bins, "
        "quint8, per-tensor affine, no reduce_range), forward on each batch + `calculate_qparams()`; offset = "
        "-zero_point",
        "min/max rows: fraction_of_bw = (bytes read / time) over the baseline's bandwidth: 2·bytes / time for the "
        f"copies, bytes / time for x.sum(). x.clone() allocates a fresh {n * n * 4 >> 20} MB output per call, and "
        "its page faults make it several times slower than y.copy_(x) into a preallocated y on this machine, so "
        "the copy_ row is the meaningful 'copy bandwidth' and x.sum() the read-only one; identical_enc there "
        "compares min and max with torch.aminmax(x, dim=1). minmax, clone, copy_ and sum are timed in turn, "
        "round by round (medians of 25)",
        f"whole run: {wall:.0f} s; the 2 cores are shared with other work, so single timings are noisy "
        "(AIMET's seconds-long calls especially; see *_times_ms in the JSON)",
    ]
    name = "calibration_cpu" + ("_quick" if a.quick else "")
    path = write_results(name, rows, COLUMNS, title="Calibration on the CPU: TF-enhanced encodings and min/max "
                         "(medians, one process)", notes=notes, out_dir=a.out)
    return report(path, rows)


if __name__ == "__main__":
    sys.exit(main())
