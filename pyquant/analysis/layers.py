"""Which quantizers of a QuantSim belong to which layer (pyquant.sim.layers), under the name the analysis
functions have always imported it by."""
from ..sim.layers import Layer, QuantizerState, layers, quantizer_nodes

__all__ = ["Layer", "QuantizerState", "layers", "quantizer_nodes"]
