"""Encodings from a file of any version pyquant reads (pyquant.sim.encodings describes the formats):
the version is detected, every entry checked (errors name the file and the entry) and turned back into
a pyquant Encoding."""
from __future__ import annotations

import math
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from .._io import read_json
from ..quant.encoding import Encoding, from_scale_offset
from ..quant.lpbq import lpbq_encoding
from .encodings_types import VERSIONS, EncodingsError, EncodingsFile, PathLike

__all__ = ["read_encodings", "parse_encodings"]


def read_encodings(path: PathLike, *, shapes: Optional[Mapping[str, Sequence[int]]] = None,
                   param_names: Optional[Iterable[str]] = None) -> EncodingsFile:
    """Like :func:`pyquant.sim.encodings.load_encodings`, with everything else the file holds
    (quantizer_args, excluded layers, producer, float tensors, skipped entries)."""
    path = os.fspath(path)
    data = read_json(path, EncodingsError)
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
    reader = _Reader(source, _check_shapes(shapes))
    producer = data.get("producer")
    if producer is not None and not isinstance(producer, Mapping):
        raise EncodingsError(f"{source}: producer must be an object, got {type(producer).__name__}")
    out = EncodingsFile(version=version, activation={}, params={}, producer=producer)
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
        if qa is not None and not isinstance(qa, Mapping):
            raise EncodingsError(f"{source}: quantizer_args must be an object, got {type(qa).__name__}")
        out.quantizer_args = dict(qa) if qa is not None else None
        excluded = data.get("excluded_layers")
        excluded = [] if excluded is None else excluded
        if not isinstance(excluded, list) or not all(isinstance(n, str) for n in excluded):
            raise EncodingsError(f"{source}: excluded_layers must be a list of layer names")
        out.excluded_layers = list(excluded)
    return out


def _check_shapes(shapes: Optional[Mapping[str, Sequence[int]]]) -> dict[str, tuple[int, ...]]:
    """The `shapes` argument: tensor name -> scale shape (non-negative integers)."""
    if shapes is None:
        return {}
    if not isinstance(shapes, Mapping):
        raise TypeError(f"shapes must be a dict of tensor name -> scale shape, got {type(shapes).__name__}")
    out = {}
    for name, shape in shapes.items():
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in shape):
            raise ValueError(f"shapes[{name!r}] must be a sequence of non-negative integers, got {shape!r}")
        out[name] = tuple(shape)
    return out


_DTYPE_2_0_0 = re.compile(r"^(u?)int(\d{1,3})$")  # at most 3 digits: int() of a 5000-digit one would raise


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
        if isinstance(v, bool) or not isinstance(v, (int, float)) or isinstance(v, float) and not v.is_integer():
            raise self.fail(where, f"expected an integer, got {v!r}")
        return int(v)

    def _tensor(self, v: Any, where: str, *, integer: bool = False) -> torch.Tensor:
        def walk(x):
            if isinstance(x, list):
                for y in x:
                    walk(y)
            elif isinstance(x, bool) or not isinstance(x, (int, float)):
                raise self.fail(where, f"expected numbers, got {x!r}")
            elif isinstance(x, int) and abs(x) > 2 ** 64 or isinstance(x, float) and not math.isfinite(x):
                raise self.fail(where, f"expected finite numbers, got {x!r}")
            elif integer and isinstance(x, float) and not x.is_integer():
                raise self.fail(where, f"expected integers, got {x!r} (fractional zero points are not supported)")
        walk(v)
        try:
            t = torch.tensor(v, dtype=torch.float64 if integer else torch.float32)
        except (ValueError, TypeError) as e:
            raise self.fail(where, f"not a rectangular array: {e}") from None
        if t.numel() == 0:
            raise self.fail(where, "empty")
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):  # finite in the file, beyond float32 here
            raise self.fail(where, f"values beyond float32's range ({torch.finfo(torch.float32).max:.4g})")
        return t

    # ---- building ----
    def _encoding(self, name: str, where: str, scale: torch.Tensor, offset: torch.Tensor, bw: int, sym: bool,
                  kind: str, axis: Optional[int], block: Optional[int], grid: tuple[bool, bool] = (None, False)
                  ) -> Encoding:
        """scale/offset in the file's shape (flat, or nested for 2.0.0 per-block), pyquant's offset; `grid`:
        (signed, strict) of a symmetric encoding (None: signed)."""
        if not bool(torch.all(scale > 0)):
            raise self.fail(where, "scales must be positive")
        signed, strict = grid
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
        return from_scale_offset(scale, offset, bw, sym, block_size, signed=signed if sym else None,
                                 strict=strict)

    def _offset_from_file(self, where: str, off: torch.Tensor, bw: int,
                          sym: bool) -> tuple[torch.Tensor, bool, tuple[Optional[bool], bool]]:
        """File offset (unsigned-grid convention) -> (pyquant offset, symmetric, (signed, strict)). A
        symmetric entry's offset names its grid: -2^(b-1) the signed grid, -(2^(b-1)-1) the strict signed
        grid, 0 the unsigned grid (unsigned symmetric)."""
        if sym:
            half = 2 ** (bw - 1)
            grids = {-half: (True, False), -(half - 1): (True, True), 0: (False, False)}
            for o, grid in grids.items():
                if bool(torch.all(off == o)):
                    return off * 0.0 + 0.0, True, grid  # no -0.0
            raise self.fail(where, f"symmetric entry with offsets other than {-half} (signed grid), {-(half - 1)} "
                                   f"(strict) or 0 (unsigned)")
        return off + 0.0, False, (None, False)

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
        if kind == "LPBQ":
            return name, self._lpbq_1_0_0(name, e, where, bw)
        if kind not in ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK", "LPBQ"):
            raise self.fail(where, f"enc_type {kind!r} is not supported (PER_TENSOR, PER_CHANNEL, PER_BLOCK, LPBQ)")
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
        offset, sym, grid = self._offset_from_file(where, off, bw, sym)
        return name, self._encoding(name, where, scale, offset, bw, sym, kind, None, block, grid)

    # ---- 2.0.0 ----
    def entry_2_0_0(self, e: Any, where: str, out: EncodingsFile) -> tuple[str, Optional[Encoding]]:
        name = self._name(e, where)
        where = f"{where} ({name!r})"
        dtype = e.get("output_dtype")
        if not isinstance(dtype, str):
            raise self.fail(where, "missing output_dtype")
        m = _DTYPE_2_0_0.match(dtype)
        if m is None:
            fm = re.match(r"^b?float(\d{1,3})$", dtype)
            if fm:
                out.float_tensors[name] = int(fm.group(1))
                return name, None
            raise self.fail(where, f"output_dtype {dtype[:40]!r} is not supported (intN, uintN, floatN)")
        signed, bw = not m.group(1), int(m.group(2))
        if "per_block_int_scale" in e:
            if not signed:
                raise self.fail(where, f"an LPBQ entry needs a signed output_dtype, got {dtype!r}")
            return name, self._lpbq_2_0_0(name, e, where, bw)
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

    # ---- LPBQ (both versions) ----
    def _lpbq(self, name: str, where: str, pc: torch.Tensor, ints: torch.Tensor, bw: int, dbw: int,
              axis: Optional[int], block: int) -> Encoding:
        """An LPBQ encoding from per-channel float scales and per-block integer scales, shaped by `shapes`
        (or the file's nesting); `axis` the block axis (None: the last varying one, as AIMET blocks it)."""
        if not 2 <= bw < dbw <= 16:
            raise self.fail(where, f"LPBQ needs 2 <= compressed bit width < decompressed bit width <= 16, got {bw} "
                                   f"and {dbw}")
        if block < 1:
            raise self.fail(where, f"block_size must be >= 1, got {block}")
        hint = self.shapes.get(name)
        shape = tuple(int(k) for k in hint) if hint is not None else tuple(ints.shape)
        if math.prod(shape) != ints.numel():
            given = f"shapes[{name!r}] = " if hint is not None else "the scale shape "
            raise self.fail(where, f"{ints.numel()} integer block scales do not fill {given}{shape}")
        nd = len(shape)
        if axis is None:
            wide = [d for d, k in enumerate(shape) if k > 1]
            axis = wide[-1] if wide else nd - 1
        ax = axis + nd if axis < 0 else axis
        if not 0 <= ax < nd:
            raise self.fail(where, f"axis {axis} out of range for scale shape {shape}")
        pc_shape = tuple(1 if d == ax else k for d, k in enumerate(shape))
        if pc.numel() != math.prod(pc_shape):
            raise self.fail(where, f"{pc.numel()} per-channel scales, the integer scales' shape {shape} has "
                                   f"{math.prod(pc_shape)} channels")
        block_size = tuple(block if d == ax else (1 if shape[d] > 1 else -1) for d in range(nd))
        try:
            return lpbq_encoding(pc.reshape(pc_shape), ints.reshape(shape), bw, dbw, block_size)
        except ValueError as err:
            raise self.fail(where, str(err)) from None

    def _lpbq_1_0_0(self, name: str, e: Mapping, where: str, dbw: int) -> Encoding:
        """AIMET's 1.0.0 LPBQ entry: bw (decompressed), compressed_bw, scale (per channel), offset
        (-2^(bw-1) each), block_size, per_block_int_scale (row-major; the blocks along the last axis)."""
        bw = self._int(e.get("compressed_bw"), f"{where}.compressed_bw")
        if e.get("is_sym") is not True:
            raise self.fail(where, "LPBQ entries are symmetric (is_sym true)")
        for key in ("scale", "offset", "per_block_int_scale"):
            if key not in e:
                raise self.fail(where, f"an LPBQ entry needs {key!r}")
        pc = self._tensor(e["scale"], f"{where}.scale").reshape(-1)
        off = self._tensor(e["offset"], f"{where}.offset", integer=True).reshape(-1)
        if off.numel() != pc.numel() or not bool(torch.all(off == -(2 ** (dbw - 1)))):
            raise self.fail(where, f"an LPBQ entry has one offset per scale, each {-(2 ** (dbw - 1))} (bw {dbw})")
        ints = self._tensor(e["per_block_int_scale"], f"{where}.per_block_int_scale", integer=True).reshape(-1)
        if ints.numel() % pc.numel():
            raise self.fail(where, f"{ints.numel()} integer block scales for {pc.numel()} channels")
        block = self._int(e.get("block_size"), f"{where}.block_size")
        return self._lpbq(name, where, pc, ints.reshape(pc.numel(), -1), bw, dbw, None, block)

    def _lpbq_2_0_0(self, name: str, e: Mapping, where: str, bw: int) -> Encoding:
        """AIMET's 2.0.0 LPBQ entry: axis, block_size, per_block_int_scale and per_channel_float_scale (nested),
        output_dtype intB. The decompressed bit width is not in the file: it is read as B plus the bits of
        the largest integer scale, ceil(log2(max)), exact whenever a channel's largest block sits at the top
        of the integer grid (as calibration always puts it)."""
        for key in ("per_channel_float_scale", "axis", "block_size"):
            if e.get(key) is None:
                raise self.fail(where, f"an LPBQ entry needs {key!r}")
        ints = self._tensor(e["per_block_int_scale"], f"{where}.per_block_int_scale", integer=True)
        pc = self._tensor(e["per_channel_float_scale"], f"{where}.per_channel_float_scale")
        if "y_zero_point" in e and bool((self._tensor(e["y_zero_point"], f"{where}.y_zero_point",
                                                      integer=True) != 0).any()):
            raise self.fail(where, "LPBQ entries are symmetric (zero points 0)")
        top = float(ints.max())
        dbw = bw + max(1, math.ceil(math.log2(top))) if top >= 1 else bw + 1
        return self._lpbq(name, where, pc, ints, bw, dbw, self._int(e["axis"], f"{where}.axis"),
                          self._int(e["block_size"], f"{where}.block_size"))

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
            if isinstance(c["scale"], (list, Mapping)) or isinstance(c["offset"], (list, Mapping)):
                raise self.fail(f"{where}[{i}]", "scale and offset are single numbers per channel in 0.6.1")
            scales.append(c["scale"])
            offsets.append(c["offset"])
            zps = c.get("zero_point_shift")
            if zps:
                raise self.fail(f"{where}[{i}]", "zero_point_shift is not supported")
        scale = self._tensor(scales, f"{where}.scale")
        off = self._tensor(offsets, f"{where}.offset", integer=True)
        offset, sym, grid = self._offset_from_file(where, off, bw, sym_s == "True")
        kind = "PER_TENSOR" if len(chans) == 1 else "PER_CHANNEL"
        return self._encoding(name, where, scale, offset, bw, sym, kind, None, None, grid)
