"""Hardware configs: the built-in profiles and a custom profile written as JSON.

    python examples/hardware_config.py [--quick] [--out DIR]

A hardware config says where the target quantizes: which op outputs and inputs, per-channel or per-tensor
weights, symmetric or not, fused op groups (no quantizer inside), fixed ranges and the bit widths each op
runs. The example builds the model under each built-in profile, then writes a custom profile (weights per
tensor except Conv, 16-bit Softmax-style fixed ranges on Sigmoid, Add outputs symmetric, W8A16 by default
through `supported_kernels`), loads it and shows what changed. Prints `<profile>: <n> quantizers` lines
and `custom: ... W8A16 default bit widths: 8/16`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyquant as pq
from pyquant.sim.config import load_config

from common import image_model, parse_args

CUSTOM_PROFILE = {
    "defaults": {
        "ops": {"is_output_quantized": "True", "is_symmetric": "False"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
        "per_channel_quantization": "False",
        "strict_symmetric": "False",
        "unsigned_symmetric": "True",               # non-negative activations (after ReLU) on [0, 2^b - 1]
        # the first entry gives the default bit widths when QuantSim is given none: W8A16
        "supported_kernels": [{"activation": {"bitwidth": 16, "dtype": "int"},
                               "param": {"bitwidth": 8, "dtype": "int"}},
                              {"activation": {"bitwidth": 8, "dtype": "int"},
                               "param": {"bitwidth": 8, "dtype": "int"}}],
    },
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {
        "Conv": {"per_channel_quantization": "True"},
        "Add": {"is_symmetric": "True"},
        "Sigmoid": {"encoding_constraints": {"min": 0.0, "max": 1.0}},
    },
    "supergroups": [{"op_list": ["Conv", "Relu"]}, {"op_list": ["Conv", "Clip"]}, {"op_list": ["Add", "Relu"]}],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {"is_output_quantized": "True"},
}


def main() -> None:
    args = parse_args(__doc__)
    name, model, calib, _ = image_model(args.quick)
    pq.fold_batchnorms(model)

    for profile in ("default", "per_tensor", "strict_symmetric_int8", "layer_inputs"):
        sim = pq.QuantSim(model, calib[:1], config=profile)
        per_channel = sum(1 for n, p in sim.placement.items() if p.axis is not None)
        print(f"{profile}: {len(sim.quantizers)} quantizers, {per_channel} per channel")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "custom_config.json"
    path.write_text(json.dumps(CUSTOM_PROFILE, indent=2))
    cfg = load_config(path)                                      # an unknown key fails here, naming its path
    act_bw, param_bw = cfg.default_bitwidths()
    sim = pq.QuantSim(model, calib[:1], config=str(path))      # no bit widths given: the config's W8A16
    sim.compute_encodings(calib)
    adds = [n for n in sim.activation_quantizers if sim.op_type(n) == "Add"]
    sym = all(sim.quantizer(n).symmetric for n in adds)
    print(f"custom: {len(sim.quantizers)} quantizers, W{param_bw}A{act_bw} default bit widths: "
          f"{sim.param_bw}/{sim.output_bw}, Add outputs symmetric: {sym}")


if __name__ == "__main__":
    main()
