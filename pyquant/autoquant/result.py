"""What AutoQuant returns: one record per step it went through, and the result of the whole run."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

__all__ = ["StepRecord", "AutoQuantResult"]


@dataclasses.dataclass
class StepRecord:
    """One step of the flow.

    `status` is "evaluated" (eval_fn ran on its model), "skipped" (the step does not apply to this
    model or data; `reason` says why) or "failed" (the technique raised; `reason` has the error).
    `kind` is "fp32", "full" (weights and activations quantized: a candidate for the result),
    "weights_only" or "activations_only" (diagnostics that also pick the calibration schemes).
    `improved`: the step was the best full simulation so far when it finished. `cached`: taken from
    the cache of an earlier run instead of being recomputed (a cached step is reused only when its
    `recipe` -- what it was built on -- and its own `settings` are the same as now)."""

    key: str
    title: str
    kind: str
    status: str
    accuracy: Optional[float] = None
    seconds: float = 0.0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    recipe: Optional[dict[str, Any]] = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # the step's own settings
    reason: str = ""
    improved: bool = False
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StepRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class AutoQuantResult:
    """The outcome of `AutoQuant.optimize`.

    `sim`: the chosen quantized model, a calibrated QuantSim (`sim.model` runs it, `sim.export(...)`
    writes the QDQ ONNX model). `accuracy`: eval_fn on it; `fp32_accuracy`: eval_fn on the FP32
    model; `target_met`: fp32_accuracy - accuracy <= allowed_accuracy_drop. `best_step`: the key of
    the step whose simulation this is; `applied`: what that simulation carries, in order (calibration
    schemes and the techniques kept). `budget_exhausted`: the time budget stopped the flow before it
    had tried every step (the result is then the best found so far). `steps`: every step, in order.
    `encodings_path`: the encodings file (AIMET 1.0.0 JSON) of `sim`; `report_path` / `report_json_path`:
    the HTML and JSON reports."""

    sim: Any
    accuracy: float
    fp32_accuracy: float
    allowed_accuracy_drop: float
    target_met: bool
    best_step: str
    applied: list[str]
    weight_scheme: str
    activation_scheme: str
    budget_exhausted: bool
    steps: list[StepRecord]
    encodings_path: Path
    report_path: Path
    report_json_path: Path
    output_dir: Path
    seconds: float

    @property
    def accuracy_drop(self) -> float:
        """FP32's metric minus the chosen simulation's (in eval_fn's units)."""
        return self.fp32_accuracy - self.accuracy

    def step(self, key: str) -> StepRecord:
        """The record of one step by its key ("quantsim", "cle", "adaround", ...); KeyError lists the keys."""
        for s in self.steps:
            if s.key == key:
                return s
        raise KeyError(f"no step {key!r}; steps: {[s.key for s in self.steps]}")

    def summary(self) -> str:
        """A plain-text table of the steps and the outcome."""
        lines = [f"{'step':28s} {'status':10s} {'accuracy':>9s} {'drop':>8s} {'seconds':>8s}  notes"]
        for s in self.steps:
            acc = f"{s.accuracy:9.4f}" if s.accuracy is not None else f"{'-':>9s}"
            drop = f"{self.fp32_accuracy - s.accuracy:8.4f}" if s.accuracy is not None else f"{'-':>8s}"
            note = s.reason or ("best so far" if s.improved else "")
            if s.cached:
                note = (note + ", " if note else "") + "cached"
            lines.append(f"{s.key:28s} {s.status:10s} {acc} {drop} {s.seconds:8.1f}  {note}")
        verdict = "met" if self.target_met else "NOT met"
        lines.append(f"result: {self.best_step} ({', '.join(self.applied)}), accuracy {self.accuracy:.4f} vs FP32 "
                     f"{self.fp32_accuracy:.4f}: drop {self.accuracy_drop:.4f}, target <= "
                     f"{self.allowed_accuracy_drop:.4f} {verdict}"
                     + ("; stopped by the time budget" if self.budget_exhausted else ""))
        return "\n".join(lines)
