"""Calibration and quantizers: encodings, analyzers (statistics → encodings) and quantizer modules."""
from .analyzers import (CalibrationError, EncodingAnalyzer, Entropy, MinMax, Mse, Percentile, Sqnr, TfEnhanced,
                        sqnr_candidates)
from .encoding import Encoding, from_range, from_scale_offset, min_scale
from .lpbq import LpbqEncoding, LpbqQuantizeDequantize, lpbq_encoding, lpbq_scales
from .least_error import (CLIP_FACTORS, clipped_encodings, least_error, least_error_encoding,
                          round_to_nearest_encodings)
from .quantizer import Dequantize, Quantize, QuantizeDequantize, QuantizerBase, QuantizerError
from .range_params import RANGE_PARAMS, MinMaxRange, RangeParams, ScaleOffsetRange

__all__ = ["Encoding", "from_range", "from_scale_offset", "min_scale", "EncodingAnalyzer", "MinMax", "Sqnr",
           "TfEnhanced", "Mse", "Percentile", "Entropy", "CalibrationError", "sqnr_candidates",
           "QuantizeDequantize", "Quantize", "Dequantize", "QuantizerBase", "QuantizerError", "RangeParams",
           "MinMaxRange", "ScaleOffsetRange", "RANGE_PARAMS", "least_error", "least_error_encoding",
           "round_to_nearest_encodings", "clipped_encodings", "CLIP_FACTORS", "LpbqEncoding",
           "LpbqQuantizeDequantize", "lpbq_encoding",
           "lpbq_scales"]
