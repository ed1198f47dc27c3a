"""Validation of hardware-config JSON (the AIMET quantsim schema described in pyquant.sim.config):
each section is checked and turned into the typed model of pyquant.sim.config, and every error message
starts with the JSON path of the offending entry."""
from __future__ import annotations

import json
import math
import warnings
from typing import Any, Iterable, Mapping, Optional, Union

from .config import (ConfigError, ConfigWarning, DefaultOpSettings, Defaults, HardwareConfig, KernelSpec, ModelInput,
                     KvCache, ModelOutput, OpSettings, ParamSettings, SupportedKernel)
from .onnx_ops import ONNX_OPS
from .passes import SUPERGROUP_PASSES

__all__ = ["parse_config"]


_TOP_KEYS = ("defaults", "params", "op_type", "supergroups", "supergroup_pass_list", "model_input", "model_output",
             "kv_cache")
_DEFAULTS_KEYS = ("ops", "params", "per_channel_quantization", "strict_symmetric", "unsigned_symmetric",
                  "hw_version", "supported_kernels", "block_size", "decompressed_bw")
_DEFAULT_OPS_KEYS = ("is_input_quantized", "is_output_quantized", "is_symmetric")
_PARAM_KEYS = ("is_quantized", "is_symmetric")
_OP_KEYS = ("is_input_quantized", "is_output_quantized", "is_symmetric", "per_channel_quantization", "params",
            "encoding_constraints", "supported_kernels", "block_size", "decompressed_bw")
_KERNEL_BITWIDTHS = (4, 8, 16, 32)


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "an array"
    if isinstance(v, Mapping):
        return "an object"
    return type(v).__name__


def _show(v: Any) -> str:
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _join(path: str, key: Union[str, int]) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _object(v: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ConfigError(f"{path}: expected an object, got {_type_name(v)} {_show(v)}")
    for k in v:
        if not isinstance(k, str):
            raise ConfigError(f"{path}: keys must be strings, got {_show(k)}")
    return v


def _keys(v: Mapping[str, Any], allowed: Iterable[str], path: str, what: str = "key") -> None:
    allowed = tuple(allowed)
    for k in v:
        if k not in allowed:
            raise ConfigError(f"{_join(path, k)}: unknown {what}; expected one of {', '.join(allowed)}")


def _bool(v: Any, path: str) -> bool:
    if v == "True" and isinstance(v, str):
        return True
    if v == "False" and isinstance(v, str):
        return False
    raise ConfigError(f'{path}: expected "True" or "False", got {_show(v)}')


def _opt_bool(obj: Mapping[str, Any], key: str, path: str) -> Optional[bool]:
    return _bool(obj[key], _join(path, key)) if key in obj else None


def _number(v: Any, path: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{path}: expected a number, got {_type_name(v)} {_show(v)}")
    try:
        f = float(v)
    except OverflowError:  # an integer beyond float's range
        f = math.inf
    if not math.isfinite(f):
        raise ConfigError(f"{path}: expected a finite number, got {_show(v)[:40]}")
    return f


def _string(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{path}: expected a string, got {_type_name(v)} {_show(v)}")
    return v


def _array(v: Any, path: str) -> list:
    if not isinstance(v, (list, tuple)):
        raise ConfigError(f"{path}: expected an array, got {_type_name(v)} {_show(v)}")
    return list(v)


def _param_settings(v: Any, path: str) -> ParamSettings:
    obj = _object(v, path)
    _keys(obj, _PARAM_KEYS, path)
    return ParamSettings(is_quantized=_opt_bool(obj, "is_quantized", path),
                         is_symmetric=_opt_bool(obj, "is_symmetric", path))


def _param_table(v: Any, path: str) -> dict[str, ParamSettings]:
    obj = _object(v, path)
    return {name: _param_settings(p, _join(path, name)) for name, p in obj.items()}


def _kernel_spec(v: Any, path: str) -> KernelSpec:
    obj = _object(v, path)
    _keys(obj, ("bitwidth", "dtype"), path)
    for req in ("bitwidth", "dtype"):
        if req not in obj:
            raise ConfigError(f"{_join(path, req)}: missing (required)")
    bw = obj["bitwidth"]
    if isinstance(bw, bool) or not isinstance(bw, int) or bw not in _KERNEL_BITWIDTHS:
        raise ConfigError(f"{_join(path, 'bitwidth')}: expected one of {', '.join(map(str, _KERNEL_BITWIDTHS))}, "
                          f"got {_show(bw)}")
    dtype = obj["dtype"]
    if dtype not in ("int", "float"):
        raise ConfigError(f'{_join(path, "dtype")}: expected "int" or "float", got {_show(dtype)}')
    if dtype == "float" and bw not in (16, 32):
        raise ConfigError(f"{path}: a float kernel must be 16 or 32 bits, got {bw}")
    return KernelSpec(bitwidth=bw, dtype=dtype)


def _kernels(v: Any, path: str, param_required: bool) -> tuple[SupportedKernel, ...]:
    items = _array(v, path)
    if not items:
        raise ConfigError(f"{path}: expected at least one kernel")
    out = []
    for i, item in enumerate(items):
        p = _join(path, i)
        obj = _object(item, p)
        _keys(obj, ("activation", "param"), p)
        if "activation" not in obj:
            raise ConfigError(f"{_join(p, 'activation')}: missing (required)")
        if param_required and "param" not in obj:
            raise ConfigError(f"{_join(p, 'param')}: missing (required in defaults.supported_kernels)")
        act = _kernel_spec(obj["activation"], _join(p, "activation"))
        par = _kernel_spec(obj["param"], _join(p, "param")) if "param" in obj else None
        out.append(SupportedKernel(activation=act, param=par))
    return tuple(out)


def _opt_int(obj: Mapping[str, Any], key: str, path: str, lo: int, hi: int) -> Optional[int]:
    """An integer field in [lo, hi] (JSON numbers, not strings), or None when absent."""
    if key not in obj:
        return None
    v, p = obj[key], _join(path, key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{p}: expected an integer in {lo}..{hi}, got {_show(v)}")
    return v


def _pass_name(v: Any, path: str) -> str:
    name = _string(v, path)
    if name not in SUPERGROUP_PASSES:
        raise ConfigError(f"{path}: unknown supergroup pass {name!r}; pyquant runs "
                          f"{', '.join(sorted(SUPERGROUP_PASSES))}")
    return name


def _constraints(v: Any, path: str) -> tuple[Optional[float], Optional[float]]:
    obj = _object(v, path)
    _keys(obj, ("min", "max"), path)
    if "min" not in obj and "max" not in obj:
        raise ConfigError(f"{path}: give min, max or both")
    lo = _number(obj["min"], _join(path, "min")) if "min" in obj else None
    hi = _number(obj["max"], _join(path, "max")) if "max" in obj else None
    if lo is not None and hi is not None and not lo < hi:
        raise ConfigError(f"{path}: min must be less than max, got min={lo}, max={hi}")
    return lo, hi


def _op_settings(v: Any, path: str) -> OpSettings:
    obj = _object(v, path)
    _keys(obj, _OP_KEYS, path)
    return OpSettings(
        is_input_quantized=_opt_bool(obj, "is_input_quantized", path),
        is_output_quantized=_opt_bool(obj, "is_output_quantized", path),
        is_symmetric=_opt_bool(obj, "is_symmetric", path),
        per_channel_quantization=_opt_bool(obj, "per_channel_quantization", path),
        params=_param_table(obj["params"], _join(path, "params")) if "params" in obj else {},
        encoding_constraints=(_constraints(obj["encoding_constraints"], _join(path, "encoding_constraints"))
                              if "encoding_constraints" in obj else None),
        supported_kernels=(_kernels(obj["supported_kernels"], _join(path, "supported_kernels"), False)
                           if "supported_kernels" in obj else None),
        block_size=_opt_int(obj, "block_size", path, 0, 2 ** 31 - 1),  # 0: this op's weights unblocked
        decompressed_bw=_opt_int(obj, "decompressed_bw", path, 3, 16),
    )


def _defaults(v: Any, path: str) -> Defaults:
    obj = _object(v, path)
    _keys(obj, _DEFAULTS_KEYS, path)
    ops = DefaultOpSettings()
    if "ops" in obj:
        p = _join(path, "ops")
        o = _object(obj["ops"], p)
        _keys(o, _DEFAULT_OPS_KEYS, p)
        ops = DefaultOpSettings(**{k: _opt_bool(o, k, p) for k in _DEFAULT_OPS_KEYS})
    params = _param_settings(obj["params"], _join(path, "params")) if "params" in obj else ParamSettings()
    return Defaults(
        ops=ops, params=params,
        per_channel_quantization=_opt_bool(obj, "per_channel_quantization", path),
        strict_symmetric=_opt_bool(obj, "strict_symmetric", path),
        unsigned_symmetric=_opt_bool(obj, "unsigned_symmetric", path),
        hw_version=_string(obj["hw_version"], _join(path, "hw_version")) if "hw_version" in obj else None,
        supported_kernels=(_kernels(obj["supported_kernels"], _join(path, "supported_kernels"), True)
                           if "supported_kernels" in obj else None),
        block_size=_opt_int(obj, "block_size", path, 1, 2 ** 31 - 1),
        decompressed_bw=_opt_int(obj, "decompressed_bw", path, 3, 16),
    )


def _supergroups(v: Any, path: str) -> list[tuple[str, ...]]:
    out = []
    for i, item in enumerate(_array(v, path)):
        p = _join(path, i)
        obj = _object(item, p)
        _keys(obj, ("op_list",), p)
        if "op_list" not in obj:
            raise ConfigError(f"{_join(p, 'op_list')}: missing (required)")
        pl = _join(p, "op_list")
        ops = tuple(_string(op, _join(pl, j)) for j, op in enumerate(_array(obj["op_list"], pl)))
        if len(ops) < 2:
            raise ConfigError(f"{pl}: a supergroup needs at least 2 ops, got {len(ops)}")
        out.append(ops)
    return out


def parse_config(data: Any, source: Optional[str]) -> HardwareConfig:
    """The :class:`HardwareConfig` of a parsed JSON document; raises :class:`ConfigError` naming the
    JSON path of the first invalid entry and warns (:class:`ConfigWarning`) about op names that are not
    ONNX operators."""
    top = _object(data, "(top level)")
    for k in top:
        if k not in _TOP_KEYS:
            raise ConfigError(f"{k}: unknown section; expected one of {', '.join(_TOP_KEYS)}")
    model_input = ModelInput()
    if "model_input" in top:
        mi = _object(top["model_input"], "model_input")
        _keys(mi, ("is_input_quantized",), "model_input")
        model_input = ModelInput(_opt_bool(mi, "is_input_quantized", "model_input"))
    model_output = ModelOutput()
    if "model_output" in top:
        mo = _object(top["model_output"], "model_output")
        _keys(mo, ("is_output_quantized",), "model_output")
        model_output = ModelOutput(_opt_bool(mo, "is_output_quantized", "model_output"))
    kv_cache = KvCache()
    if "kv_cache" in top:
        kv = _object(top["kv_cache"], "kv_cache")
        _keys(kv, ("bitwidth", "is_symmetric"), "kv_cache")
        bw = kv.get("bitwidth")
        if bw is not None and (isinstance(bw, bool) or not isinstance(bw, int) or not 2 <= bw <= 16):
            raise ConfigError(f"kv_cache.bitwidth: expected an integer in 2..16, got {_show(bw)}")
        kv_cache = KvCache(bw, _opt_bool(kv, "is_symmetric", "kv_cache"))
    pass_list = None
    if "supergroup_pass_list" in top:
        pass_list = tuple(_pass_name(s, _join("supergroup_pass_list", i))
                          for i, s in enumerate(_array(top["supergroup_pass_list"], "supergroup_pass_list")))
    op_table = _object(top.get("op_type", {}), "op_type")
    cfg = HardwareConfig(
        defaults=_defaults(top["defaults"], "defaults") if "defaults" in top else Defaults(),
        params=_param_table(top.get("params", {}), "params"),
        op_type={name: _op_settings(o, _join("op_type", name)) for name, o in op_table.items()},
        supergroups=_supergroups(top.get("supergroups", []), "supergroups"),
        supergroup_pass_list=pass_list,
        model_input=model_input,
        model_output=model_output,
        kv_cache=kv_cache,
        source=source,
    )
    _warn_unknown_ops(cfg)
    return cfg


def _warn_unknown_ops(cfg: HardwareConfig) -> None:
    unknown = [f"op_type.{name}" for name in cfg.op_type if name not in ONNX_OPS]
    for i, group in enumerate(cfg.supergroups):
        unknown += [f"supergroups[{i}].op_list: {op}" for op in group if op not in ONNX_OPS]
    if unknown:
        where = f" in {cfg.source}" if cfg.source else ""
        warnings.warn(f"hardware config{where}: not ONNX operator names (these rules apply only to ops the "
                      f"graph reports under exactly that name): {'; '.join(unknown)}", ConfigWarning,
                      stacklevel=4)  # the caller of load_config (load_config -> parse_config -> here)
