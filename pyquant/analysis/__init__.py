"""Where quantization hurts a model, and whether a technique would help, as plain data
(dicts of lists and numbers, JSON-serialisable); pyquant.viz draws them.

    from pyquant.analysis import analyze, save_json
    result = analyze(model, dummy_input, data)           # everything below, in one call
    save_json(result, "analysis.json")

Each piece alone: weight_ranges / cle_weight_ranges (per-channel weight ranges before and after CLE),
layer_sqnr (each layer's output vs FP32, weights-only and activations-only simulation),
layer_sensitivity (metric with one layer quantized / one left in FP32 at a time, ranked) and
activation_histograms (with the encodings' ranges), each on a calibrated QuantSim where it needs one."""
from .analyze import SCHEMA, analyze, load_json, save_json
from .histograms import activation_histograms
from .layer_error import layer_sqnr
from .layers import Layer, layers
from .sensitivity import METRICS, layer_sensitivity
from .weight_ranges import cle_weight_ranges, weight_ranges

__all__ = ["analyze", "save_json", "load_json", "SCHEMA", "weight_ranges", "cle_weight_ranges", "layer_sqnr",
           "layer_sensitivity", "METRICS", "activation_histograms", "layers", "Layer"]
