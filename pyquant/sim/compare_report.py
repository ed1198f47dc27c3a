"""What a comparison of a simulation with its exported model found: per quantized tensor, how far the
target's values are from the simulation's, measured in the quantizer's own steps, and which tensor is
the first to differ by more than one step."""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .._io import atomic_path

__all__ = ["STEP_TOLERANCE", "TensorComparison", "OutputComparison", "TensorValues", "ComparisonReport",
           "tensor_stats", "step_distance", "sqnr_db"]

STEP_TOLERANCE = 1e-3
"""Values on one grid differ by whole steps, up to the float32 rounding of (q + o) * s: a difference
counts as "more than one step" above 1 + STEP_TOLERANCE."""

@dataclasses.dataclass
class TensorComparison:
    """One quantized tensor, target against simulation.

    `sqnr_db`: 10 log10(sum sim^2 / sum (target - sim)^2), inf when they are equal. `max_steps`: the
    largest |target - sim| in units of the quantizer's scale (per channel where the encoding is);
    `frac_over_one_step`: the fraction of elements more than one step apart. `encoding_matches`: the
    graph's QuantizeLinear and DequantizeLinear carry the simulation's scale and zero point.
    `input_max_steps`: the largest distance between the quantizer's input in the simulation and in the
    target, in steps (None where the target's input is not observable: inside onnxruntime's fused int8
    kernels). `qdq_exact`: the simulation's quantizer, given the target's own input, reproduces the
    target's tensor bit for bit (None where that input is not observable)."""

    name: str
    op_type: str
    kind: str
    shape: tuple[int, ...]
    sqnr_db: float
    max_steps: float
    frac_over_one_step: float
    encoding_matches: bool
    input_max_steps: Optional[float] = None
    qdq_exact: Optional[bool] = None

    @property
    def differs(self) -> bool:
        """More than one step apart somewhere."""
        return not self.max_steps <= 1.0 + STEP_TOLERANCE  # NaN counts as a difference

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["differs"] = self.differs
        return {k: _json_number(v) for k, v in d.items()}


@dataclasses.dataclass
class OutputComparison:
    """One output of the model: the target's against the simulation's (no steps: outputs need not be
    quantized)."""

    index: int
    name: str
    shape: tuple[int, ...]
    sqnr_db: float
    max_abs_diff: float

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return {k: _json_number(v) for k, v in d.items()}


@dataclasses.dataclass
class TensorValues:
    """The dumped values of one quantized tensor (float32, dequantized) and of the quantizer's input."""

    simulation: torch.Tensor
    target: torch.Tensor
    simulation_input: Optional[torch.Tensor] = None
    target_input: Optional[torch.Tensor] = None


def _json_number(v: Any) -> Any:
    # strict JSON has no inf/NaN: they are written as strings
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _expand(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """An encoding's scale (right-aligned, per tensor, per channel or per block) at every element."""
    s = scale.reshape((1,) * (len(shape) - scale.dim()) + tuple(scale.shape)) if scale.dim() < len(shape) else scale
    for d, (k, n) in enumerate(zip(s.shape, shape)):
        if k not in (1, n):
            s = s.repeat_interleave(n // k, dim=d)
    return s


def step_distance(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|a - b| in steps of `scale`, in float64; 0 where both are NaN, inf where only one is."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    d = (a64 - b64).abs() / _expand(scale.detach().double().cpu(), a64.shape)
    both = a64.isnan() & b64.isnan()
    return torch.where(both, torch.zeros_like(d), torch.where(d.isnan(), torch.full_like(d, math.inf), d))


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - out)^2)`` in dB, in float64
    (inf when identical, -inf when `ref` is all zeros and `out` is not); `pyquant.metrics.sqnr_db`."""
    r = ref.detach().to("cpu", torch.float64)
    o = out.detach().to("cpu", torch.float64)
    if r.shape != o.shape:
        raise ValueError(f"shapes differ: {tuple(r.shape)} vs {tuple(o.shape)}")
    noise = (r - o).square().sum().item()
    signal = r.square().sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def tensor_stats(sim: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> tuple[float, float, float]:
    """(SQNR in dB of target against sim, largest difference in steps, fraction more than one step apart)."""
    steps = step_distance(target, sim, scale)
    if steps.numel() == 0:
        return math.inf, 0.0, 0.0
    return (sqnr_db(sim, target), float(steps.max()),
            float((steps > 1.0 + STEP_TOLERANCE).double().mean()))


@dataclasses.dataclass
class ComparisonReport:
    """The result of `pyquant.sim.compare.compare`: every quantized tensor in the order the simulation
    computes it, the model outputs, and the dumped values (`values`, `output_values`)."""

    onnx_path: str
    mode: str
    optimize: bool
    samples: int
    tensors: list[TensorComparison]
    outputs: list[OutputComparison]
    notes: list[str] = dataclasses.field(default_factory=list)
    values: dict[str, TensorValues] = dataclasses.field(default_factory=dict, repr=False)
    output_values: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list, repr=False)

    @property
    def target(self) -> str:
        return "onnxruntime, optimized (int8 kernels)" if self.optimize else "onnxruntime, as written"

    @property
    def differing(self) -> list[TensorComparison]:
        """The tensors more than one step apart, in execution order."""
        return [t for t in self.tensors if t.differs]

    @property
    def first_difference(self) -> Optional[TensorComparison]:
        """The first tensor, in execution order, more than one step apart (None: the target agrees)."""
        return next((t for t in self.tensors if t.differs), None)

    @property
    def agrees(self) -> bool:
        return self.first_difference is None

    def tensor(self, name: str) -> TensorComparison:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"no quantized tensor {name!r} in the comparison; tensors: {[t.name for t in self.tensors][:4]}")

    def reason(self, t: TensorComparison) -> str:
        """Why tensor `t` differs, as far as the comparison can tell."""
        if not t.encoding_matches:
            return "the graph's QuantizeLinear/DequantizeLinear carry a scale or zero point other than the simulation's"
        if t.input_max_steps is not None and t.input_max_steps > 1.0 + STEP_TOLERANCE:
            if self.mode == "lockstep":
                return (f"its input already differs by {t.input_max_steps:.3g} steps: the ops before it compute "
                        f"differently from the simulation")
            return (f"its input already differs by {t.input_max_steps:.3g} steps (end to end, earlier differences "
                    f"accumulate; lockstep mode isolates the op)")
        if t.qdq_exact is False:
            return "given the same input, the graph's QuantizeLinear/DequantizeLinear round or clamp differently"
        if self.mode == "lockstep":
            return "the target's kernel that produces it computes differently from the simulation"
        return "earlier differences accumulate end to end (lockstep mode isolates the op)"

    def verdict(self) -> str:
        """One sentence: does any tensor differ by more than one step, which first, and why."""
        first = self.first_difference
        where = f"[{self.target}; {self.mode.replace('_', ' ')}; {self.samples} sample(s)]"
        if first is None:
            return f"no quantized tensor differs by more than one step ({len(self.tensors)} compared) {where}"
        return (f"{len(self.differing)} of {len(self.tensors)} quantized tensors differ by more than one step. First: "
                f"{first.name} ({first.op_type}), up to {first.max_steps:.3g} steps on "
                f"{100 * first.frac_over_one_step:.3g}% of its elements: {self.reason(first)} {where}")

    def summary(self) -> str:
        """A plain-text table of the tensors and outputs, then the verdict."""
        rows = [("#", "tensor", "op", "shape", "SQNR dB", "max steps", "> 1 step", "input steps", "encoding")]
        for i, t in enumerate(self.tensors):
            rows.append((str(i), t.name + (" <" if t is self.first_difference else ""), t.op_type,
                         "x".join(map(str, t.shape)), _num(t.sqnr_db, ".1f"), _num(t.max_steps, ".3g"),
                         f"{100 * t.frac_over_one_step:.3g}%", "-" if t.input_max_steps is None else
                         _num(t.input_max_steps, ".3g"), "same" if t.encoding_matches else "DIFFERENT"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for o in self.outputs:
            lines.append(f"output {o.index} ({o.name}, {'x'.join(map(str, o.shape))}): SQNR "
                         f"{_num(o.sqnr_db, '.1f')} dB, max |difference| {o.max_abs_diff:.3g}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(self.verdict())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON values (infinite numbers as the strings "inf" / "-inf")."""
        first = self.first_difference
        return {"onnx": self.onnx_path, "mode": self.mode, "optimize": self.optimize, "target": self.target,
                "samples": self.samples, "threshold_steps": 1.0,
                "first_difference": first.name if first is not None else None,
                "differing": len(self.differing), "verdict": self.verdict(),
                "tensors": [t.to_json() for t in self.tensors], "outputs": [o.to_json() for o in self.outputs],
                "notes": list(self.notes)}

    def save_tensors(self, folder: Union[str, os.PathLike]) -> Path:
        """Writes every dumped tensor to `folder`/tensors.npz, atomically: `simulation/<name>`,
        `target/<name>`, `simulation_input/<name>`, `target_input/<name>` (where observed),
        `output/simulation/<i>`, `output/target/<i>`. Returns the path."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for name, v in self.values.items():
            for key in ("simulation", "target", "simulation_input", "target_input"):
                t = getattr(v, key)
                if t is not None:
                    arrays[f"{key}/{name}"] = t.detach().cpu().numpy()
        for i, (s, t) in enumerate(self.output_values):
            arrays[f"output/simulation/{i}"] = s.detach().cpu().numpy()
            arrays[f"output/target/{i}"] = t.detach().cpu().numpy()
        path = out / "tensors.npz"
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # a file object: given a name without ".npz", savez would append it
        return path


def _num(v: float, fmt: str) -> str:
    return format(v, fmt) if math.isfinite(v) else str(v)
