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

import dataclasses
import json
import math
import os
import re
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

from .._io import atomic_write_text
from .._version import __version__

from ..quant.encoding import Encoding, from_scale_offset

__all__ = ["VERSIONS", "EncodingsError", "EncodingsWarning", "EncodingsFile", "write_encodings", "load_encodings",
           "read_encodings", "parse_encodings", "encodings_to_json"]

VERSIONS = ("0.6.1", "1.0.0", "2.0.0")
PathLike = Union[str, os.PathLike]


class EncodingsError(ValueError):
    """An encoding that cannot be written, or a file entry that cannot be read; the message names it."""


class EncodingsWarning(UserWarning):
    """File entries that were skipped (e.g. int32 bias encodings, which pyquant does not simulate)."""


@dataclasses.dataclass
class EncodingsFile:
    """Everything :func:`read_encodings` found in a file."""

    version: str
    activation: dict[str, Encoding]
    params: dict[str, Encoding]
    quantizer_args: Optional[dict] = None
    excluded_layers: list = dataclasses.field(default_factory=list)
    producer: Optional[dict] = None
    float_tensors: dict[str, int] = dataclasses.field(default_factory=dict)
    """Tensors kept in floating point (``"dtype": "FLOAT"`` entries): name -> bitwidth."""
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    """Integer entries pyquant cannot represent (wider than 16 bits, e.g. int32 bias): name -> reason."""


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
    _atomic_write_text(path, text)


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

    producer = {"package": "pyquant", "version": _pyquant_version()}
    try:
        if version == "2.0.0":
            clash = sorted(set(activation) & set(params))
            if clash:
                raise EncodingsError(f"2.0.0 keeps activations and parameters in one list; these names are in "
                                     f"both: {clash[:8]}")
            entries = [{"name": n, **_entry_2_0_0(e, n, is_param)} for _, table, is_param in tables
                       for n, e in table.items()]
            return json.dumps({"producer": producer, "version": version, "encodings": entries}, indent=2,
                              allow_nan=False)
        if version == "1.0.0":
            data: dict[str, Any] = {
                "activation_encodings": [{"name": n, **_entry_1_0_0(e, n)} for n, e in activation.items()],
                "param_encodings": [{"name": n, **_entry_1_0_0(e, n)} for n, e in params.items()],
            }
        else:
            data = {"activation_encodings": {n: _entry_0_6_1(e, n) for n, e in activation.items()},
                    "param_encodings": {n: _entry_0_6_1(e, n) for n, e in params.items()}}
        data.update({"excluded_layers": excluded, "producer": producer, "version": version})
        if quantizer_args:
            data["quantizer_args"] = dict(quantizer_args)
        return json.dumps(data, sort_keys=True, indent=4, allow_nan=False)
    except (TypeError, ValueError) as e:
        if isinstance(e, EncodingsError):
            raise
        raise EncodingsError(f"cannot write the encodings as JSON: {e}") from e


def _pyquant_version() -> str:
    return __version__


def _layout(enc: Encoding, name: str) -> tuple[str, Optional[int], Optional[int], Optional[int]]:
    """(enc_type, channel axis, block axis, block length) of an encoding, from its scale shape and
    block_size."""
    shape = tuple(enc.scale.shape)
    if enc.scale.numel() == 1:
        return "PER_TENSOR", None, None, None
    wide = [d for d, k in enumerate(shape) if k > 1]
    if enc.block_size is not None:
        bs = [int(b) for b in enc.block_size]
        if len(bs) > len(shape):
            raise EncodingsError(f"{name}: block_size {tuple(bs)} has more entries than the scale has "
                                 f"dimensions {shape}")
        # Right-align against the scale shape (leading dims: one block per element, or whole dim).
        bs = [1 if shape[d] > 1 else -1 for d in range(len(shape) - len(bs))] + bs
        block_axes = [d for d in wide if bs[d] > 1]
        if len(block_axes) > 1:
            raise EncodingsError(f"{name}: blocks along several axes {block_axes} (scale shape {shape}, "
                                 f"block_size {tuple(bs)}); the encodings formats hold blocks along one axis")
        if block_axes:
            ba = block_axes[0]
            channel = [d for d in wide if d != ba]
            if len(channel) > 1:
                raise EncodingsError(f"{name}: per-block encoding with several channel axes (scale shape {shape})")
            return "PER_BLOCK", (channel[0] if channel else None), ba, bs[ba]
    if len(wide) == 1:  # per channel (also a per-block encoding with a single block along its block axis)
        return "PER_CHANNEL", wide[0], None, None
    raise EncodingsError(f"{name}: scale shape {shape} varies along several axes {wide} but the encoding has no "
                         f"block_size; per-block encodings need it")


def _checked(enc: Encoding, name: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(scale float32, offset float32 in scale's shape, qmin, qmax) after checking the encoding."""
    if not isinstance(enc, Encoding):
        raise EncodingsError(f"{name}: expected a pyquant.quant.Encoding, got {type(enc).__name__}")
    bw = enc.bitwidth
    if isinstance(bw, bool) or not isinstance(bw, int) or not 2 <= bw <= 16:
        raise EncodingsError(f"{name}: bitwidth must be an int in 2..16, got {bw!r}")
    scale = enc.scale.detach().to("cpu", torch.float32)
    offset = enc.offset.detach().to("cpu", torch.float32)
    if scale.numel() == 0:
        raise EncodingsError(f"{name}: empty scale")
    if offset.shape != scale.shape:
        if offset.numel() == 1 or offset.numel() == scale.numel():
            offset = offset.reshape(-1).expand(scale.numel()).reshape(scale.shape) if offset.numel() == 1 \
                else offset.reshape(scale.shape)
        else:
            raise EncodingsError(f"{name}: offset shape {tuple(offset.shape)} does not match scale shape "
                                 f"{tuple(scale.shape)}")
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise EncodingsError(f"{name}: scale must be positive and finite, got {float(scale.reshape(-1)[i])!r} "
                             f"at index {i}")
    if not bool(torch.all(offset == torch.round(offset))):
        raise EncodingsError(f"{name}: offsets must be integers")
    qmin, qmax = enc.qmin, enc.qmax
    if enc.symmetric:
        if bool((offset != 0).any()):
            raise EncodingsError(f"{name}: a symmetric encoding must have offset 0")
    elif bool(((offset < -qmax) | (offset > -qmin)).any()):
        raise EncodingsError(f"{name}: asymmetric offsets must lie in [{-qmax}, {-qmin}]")
    return scale, offset, qmin, qmax


def _floats(t: torch.Tensor) -> list:
    return t.reshape(-1).tolist()  # float32 -> exact doubles; json writes their shortest repr


def _ints(t: torch.Tensor) -> list:
    return [int(v) for v in t.reshape(-1).tolist()]


def _entry_1_0_0(enc: Encoding, name: str) -> dict[str, Any]:
    scale, offset, qmin, _ = _checked(enc, name)
    kind, _, _, block = _layout(enc, name)
    d: dict[str, Any] = {"dtype": "INT", "bw": enc.bitwidth, "is_sym": bool(enc.symmetric), "enc_type": kind,
                         "scale": _floats(scale), "offset": _ints(offset + qmin)}
    if kind == "PER_BLOCK":
        d["block_size"] = block
    return d


def _entry_0_6_1(enc: Encoding, name: str) -> list[dict[str, Any]]:
    scale, offset, qmin, qmax = _checked(enc, name)
    kind, _, _, _ = _layout(enc, name)
    if kind == "PER_BLOCK":
        raise EncodingsError(f"{name}: version 0.6.1 has no per-block encodings; write 1.0.0 or 2.0.0")
    fmax = torch.finfo(torch.float32).max  # min/max are informational here; keep them finite
    lo = ((qmin + offset) * scale).clamp(-fmax, fmax)
    hi = ((qmax + offset) * scale).clamp(-fmax, fmax)
    sym = "True" if enc.symmetric else "False"
    return [{"bitwidth": enc.bitwidth, "dtype": "int", "is_symmetric": sym, "max": mx, "min": mn, "offset": o,
             "scale": s} for s, o, mn, mx in zip(_floats(scale), _ints(offset + qmin), _floats(lo), _floats(hi))]


def _entry_2_0_0(enc: Encoding, name: str, is_param: bool) -> dict[str, Any]:
    scale, offset, _, _ = _checked(enc, name)
    kind, channel_axis, block_axis, block = _layout(enc, name)
    zp = (-offset).to(torch.int64) if not enc.symmetric else torch.zeros(scale.shape, dtype=torch.int64)
    d: dict[str, Any] = {"output_dtype": f"{'' if enc.symmetric else 'u'}int{enc.bitwidth}"}
    if kind == "PER_TENSOR":
        d["y_scale"] = float(scale.reshape(-1)[0])
        zp_value: Any = int(zp.reshape(-1)[0])
    elif kind == "PER_CHANNEL":
        d["y_scale"] = _floats(scale)
        zp_value = zp.reshape(-1).tolist()
    else:
        d["y_scale"] = scale.tolist()
        zp_value = zp.tolist()
    if bool((zp != 0).any()):
        d["y_zero_point"] = zp_value
    axis = block_axis if kind == "PER_BLOCK" else channel_axis
    if axis is not None:
        d["axis"] = axis if is_param else axis - scale.dim()
    if kind == "PER_BLOCK":
        d["block_size"] = block
    return d


def _atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_text(path, text)


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


def read_encodings(path: PathLike, *, shapes: Optional[Mapping[str, Sequence[int]]] = None,
                   param_names: Optional[Iterable[str]] = None) -> EncodingsFile:
    """Like :func:`load_encodings`, with everything else the file holds (quantizer_args, excluded layers,
    producer, float tensors, skipped entries)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise EncodingsError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    return parse_encodings(data, shapes=shapes, param_names=param_names, source=path)


def parse_encodings(data: Mapping[str, Any], *, shapes: Optional[Mapping[str, Sequence[int]]] = None,
                    param_names: Optional[Iterable[str]] = None, source: str = "encodings") -> EncodingsFile:
    """:func:`read_encodings` of an already parsed JSON document."""
    if not isinstance(data, Mapping):
        raise EncodingsError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}")
    version = data.get("version")
    if version is None:
        if "encodings" in data:
            version = "2.0.0"
        elif isinstance(data.get("activation_encodings", data.get("param_encodings")), list):
            version = "1.0.0"
        elif isinstance(data.get("activation_encodings", data.get("param_encodings")), Mapping):
            version = "0.6.1"
        else:
            raise EncodingsError(f"{source}: not an encodings file (no 'version', 'encodings', "
                                 f"'activation_encodings' or 'param_encodings')")
    if version not in VERSIONS:
        raise EncodingsError(f"{source}: version {version!r} is not supported; pyquant reads {', '.join(VERSIONS)}")
    reader = _Reader(source, dict(shapes or {}))
    out = EncodingsFile(version=version, activation={}, params={}, producer=data.get("producer"))
    if version == "2.0.0":
        entries = data.get("encodings")
        if not isinstance(entries, list):
            raise EncodingsError(f"{source}: 'encodings' must be a list")
        pnames = set(param_names or ())
        for i, e in enumerate(entries):
            name, enc = reader.entry_2_0_0(e, f"encodings[{i}]", out)
            if enc is not None:
                table = out.params if name in pnames else out.activation
                if name in table:
                    raise EncodingsError(f"{source}: encodings[{i}]: duplicate name {name!r}")
                table[name] = enc
    else:
        for key, table in (("activation_encodings", out.activation), ("param_encodings", out.params)):
            section = data.get(key, [] if version == "1.0.0" else {})
            if version == "1.0.0":
                if not isinstance(section, list):
                    raise EncodingsError(f"{source}: {key} must be a list in version 1.0.0")
                for i, e in enumerate(section):
                    name, enc = reader.entry_1_0_0(e, f"{key}[{i}]", out)
                    if enc is not None:
                        if name in table:
                            raise EncodingsError(f"{source}: {key}[{i}]: duplicate name {name!r}")
                        table[name] = enc
            else:
                if not isinstance(section, Mapping):
                    raise EncodingsError(f"{source}: {key} must be an object in version 0.6.1")
                for name, e in section.items():
                    enc = reader.entry_0_6_1(name, e, f"{key}.{name}", out)
                    if enc is not None:
                        table[name] = enc
        qa = data.get("quantizer_args")
        out.quantizer_args = dict(qa) if isinstance(qa, Mapping) else None
        out.excluded_layers = list(data.get("excluded_layers") or [])
    return out


_DTYPE_2_0_0 = re.compile(r"^(u?)int(\d+)$")


class _Reader:
    def __init__(self, source: str, shapes: dict[str, Sequence[int]]):
        self.source = source
        self.shapes = shapes

    def fail(self, where: str, msg: str) -> EncodingsError:
        return EncodingsError(f"{self.source}: {where}: {msg}")

    # ---- field helpers ----
    def _name(self, e: Any, where: str) -> str:
        if not isinstance(e, Mapping):
            raise self.fail(where, f"expected an object, got {type(e).__name__}")
        name = e.get("name")
        if not isinstance(name, str) or not name:
            raise self.fail(where, "missing or empty 'name'")
        return name

    def _int(self, v: Any, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
            raise self.fail(where, f"expected an integer, got {v!r}")
        return int(v)

    def _tensor(self, v: Any, where: str, *, integer: bool = False) -> torch.Tensor:
        def walk(x):
            if isinstance(x, list):
                for y in x:
                    walk(y)
            elif isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise self.fail(where, f"expected numbers, got {x!r}")
            elif integer and not float(x).is_integer():
                raise self.fail(where, f"expected integers, got {x!r} (fractional zero points are not supported)")
        walk(v)
        try:
            t = torch.tensor(v, dtype=torch.float64 if integer else torch.float32)
        except (ValueError, TypeError) as e:
            raise self.fail(where, f"not a rectangular array: {e}") from None
        if t.numel() == 0:
            raise self.fail(where, "empty")
        return t.to(torch.float32)

    # ---- building ----
    def _encoding(self, name: str, where: str, scale: torch.Tensor, offset: torch.Tensor, bw: int, sym: bool,
                  kind: str, axis: Optional[int], block: Optional[int]) -> Encoding:
        """scale/offset in the file's shape (flat, or nested for 2.0.0 per-block), pyquant's offset."""
        if not bool(torch.all(scale > 0)):
            raise self.fail(where, "scales must be positive")
        qmax = 2 ** bw - 1 if not sym else 2 ** (bw - 1) - 1
        qmin = 0 if not sym else -(2 ** (bw - 1))
        if bool(((offset < -qmax) | (offset > -qmin)).any()):
            raise self.fail(where, f"offset out of range for a {bw}-bit {'signed' if sym else 'unsigned'} grid")
        shape = tuple(scale.shape)
        if kind == "PER_TENSOR":
            if scale.numel() != 1:
                raise self.fail(where, f"a per-tensor encoding needs 1 scale, got {scale.numel()}")
            shape = ()
        elif kind == "PER_CHANNEL":
            shape = (scale.numel(),) + ((1,) * (-axis - 1) if axis is not None and axis < 0 else ())
        hint = self.shapes.get(name)
        if hint is not None:
            hint = tuple(int(k) for k in hint)
            if math.prod(hint) != scale.numel():
                raise self.fail(where, f"shapes[{name!r}] = {hint} holds {math.prod(hint)} values, the file has "
                                       f"{scale.numel()}")
            shape = hint
        scale, offset = scale.reshape(shape).contiguous(), offset.reshape(shape).contiguous()
        block_size = None
        if kind == "PER_BLOCK":
            nd = len(shape)
            if axis is None:  # 1.0.0: the block axis is not recorded; AIMET blocks the last varying axis
                wide = [d for d, k in enumerate(shape) if k > 1]
                ax = wide[-1] if wide else nd - 1
            else:
                ax = axis + nd if axis < 0 else axis
            if not 0 <= ax < nd:
                raise self.fail(where, f"axis {axis} out of range for scale shape {shape}")
            block_size = tuple(block if d == ax else (1 if shape[d] > 1 else -1) for d in range(nd))
        return from_scale_offset(scale, offset, bw, sym, block_size)

    def _offset_from_file(self, where: str, off: torch.Tensor, bw: int, sym: bool) -> tuple[torch.Tensor, bool]:
        """File offset (unsigned-grid convention) -> (pyquant offset, symmetric)."""
        if sym:
            o = off + 2 ** (bw - 1)
            if bool(torch.all(o == 0)):
                return o * 0.0, True  # no -0.0
            if bool(torch.all(off == 0)):
                # "unsigned symmetric": the unsigned grid with offset 0, an asymmetric encoding here.
                return off * 0.0, False
            raise self.fail(where, f"symmetric entry with offsets other than {-(2 ** (bw - 1))}")
        return off + 0.0, False

    # ---- 1.0.0 ----
    def entry_1_0_0(self, e: Any, where: str, out: EncodingsFile) -> tuple[str, Optional[Encoding]]:
        name = self._name(e, where)
        where = f"{where} ({name!r})"
        dtype = e.get("dtype", "INT")
        bw = self._int(e.get("bw"), f"{where}.bw")
        if not isinstance(dtype, str) or dtype.upper() not in ("INT", "FLOAT"):
            raise self.fail(where, f"dtype must be 'INT' or 'FLOAT', got {dtype!r}")
        if dtype.upper() == "FLOAT":
            out.float_tensors[name] = bw
            return name, None
        kind = e.get("enc_type", "PER_TENSOR")
        if kind not in ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK"):
            raise self.fail(where, f"enc_type {kind!r} is not supported (PER_TENSOR, PER_CHANNEL, PER_BLOCK)")
        if not 2 <= bw <= 16:
            out.skipped[name] = f"{bw}-bit"
            return name, None
        sym = e.get("is_sym")
        if not isinstance(sym, bool):
            raise self.fail(where, f"is_sym must be true or false, got {sym!r}")
        if "scale" not in e or "offset" not in e:
            raise self.fail(where, "needs 'scale' and 'offset'")
        scale = self._tensor(e["scale"], f"{where}.scale").reshape(-1)
        off = self._tensor(e["offset"], f"{where}.offset", integer=True).reshape(-1)
        if off.numel() != scale.numel():
            raise self.fail(where, f"{scale.numel()} scales but {off.numel()} offsets")
        zps = e.get("zero_point_shift")
        if zps is not None and any(v != 0 for v in (zps if isinstance(zps, list) else [zps])):
            raise self.fail(where, "zero_point_shift is not supported")
        block = None
        if kind == "PER_BLOCK":
            block = self._int(e.get("block_size"), f"{where}.block_size")
            if block < 1:
                raise self.fail(where, f"block_size must be >= 1, got {block}")
        offset, sym = self._offset_from_file(where, off, bw, sym)
        return name, self._encoding(name, where, scale, offset, bw, sym, kind, None, block)

    # ---- 2.0.0 ----
    def entry_2_0_0(self, e: Any, where: str, out: EncodingsFile) -> tuple[str, Optional[Encoding]]:
        name = self._name(e, where)
        where = f"{where} ({name!r})"
        dtype = e.get("output_dtype")
        if not isinstance(dtype, str):
            raise self.fail(where, "missing output_dtype")
        m = _DTYPE_2_0_0.match(dtype)
        if m is None:
            fm = re.match(r"^b?float(\d+)$", dtype)
            if fm:
                out.float_tensors[name] = int(fm.group(1))
                return name, None
            raise self.fail(where, f"output_dtype {dtype!r} is not supported (intN, uintN, floatN)")
        signed, bw = not m.group(1), int(m.group(2))
        if "per_block_int_scale" in e:
            raise self.fail(where, "LPBQ encodings (per_block_int_scale) are not supported")
        if not 2 <= bw <= 16:
            out.skipped[name] = dtype
            return name, None
        if "y_scale" not in e:
            raise self.fail(where, "missing y_scale")
        scale = self._tensor(e["y_scale"], f"{where}.y_scale")
        if "y_zero_point" in e:
            zp = self._tensor(e["y_zero_point"], f"{where}.y_zero_point", integer=True)
            if zp.numel() == 1 and scale.numel() > 1:
                zp = zp.reshape(-1).expand(scale.numel()).reshape(scale.shape)
            if zp.numel() != scale.numel():
                raise self.fail(where, f"{scale.numel()} scales but {zp.numel()} zero points")
            zp = zp.reshape(scale.shape)
        else:
            zp = torch.zeros_like(scale)
        axis = self._int(e["axis"], f"{where}.axis") if e.get("axis") is not None else None
        block = self._int(e["block_size"], f"{where}.block_size") if e.get("block_size") is not None else None
        if block is not None:
            if axis is None:
                raise self.fail(where, "block_size without axis")
            if block < 1:
                raise self.fail(where, f"block_size must be >= 1, got {block}")
            kind = "PER_BLOCK"
        elif axis is not None:
            kind = "PER_CHANNEL"
            scale, zp = scale.reshape(-1), zp.reshape(-1)
        else:
            kind = "PER_TENSOR"
        if signed and bool(torch.all(zp == 0)):
            offset, sym = torch.zeros_like(scale), True
        else:  # an asymmetric encoding; pyquant's offset lives on the unsigned grid
            offset, sym = -zp - (2 ** (bw - 1) if signed else 0) + 0.0, False
        return name, self._encoding(name, where, scale, offset, bw, sym, kind, axis, block)

    # ---- 0.6.1 ----
    def entry_0_6_1(self, name: Any, e: Any, where: str, out: EncodingsFile) -> Optional[Encoding]:
        if not isinstance(name, str) or not name:
            raise self.fail(where, "tensor names must be non-empty strings")
        if isinstance(e, Mapping) and ("input" in e or "output" in e) and "bitwidth" not in e:
            raise self.fail(where, "this is the module-keyed layout of AIMET's '<prefix>_torch.encodings'; "
                                   "pyquant reads the tensor-keyed '<prefix>.encodings'")
        chans = [e] if isinstance(e, Mapping) else e
        if not isinstance(chans, list) or not chans:
            raise self.fail(where, "expected a non-empty list of encodings")
        first = chans[0]
        if not isinstance(first, Mapping):
            raise self.fail(where, f"expected objects, got {type(first).__name__}")
        bw = self._int(first.get("bitwidth"), f"{where}.bitwidth")
        dtype = first.get("dtype", "int")
        if dtype == "float":
            out.float_tensors[name] = bw
            return None
        if dtype != "int":
            raise self.fail(where, f"dtype must be 'int' or 'float', got {dtype!r}")
        if not 2 <= bw <= 16:
            out.skipped[name] = f"{bw}-bit"
            return None
        sym_s = first.get("is_symmetric")
        if sym_s not in ("True", "False"):
            raise self.fail(where, f"is_symmetric must be 'True' or 'False', got {sym_s!r}")
        scales, offsets = [], []
        for i, c in enumerate(chans):
            if not isinstance(c, Mapping):
                raise self.fail(f"{where}[{i}]", "expected an object")
            if (c.get("bitwidth"), c.get("dtype", "int"), c.get("is_symmetric")) != (bw, dtype, sym_s):
                raise self.fail(f"{where}[{i}]", "channels disagree on bitwidth, dtype or is_symmetric")
            if "scale" not in c or "offset" not in c:
                raise self.fail(f"{where}[{i}]", "needs 'scale' and 'offset'")
            scales.append(c["scale"])
            offsets.append(c["offset"])
            zps = c.get("zero_point_shift")
            if zps:
                raise self.fail(f"{where}[{i}]", "zero_point_shift is not supported")
        scale = self._tensor(scales, f"{where}.scale")
        off = self._tensor(offsets, f"{where}.offset", integer=True)
        offset, sym = self._offset_from_file(where, off, bw, sym_s == "True")
        kind = "PER_TENSOR" if len(chans) == 1 else "PER_CHANNEL"
        return self._encoding(name, where, scale, offset, bw, sym, kind, None, None)
