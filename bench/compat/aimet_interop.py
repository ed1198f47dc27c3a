"""Encodings interchange between pyquant and aimet-torch 2.42 on the same BN-folded MobileNetV2.

pyquant -> AIMET: pyquant's QuantSim (W8A8 per-channel, TF-enhanced) is calibrated and exported; its
1.0.0 encodings file is translated into the layout AIMET's ``QuantizationSimModel.load_encodings`` takes
(module-keyed ``{"input"|"output": {"0": [...]}}`` activations, parameter-keyed params, legacy per-channel
dicts with min/max) and loaded into AIMET's sim of the same model. AIMET -> pyquant: AIMET's sim is
calibrated by AIMET and exported; its 1.0.0 ``.encodings`` file (ONNX tensor names) is read with
``pyquant.sim.encodings.load_encodings``, renamed to pyquant's quantizer names, written back with
``write_encodings`` and loaded with ``QuantSim.load_encodings``. Each direction then runs both sims on
the same crops and compares, with forward hooks on the quantizers, every activation tensor both quantize
(in units of that tensor's quantization step) and the quantized weights.

    PYQUANT_CUDA=OFF /tmp/pyquant-peers/bin/pip install -q /work/main -Cbuild-dir=/tmp/pq-peer-build
    cd /work/main && /tmp/pyquant-peers/bin/python -P bench/compat/aimet_interop.py [--out DIR] [--n 64]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file with -P: the checkout goes last on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[2]))

import torch

from bench._harness import write_results

COLUMNS = ["direction", "tensors compared", "same input: max diff (steps)", "same input: % tensors within 1 step",
           "same input: elements differing %", "end-to-end: max diff (steps)", "end-to-end: % tensors within 1 step",
           "end-to-end: elements differing %", "weights: max diff (steps)", "logits top-1 agreement"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor).detach() if isinstance(t, torch.Tensor) else t


# ---- AIMET side ----------------------------------------------------------------------------------
def aimet_sim(model, dummy):
    import aimet_torch
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.quantsim import QuantizationSimModel

    for name in ("Quant", "ConnectedGraph", "Utils", "ModelPreparer", "BatchNormFolding"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    cfg = Path(aimet_torch.__file__).parent / "common" / "quantsim_config" / "default_config_per_channel.json"
    with _quiet():
        sim = QuantizationSimModel(prepare_model(model), dummy, quant_scheme=QuantScheme.post_training_tf_enhanced,
                                   default_output_bw=8, default_param_bw=8, config_file=str(cfg))
    return sim


def aimet_quantized_modules(asim):
    from aimet_torch.nn.base import BaseQuantizationMixin
    return {n: m for n, m in asim.model.named_modules() if isinstance(m, BaseQuantizationMixin)}


def disable_depthwise_outputs(asim) -> list[str]:
    """AIMET quantizes depthwise-conv outputs ahead of their ReLU6 (its Conv+Clip supergroup skips
    depthwise convs); pyquant fuses every conv with its ReLU6. Removing them makes both sims quantize the
    same tensors."""
    out = []
    for n, m in aimet_quantized_modules(asim).items():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels \
                and len(m.output_quantizers) and m.output_quantizers[0] is not None:
            m.output_quantizers[0] = None
            out.append(n)
    return out


def name_map(pq_sim, asim) -> dict[str, tuple[str, str]]:
    """pyquant activation quantizer name -> (AIMET module name, 'input' | 'output')."""
    mods = aimet_quantized_modules(asim)
    inputs = [n for n, m in mods.items() if any(q is not None for q in m.input_quantizers)]
    out = {}
    for name in pq_sim.activation_quantizers:
        if name.startswith("input."):
            if len(inputs) == 1:
                out[name] = (inputs[0], "input")
            continue
        base = name[: -len(".output")]
        if base in mods:
            out[name] = (base, "output")
        else:  # functional op ('add_3') -> AIMET's prepared module ('features.8.module_add_3')
            hits = [n for n in mods if n.rsplit(".", 1)[-1] == f"module_{base}"]
            if len(hits) == 1:
                out[name] = (hits[0], "output")
    return out


def _aimet_quantizer(asim, where: tuple[str, str]):
    m = asim.model.get_submodule(where[0])
    qs = m.input_quantizers if where[1] == "input" else m.output_quantizers
    return qs[0]


def pyquant_file_to_aimet(path: Path, amap: dict[str, tuple[str, str]]) -> tuple[dict, list[str]]:
    """pyquant's 1.0.0 file -> the dict AIMET's load_encodings takes. Returns (dict, unmapped names)."""
    data = json.loads(path.read_text())

    def legacy(e):
        n = 2 ** e["bw"] - 1
        return [{"bitwidth": e["bw"], "dtype": "int", "is_symmetric": str(bool(e["is_sym"])),
                 "scale": s, "offset": int(o), "min": s * o, "max": s * (o + n)}
                for s, o in zip(e["scale"], e["offset"])]

    params = {e["name"]: legacy(e) for e in data["param_encodings"]}
    acts: dict[str, dict] = {}
    unmapped = []
    for e in data["activation_encodings"]:
        where = amap.get(e["name"])
        if where is None:
            unmapped.append(e["name"])
            continue
        acts.setdefault(where[0], {}).setdefault(where[1], {})["0"] = legacy(e)
    return {"version": "0.6.1", "activation_encodings": acts, "param_encodings": params}, unmapped


def onnx_scope_to_module(name: str) -> str | None:
    """'/features/features.3/conv/conv.1/1.2/Clip_output_0' -> 'features.3.conv.1.2' (torch's ONNX scope
    names: one component per module level, each ending with that level's attribute name)."""
    if not name.startswith("/"):
        return None
    parts = name.strip("/").split("/")[:-1]
    return ".".join(p.rsplit(".", 1)[-1] for p in parts) or None


def aimet_file_to_pyquant(path: Path, torch_path: Path, pq_sim, amap: dict[str, tuple[str, str]]):
    """AIMET's 1.0.0 .encodings (read by pyquant's reader) -> {pyquant name: Encoding}, plus what could
    not be mapped. Names that are not ONNX scopes (the model input and output) are matched through
    AIMET's module-keyed <prefix>_torch.encodings, by identical scale and offset."""
    from pyquant.sim.encodings import load_encodings
    act, par = load_encodings(path)
    inv = {v: k for k, v in amap.items()}
    tj = json.loads(torch_path.read_text())["activation_encodings"]
    by_value = {}
    for mod, d in tj.items():
        for kind, per in d.items():
            for _, e in per.items():
                e = e[0] if isinstance(e, list) else e
                by_value.setdefault((round(float(e["scale"]), 12), int(e["offset"])), []).append((mod, kind))
    out, unmapped, checked = {}, [], 0
    for name, enc in act.items():
        mod = onnx_scope_to_module(name)
        where = (mod, "output") if mod is not None else None
        if where is None or where not in inv:
            # file offset -> key of the _torch file (same unsigned-grid convention)
            key = (round(float(enc.scale.flatten()[0]), 12), int(enc.offset.flatten()[0]) + enc.qmin)
            cands = [w for w in by_value.get(key, []) if w in inv]
            where = cands[0] if len(cands) == 1 else None
        if where is None or where not in inv:
            unmapped.append(name)
            continue
        out[inv[where]] = enc
        checked += 1
    return out, dict(par), unmapped


# ---- comparison ----------------------------------------------------------------------------------
@torch.no_grad()
def compare(pq_sim, asim, amap, x: torch.Tensor, bs: int = 16) -> dict:
    names = [n for n in pq_sim.activation_quantizers if n in amap and pq_sim.activation_quantizers[n].enabled
             and _aimet_quantizer(asim, amap[n]) is not None]
    cap_p, cap_pin, cap_a, hooks = {}, {}, {}, []
    for n in names:
        hooks.append(pq_sim.activation_quantizers[n].register_forward_hook(
            lambda m, i, o, n=n: (cap_p.__setitem__(n, _plain(o)), cap_pin.__setitem__(n, _plain(i[0])))
            and None))  # a hook that returns something replaces the output
        hooks.append(_aimet_quantizer(asim, amap[n]).register_forward_hook(
            lambda m, i, o, n=n: cap_a.__setitem__(n, _plain(o))))
    scale = {n: float(pq_sim.activation_quantizers[n].get_encoding().scale.flatten()[0]) for n in names}
    a_scale = {n: float(_plain(_aimet_quantizer(asim, amap[n]).get_scale()).flatten()[0]) for n in names}
    worst = {n: 0.0 for n in names}
    iso = {n: 0.0 for n in names}
    diff_el, tot_el, iso_el = 0, 0, 0
    lp, la = [], []
    try:
        for i in range(0, len(x), bs):
            b = x[i:i + bs]
            cap_p.clear(), cap_a.clear()
            lp.append(_plain(pq_sim.model(b)))
            with _quiet():
                la.append(_plain(asim.model(b)))
            for n in names:
                d = (cap_p[n] - cap_a[n]).abs()
                worst[n] = max(worst[n], float(d.max()) / scale[n])
                diff_el += int((d > 0.5 * scale[n]).sum())  # at least one step apart
                tot_el += d.numel()
                # the same input through both quantizers: the encodings alone, without the cascade
                di = (cap_p[n] - _plain(_aimet_quantizer(asim, amap[n])(cap_pin[n]))).abs()
                iso[n] = max(iso[n], float(di.max()) / scale[n])
                iso_el += int((di > 0.5 * scale[n]).sum())
    finally:
        for h in hooks:
            h.remove()
    lp, la = torch.cat(lp), torch.cat(la)
    # weights: pyquant's fake-quantized weight vs AIMET's, per channel in steps
    mods = aimet_quantized_modules(asim)
    w_worst, w_n = 0.0, 0
    for pname, q in pq_sim.param_quantizers.items():
        mname, attr = pname.rsplit(".", 1)
        aq = mods[mname].param_quantizers[attr] if mname in mods else None
        if aq is None or q.get_encoding() is None:
            continue
        w = pq_sim.weight(pname)
        d = (_plain(q(w)) - _plain(aq(w))).abs() / q.get_encoding().scale
        w_worst = max(w_worst, float(d.max()))
        w_n += 1
    mism = max(abs(a_scale[n] - scale[n]) / scale[n] for n in names)
    within = sum(1 for n in names if worst[n] <= 1.001)
    iso_within = sum(1 for n in names if iso[n] <= 1.001)
    return dict(n=len(names), max_steps=max(worst.values()), within=within,
                iso_max_steps=max(iso.values()), iso_pct_within=100.0 * iso_within / len(names),
                iso_diff_pct=100.0 * iso_el / max(tot_el, 1), per_tensor_same_input={n: round(v, 3) for n, v in iso.items()},
                pct_within=100.0 * within / len(names), diff_pct=100.0 * diff_el / max(tot_el, 1),
                w_n=w_n, w_max_steps=w_worst, scale_mismatch=mism,
                top1=float((lp.argmax(1) == la.argmax(1)).float().mean()) * 100,
                logits_max_abs=float((lp - la).abs().max()),
                per_tensor={n: round(v, 3) for n, v in worst.items()})


def row(direction: str, c: dict) -> dict:
    return {"direction": direction, "tensors compared": c["n"], "end-to-end: max diff (steps)": c["max_steps"],
            "end-to-end: % tensors within 1 step": c["pct_within"], "end-to-end: elements differing %": c["diff_pct"],
            "same input: max diff (steps)": c["iso_max_steps"], "same input: % tensors within 1 step": c["iso_pct_within"],
            "same input: elements differing %": c["iso_diff_pct"],
            "weights: max diff (steps)": f"{c['w_max_steps']:.3g} ({c['w_n']} weights)",
            "logits top-1 agreement": f"{c['top1']:.1f}%", **{k: v for k, v in c.items() if k != "n"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="calibration crops (also the compared inputs)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()

    import pyquant
    from pyquant.datasets import imagenet_calibration_set
    from pyquant.models import mobilenet_v2
    from pyquant.sim.encodings import write_encodings
    from pyquant.sim.quantsim import QuantSim
    from pyquant.techniques import fold_batchnorms
    try:
        import aimet_torch  # noqa: F401
        from importlib.metadata import version
        aimet_version = version("aimet-torch")
    except Exception as exc:  # noqa: BLE001
        print(f"aimet_torch not importable ({exc}): run in the peer env (see the docstring)", file=sys.stderr)
        return 2

    model = mobilenet_v2()
    fold_batchnorms(model)
    model.eval()
    x = imagenet_calibration_set(a.n)

    def calib(m):
        for i in range(0, len(x), 32):
            m(x[i:i + 32])

    notes, rows, details = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # pyquant, calibrated by pyquant
        pq = QuantSim(model, x[:1], quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="default")
        pq.compute_encodings(calib)
        pq_paths = pq.export(tmp / "pq", "mobilenet_v2", x[:1])
        log(f"pyquant: {len(pq.param_quantizers)} weight + {len(pq.activation_quantizers)} activation quantizers")

        # AIMET, calibrated by AIMET (depthwise-output quantizers removed, see disable_depthwise_outputs)
        asim = aimet_sim(model, x[:1])
        dw = disable_depthwise_outputs(asim)
        amap = name_map(pq, asim)
        unmatched_pq = [n for n in pq.activation_quantizers if n not in amap]
        mods = aimet_quantized_modules(asim)
        a_acts = [(n, k) for n, m in mods.items() for k, qs in (("input", m.input_quantizers),
                                                                  ("output", m.output_quantizers))
                  for q in qs if q is not None]
        only_aimet = [w for w in a_acts if w not in set(amap.values())]
        log(f"AIMET: removed {len(dw)} depthwise-output quantizers; {len(a_acts)} activation quantizers, "
            f"{len(amap)} matched to pyquant's; only pyquant: {unmatched_pq}; only AIMET: {only_aimet}")
        t0 = time.perf_counter()
        with _quiet():
            asim.compute_encodings(calib)
        log(f"AIMET compute_encodings {time.perf_counter() - t0:.0f} s")
        (tmp / "aimet").mkdir()
        with _quiet():
            asim.export(str(tmp / "aimet"), "mobilenet_v2", x[:1])
        a_file, a_torch = tmp / "aimet" / "mobilenet_v2.encodings", tmp / "aimet" / "mobilenet_v2_torch.encodings"

        # 0. reference: each sim with its own calibration
        c0 = compare(pq, asim, amap, x)
        rows.append(row("none: each calibrated by itself (reference)", c0))
        log(f"independent: {c0['max_steps']:.1f} steps max, top-1 {c0['top1']:.1f}%")

        # 1. AIMET -> pyquant
        act, par, unm = aimet_file_to_pyquant(a_file, a_torch, pq, amap)
        details["aimet_to_pyquant"] = {"activations_read": len(act) + len(unm), "activations_mapped": len(act),
                                       "unmapped": unm, "params": len(par)}
        enc_path = tmp / "from_aimet.encodings"
        write_encodings(enc_path, act, par)
        pq2 = QuantSim(model, x[:1], quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="default")
        pq2.load_encodings(enc_path)
        not_loaded = [n for n, q in pq2.quantizers.items() if q.get_encoding() is None]
        details["aimet_to_pyquant"]["pyquant_quantizers_without_encoding"] = not_loaded
        c1 = compare(pq2, asim, amap, x)
        rows.append(row("AIMET -> pyquant (AIMET's .encodings 1.0.0 into QuantSim.load_encodings)", c1))
        log(f"AIMET -> pyquant: {c1['max_steps']:.1f} steps max, top-1 {c1['top1']:.1f}%")

        # 2. pyquant -> AIMET
        raw_err = None
        try:
            with _quiet():
                asim.load_encodings(str(pq_paths["encodings"]), strict=True, partial=True)
        except Exception as exc:  # noqa: BLE001 - expected: AIMET's loader takes the module-keyed layout
            raw_err = f"{type(exc).__name__}: {str(exc)[:200]}"
        adict, unm2 = pyquant_file_to_aimet(pq_paths["encodings"], amap)
        with _quiet():
            asim.load_encodings(adict, strict=True, partial=False, allow_overwrite=True)
        a_missing = [w for w in a_acts if _aimet_quantizer(asim, w) is None
                     or not _aimet_quantizer(asim, w).is_initialized()]
        details["pyquant_to_aimet"] = {"raw_1_0_0_file_into_aimet": raw_err or "loaded", "unmapped": unm2,
                                       "aimet_quantizers_without_encoding": a_missing}
        c2 = compare(pq, asim, amap, x)
        rows.append(row("pyquant -> AIMET (pyquant's .encodings 1.0.0, translated, into load_encodings)", c2))
        log(f"pyquant -> AIMET: {c2['max_steps']:.1f} steps max, top-1 {c2['top1']:.1f}%")

    details["per_tensor_max_steps"] = {r["direction"]: r.pop("per_tensor") for r in rows}
    details["per_tensor_max_steps_same_input"] = {r["direction"]: r.pop("per_tensor_same_input") for r in rows}
    # noise floor of the end-to-end comparison: pyquant's sim against itself on x * (1 + 1e-6)
    l0 = torch.cat([pq.model(x[i:i + 16]) for i in range(0, len(x), 16)])
    l1 = torch.cat([pq.model(x[i:i + 16] * (1 + 1e-6)) for i in range(0, len(x), 16)])
    floor_top1 = float((l0.argmax(1) == l1.argmax(1)).float().mean()) * 100
    details["noise_floor_top1_pyquant_vs_itself_x_1e-6"] = floor_top1
    details["depthwise_outputs_removed_in_aimet"] = dw
    details["only_pyquant"], details["only_aimet"] = unmatched_pq, only_aimet
    notes += [
        f"pyquant {pyquant.__version__} and aimet-torch {aimet_version}, torch {torch.__version__}, one process; "
        f"MobileNetV2 (pyquant.models.mobilenet_v2, BN folded), W8A8 per-channel weights, TF-enhanced; both sims "
        f"calibrated on imagenet_calibration_set({a.n}) in batches of 32 and compared on those {a.n} crops",
        "AIMET: QuantizationSimModel(prepare_model(model), quant_scheme=post_training_tf_enhanced, "
        "default_output_bw=8, default_param_bw=8, config_file=default_config_per_channel.json), as in "
        f"bench/quantsim.py; its {len(dw)} output quantizers on depthwise convs (ahead of ReLU6, which pyquant "
        "fuses) are removed before calibration, so both sims quantize the same tensors",
        "pyquant -> AIMET: pyquant's exported 1.0.0 file is translated (param entries by parameter name; "
        "'input.x' -> features.0.0 input_quantizers[0], '<module>.output' -> that module's output_quantizers[0], "
        "'add_k.output' -> the module_add_k AIMET's prepare_model creates; legacy dicts with min = scale*offset, "
        "max = scale*(offset + 2^bw - 1)) and loaded with load_encodings(strict=True, partial=False). "
        f"AIMET 2.42's load_encodings on the 1.0.0 file as written: {raw_err or 'loaded'}",
        "AIMET -> pyquant: AIMET's exported <prefix>.encodings (1.0.0, ONNX tensor names) is read with "
        "pyquant.sim.encodings.load_encodings; names map by their ONNX scope ('/features/features.3/conv/"
        "conv.1/1.2/Clip_output_0' -> features.3.conv.1.2), the model input/output by matching scale and offset "
        "in AIMET's <prefix>_torch.encodings; rewritten with write_encodings and loaded with QuantSim.load_encodings",
        "max diff (steps) = max over tensors and elements of |pyquant's quantized value - AIMET's| / that "
        "tensor's scale (the loaded scale), captured with forward hooks on the quantizers. 'same input': the "
        "tensor pyquant's quantizer received, passed through AIMET's quantizer too (the encodings alone); "
        "'end-to-end': each sim runs its own forward, so a 1-step flip early on cascades through the later "
        "quantizers; elements differing = share of activation elements at least one step apart; weights: both "
        "sims' fake-quantized weights, per channel in steps; top-1 agreement of the two sims' logits",
        f"end-to-end noise floor: pyquant's sim against itself on the crops times (1 + 1e-6) agrees on top-1 "
        f"for {floor_top1:.1f}% (W8A8 MobileNetV2 amplifies single rounding flips)",
        f"whole run {time.perf_counter() - t_start:.0f} s",
    ]
    path = write_results("aimet_interop", rows, COLUMNS, title="Encodings interchange, pyquant <-> aimet-torch "
                         f"{aimet_version}, MobileNetV2 W8A8", notes=notes, out_dir=a.out)
    payload = json.loads(path.read_text())
    payload["details"] = details
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
