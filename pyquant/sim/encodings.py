"""Encodings files: the scale/offset of every quantized tensor as JSON, in the formats AIMET writes.

Versions (``version`` argument of :func:`write_encodings`; :func:`load_encodings` detects it):

``1.0.0`` (default). ``{"activation_encodings": [...], "param_encodings": [...], "excluded_layers": [...],
"producer": {...}, "quantizer_args": {...}, "version": "1.0.0"}``, keys sorted, indent 4. One entry per
tensor::

    {"name": "conv1.weight", "dtype": "INT", "bw": 8, "is_sym": true, "enc_type": "PER_CHANNEL",
     "scale": [...], "offset": [...]}            (+ "block_size": B for "PER_BLOCK")

``scale``/``offset`` are flat lists in row-major order of the encoding's shape (length 1 per tensor). The
file's offset describes an unsigned grid, ``real = scale * (q + offset)`` with ``q`` in ``[0, 2^bw - 1]``:
it is pyquant's offset plus ``qmin``, i.e. ``offset - 2^(bw-1)`` for symmetric (signed) encodings
(-128 at 8 bits) and pyquant's offset unchanged for asymmetric ones.

``2.0.0`` (ONNX QuantizeLinear convention). ``{"producer": {...}, "version": "2.0.0", "encodings": [...]}``,
indent 2, one list for activations and parameters alike::

    {"name": ..., "output_dtype": "int8" | "uint8" | "int4" | "uint16" | ..., "y_scale": ...,
     "y_zero_point": ..., "axis": a, "block_size": B}

``output_dtype`` is signed for symmetric encodings and unsigned for asymmetric ones. ``y_zero_point =
-offset`` (ONNX's zero point on that grid) and is left out when it is all zeros (always for symmetric).
Per tensor ``y_scale``/``y_zero_point`` are numbers; per channel they are flat lists and ``axis`` is the
channel axis; per block they are nested lists in the encoding's full shape, ``axis`` is the block axis and
``block_size`` the block length. As AIMET does, parameters get a non-negative axis and activations a
negative one (counted from the last dimension). 2.0.0 has no ``quantizer_args`` / ``excluded_layers``
(they are not written) and does not say which entries are parameters: pass ``param_names`` to
:func:`load_encodings` to split them back (otherwise every entry is returned as an activation).

``0.6.1`` (legacy, read and write). ``activation_encodings`` / ``param_encodings`` map tensor names to a
list of per-channel dicts ``{"bitwidth", "dtype": "int", "is_symmetric": "True"|"False", "scale", "offset",
"min", "max"}`` (offset as in 1.0.0). No per-block encodings.

Floats are written with Python's shortest repr of the float32 value, so every scale reads back bit for
bit. Files only hold scale and offset; the loader rebuilds min/max with
:func:`pyquant.quant.from_scale_offset`. The files do not record the rank of the quantized tensor, so a
per-channel encoding comes back flat, ``(C,)`` (shape ``(C, 1, ..., 1)`` when a 2.0.0 file gives a negative
axis); give ``shapes={name: scale_shape}`` to get the exact shape back, or reshape to the quantizer's shape.
A loaded per-block encoding has ``block_size`` with the block length on its block axis, 1 on its channel
axis and -1 (whole dimension) where the scale has size 1. 1.0.0 does not record the block axis: pyquant
writes the scales channel-major (the scale's row-major order, as aimet-torch does for Conv/Linear weights)
and reads the last axis of size > 1 of the shape as the block axis.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence

from .._io import atomic_write_text
from .._version import __version__
from ..quant.encoding import Encoding
from .encodings_reader import parse_encodings, read_encodings
from .encodings_types import VERSIONS, EncodingsError, EncodingsFile, EncodingsWarning, PathLike
from .encodings_writer import entry_0_6_1, entry_1_0_0, entry_2_0_0

__all__ = ["VERSIONS", "EncodingsError", "EncodingsWarning", "EncodingsFile", "write_encodings", "load_encodings",
           "read_encodings", "parse_encodings", "encodings_to_json"]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def write_encodings(path: PathLike, activation: Mapping[str, Encoding], params: Mapping[str, Encoding], *,
                    version: str = "1.0.0", quantizer_args: Optional[Mapping[str, Any]] = None,
                    excluded_layers: Iterable[str] = ()) -> None:
    """Writes an encodings file atomically: the text is built (and checked) first, then written to a
    temporary file in the same folder and moved over ``path``; on any error ``path`` keeps its old
    content and no temporary file is left behind.

    Raises :class:`EncodingsError` for an encoding the format cannot hold (a non-positive or non-finite
    scale, a non-integer offset, a per-block encoding without ``block_size``, blocks along two axes, ...).
    """
    text = encodings_to_json(activation, params, version=version, quantizer_args=quantizer_args,
                             excluded_layers=excluded_layers)
    atomic_write_text(path, text)


def encodings_to_json(activation: Mapping[str, Encoding], params: Mapping[str, Encoding], *,
                      version: str = "1.0.0", quantizer_args: Optional[Mapping[str, Any]] = None,
                      excluded_layers: Iterable[str] = ()) -> str:
    """The text :func:`write_encodings` writes."""
    if version not in VERSIONS:
        raise EncodingsError(f"version must be one of {', '.join(VERSIONS)}, got {version!r}")
    excluded = list(excluded_layers)
    for i, layer in enumerate(excluded):
        if not isinstance(layer, str):
            raise EncodingsError(f"excluded_layers[{i}] must be a string, got {type(layer).__name__}")
    if quantizer_args is not None and not isinstance(quantizer_args, Mapping):
        raise EncodingsError(f"quantizer_args must be a dict, got {type(quantizer_args).__name__}")
    tables = (("activation", activation, False), ("params", params, True))
    for what, table, _ in tables:
        if not isinstance(table, Mapping):
            raise EncodingsError(f"{what} must be a dict of name -> Encoding, got {type(table).__name__}")
        for name in table:
            if not isinstance(name, str) or not name:
                raise EncodingsError(f"{what}: tensor names must be non-empty strings, got {name!r}")

    producer = {"package": "pyquant", "version": __version__}
    try:
        if version == "2.0.0":
            clash = sorted(set(activation) & set(params))
            if clash:
                raise EncodingsError(f"2.0.0 keeps activations and parameters in one list; these names are in "
                                     f"both: {clash[:8]}")
            entries = [{"name": n, **entry_2_0_0(e, n, is_param)} for _, table, is_param in tables
                       for n, e in table.items()]
            return json.dumps({"producer": producer, "version": version, "encodings": entries}, indent=2,
                              allow_nan=False)
        if version == "1.0.0":
            data: dict[str, Any] = {
                "activation_encodings": [{"name": n, **entry_1_0_0(e, n)} for n, e in activation.items()],
                "param_encodings": [{"name": n, **entry_1_0_0(e, n)} for n, e in params.items()],
            }
        else:
            data = {"activation_encodings": {n: entry_0_6_1(e, n) for n, e in activation.items()},
                    "param_encodings": {n: entry_0_6_1(e, n) for n, e in params.items()}}
        data.update({"excluded_layers": excluded, "producer": producer, "version": version})
        if quantizer_args:
            data["quantizer_args"] = dict(quantizer_args)
        return json.dumps(data, sort_keys=True, indent=4, allow_nan=False)
    except (TypeError, ValueError) as e:
        if isinstance(e, EncodingsError):
            raise
        raise EncodingsError(f"cannot write the encodings as JSON: {e}") from e


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def load_encodings(path: PathLike, *, shapes: Optional[Mapping[str, Sequence[int]]] = None,
                   param_names: Optional[Iterable[str]] = None) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
    """``(activation encodings, param encodings)`` from a file of version 1.0.0, 2.0.0 or 0.6.1 (the
    tensor-keyed layout of ``<prefix>.encodings``).

    ``shapes`` maps tensor names to the scale shape to give their encoding (the flat values are reshaped;
    see the module docstring). ``param_names``: for 2.0.0 files, which entries are parameters (the format
    does not say; without it all entries are returned as activations). Entries kept in floating point are
    left out, as are integer entries wider than 16 bits (with an :class:`EncodingsWarning`); use
    :func:`read_encodings` to see them.
    """
    f = read_encodings(path, shapes=shapes, param_names=param_names)
    if f.skipped:
        names = ", ".join(f"{n} ({r})" for n, r in list(f.skipped.items())[:6])
        warnings.warn(f"{os.fspath(path)}: skipped {len(f.skipped)} encodings pyquant cannot represent: {names}",
                      EncodingsWarning, stacklevel=2)
    return f.activation, f.params
