"""Simulation of whole models: QuantSim, the hardware config, encodings files and ONNX QDQ export."""
