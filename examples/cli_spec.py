"""The `pyquant` command on your own model: a SPEC function, then export, compare and analyze.

    python examples/cli_spec.py [--quick] [--out DIR]

The command takes a SPEC, `package.module:function`: a function, importable from the current directory
or PYTHONPATH, that returns the model, a dummy input, data and optionally a metric. This file is one;
from the examples folder:

    pyquant export  cli_spec:build -o out/                  # calibrate; out/build.onnx (QDQ), .encodings, .pth
    pyquant compare cli_spec:build -o out/ --mode lockstep --optimize   # the export vs the simulation
    pyquant analyze cli_spec:build -o report/               # report/report.html, analysis.json, figures/
    pyquant autoquant cli_spec:build --allowed-drop 0.01    # needs the metric

Running the file calls the same commands in-process (`pyquant.cli.main(argv)` returns the exit code:
0 done, 1 failed, 2 usage error, 3 missing dependency, 4 target missed, 5 compare found a tensor more
than one step off) and prints `pyquant <command>: exit <code>` for each.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from common import QUICK_ENV, image_model, parse_args


def build() -> dict:
    """The SPEC: {"model", "dummy_input", "data"[, "metric", "name"]}; data is calibration and evaluation data."""
    quick = os.environ.get(QUICK_ENV, "") not in ("", "0")
    name, model, calib, evalx = image_model(quick)
    with torch.no_grad():
        ref = model(evalx).argmax(1)

    def agreement(m: torch.nn.Module) -> float:             # the metric: higher is better
        with torch.no_grad():
            return float((m(evalx).argmax(1) == ref).float().mean())

    return {"model": model, "dummy_input": calib[:1], "data": calib, "metric": agreement, "name": "my_model"}


def main() -> None:
    args = parse_args(__doc__)
    if args.quick:
        os.environ[QUICK_ENV] = "1"                         # build() reads it
    from pyquant.cli import main as pyquant

    out = Path(args.out) / "cli"
    commands = [["export", "cli_spec:build", "-o", str(out)],
                ["compare", "cli_spec:build", "-o", str(out / "compare"), "--mode", "lockstep", "--optimize",
                 "--samples", "2"]]
    if not args.quick:
        commands.append(["analyze", "cli_spec:build", "-o", str(out / "report")])
    for argv in commands:
        code = pyquant(argv)
        print(f"pyquant {argv[0]}: exit {code}")
    print(f"exported: {out / 'my_model.onnx'}")


if __name__ == "__main__":
    main()
