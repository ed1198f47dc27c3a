"""Hardware config: which tensors a target quantizes, and how (AIMET-style JSON).

A config says, per ONNX op type, whether inputs / outputs / parameters are quantized, whether they are
symmetric, whether weights are per-channel, which ops fuse into one kernel (supergroups: no quantizer
between them) and which outputs have a fixed range. Files use the schema of AIMET's quantsim configs, so
AIMET's own files load here unchanged; booleans are the strings ``"True"`` / ``"False"``::

    {
      "defaults": {"ops": {"is_output_quantized": "True"},
                   "params": {"is_quantized": "True", "is_symmetric": "True"},
                   "per_channel_quantization": "False", "strict_symmetric": "False"},
      "params": {"bias": {"is_quantized": "False"}},
      "op_type": {"Conv": {"per_channel_quantization": "True"},
                  "Softmax": {"encoding_constraints": {"min": 0.0, "max": 1.0}}},
      "supergroups": [{"op_list": ["Conv", "Relu"]}],
      "model_input": {"is_input_quantized": "True"},
      "model_output": {}
    }

Resolution (the most specific setting wins, field by field, as in AIMET):

* parameters: ``op_type.<Op>.params.<name>`` > ``params.<name>`` > ``defaults.params``; a field set
  nowhere is False (not quantized, asymmetric);
* activations: ``op_type.<Op>`` > ``defaults.ops``; unset: inputs not quantized, outputs not quantized,
  asymmetric;
* per-channel (weights): ``op_type.<Op>.per_channel_quantization`` > ``defaults.per_channel_quantization``
  > False;
* per-block weights (pyquant's keys, integers): ``op_type.<Op>.block_size`` > ``defaults.block_size`` > none,
  and LPBQ block scales ``op_type.<Op>.decompressed_bw`` > ``defaults.decompressed_bw`` > none.

Every section is optional when loading (a missing one is empty); ``to_dict()`` always writes the six
sections AIMET requires, so its output loads in AIMET too. One section is pyquant's own: ``"kv_cache":
{"bitwidth": 8, "is_symmetric": "True"}`` puts quantizers on the keys and values attention reads (what a
decoder's key/value cache holds); ``to_dict()`` writes it only when set.
"""
from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from typing import Any, Mapping, Optional, Union

from .._io import atomic_write_text, read_json
from .onnx_ops import ONNX_OPS  # noqa: F401  (still importable from here)

__all__ = [
    "ConfigError", "ConfigWarning", "HardwareConfig", "ParamRule", "ParamSettings", "OpSettings",
    "DefaultOpSettings", "Defaults", "KernelSpec", "SupportedKernel", "ModelInput", "ModelOutput",
    "PROFILES", "load_config", "profile_path",
]

PROFILES = ("default", "per_tensor", "strict_symmetric_int8", "layer_inputs")
"""Named profiles shipped in ``pyquant/sim/configs``: ``default`` (per-channel symmetric weights,
asymmetric activations), ``per_tensor`` (the same with per-tensor weights),
``strict_symmetric_int8`` (everything symmetric, strict symmetric grid) and ``layer_inputs`` (only the
matrix products: the inputs (asymmetric, per tensor) and per-channel symmetric weights of every Linear /
Gemm and Conv, everything else in floating point, as targets that run only their GEMMs in integers do:
TensorRT-LLM's SmoothQuant kernels, ModelOpt's INT8 configs)."""

ConfigLike = Union[str, os.PathLike, Mapping[str, Any], "HardwareConfig"]


class ConfigError(ValueError):
    """An invalid hardware config; the message starts with the JSON path of the offending entry."""


class ConfigWarning(UserWarning):
    """A config entry that is valid but probably not what was meant (e.g. an unknown ONNX op name)."""


# ---------------------------------------------------------------------------------------------
# Typed model of the file
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParamRule:
    """Resolved settings of one parameter of one op type."""

    is_quantized: bool
    is_symmetric: bool


@dataclasses.dataclass(frozen=True)
class ParamSettings:
    """``{"is_quantized": ..., "is_symmetric": ...}``; None = not set at this level."""

    is_quantized: Optional[bool] = None
    is_symmetric: Optional[bool] = None


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """``{"bitwidth": 8, "dtype": "int"}``."""

    bitwidth: int
    dtype: str  # "int" or "float"


@dataclasses.dataclass(frozen=True)
class SupportedKernel:
    """One entry of ``supported_kernels``: an activation/param (dtype, bitwidth) pair the target runs."""

    activation: KernelSpec
    param: Optional[KernelSpec] = None


@dataclasses.dataclass(frozen=True)
class DefaultOpSettings:
    """``defaults.ops``."""

    is_input_quantized: Optional[bool] = None
    is_output_quantized: Optional[bool] = None
    is_symmetric: Optional[bool] = None


@dataclasses.dataclass(frozen=True)
class OpSettings:
    """``op_type.<OnnxOpName>``; None = not set for this op type (the defaults apply)."""

    is_input_quantized: Optional[bool] = None
    is_output_quantized: Optional[bool] = None
    is_symmetric: Optional[bool] = None
    per_channel_quantization: Optional[bool] = None
    params: Mapping[str, ParamSettings] = dataclasses.field(default_factory=dict)
    encoding_constraints: Optional[tuple[Optional[float], Optional[float]]] = None
    supported_kernels: Optional[tuple[SupportedKernel, ...]] = None
    block_size: Optional[int] = None
    decompressed_bw: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Defaults:
    """``defaults``."""

    ops: DefaultOpSettings = DefaultOpSettings()
    params: ParamSettings = ParamSettings()
    per_channel_quantization: Optional[bool] = None
    strict_symmetric: Optional[bool] = None
    unsigned_symmetric: Optional[bool] = None
    hw_version: Optional[str] = None
    supported_kernels: Optional[tuple[SupportedKernel, ...]] = None
    block_size: Optional[int] = None
    decompressed_bw: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """``model_input``."""

    is_input_quantized: Optional[bool] = None


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """``model_output``."""

    is_output_quantized: Optional[bool] = None


@dataclasses.dataclass(frozen=True)
class KvCache:
    """``kv_cache``: quantizers on the keys and values attention reads (what a decoder's key/value cache
    holds). ``bitwidth`` None: no such quantizers unless QuantSim's ``kv_bw`` asks for them;
    ``is_symmetric`` None: the Attention op's activation rule."""

    bitwidth: Optional[int] = None
    is_symmetric: Optional[bool] = None


@dataclasses.dataclass(frozen=True, eq=True)
class HardwareConfig:
    """A validated hardware config. Build it with :func:`load_config`; query it with the methods below.

    ``op_type`` arguments are ONNX op names (``"Conv"``, ``"Gemm"``, ...); a name without an entry in
    ``op_type`` (or None / ``""``) gets the defaults.
    """

    defaults: Defaults = Defaults()
    params: Mapping[str, ParamSettings] = dataclasses.field(default_factory=dict)
    op_type: Mapping[str, OpSettings] = dataclasses.field(default_factory=dict)
    supergroups: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    supergroup_pass_list: Optional[tuple[str, ...]] = None
    model_input: ModelInput = ModelInput()
    model_output: ModelOutput = ModelOutput()
    kv_cache: KvCache = KvCache()
    source: Optional[str] = dataclasses.field(default=None, compare=False)
    """Where it came from (profile name or file path), for messages only."""

    __hash__ = None  # mutable containers inside

    # ---- per op type ----
    def _op(self, op_type: Optional[str]) -> OpSettings:
        return self.op_type.get(op_type, _NO_OP) if op_type else _NO_OP

    def input_quantized(self, op_type: Optional[str]) -> bool:
        """Whether the op's inputs get a quantizer of their own."""
        return _first(self._op(op_type).is_input_quantized, self.defaults.ops.is_input_quantized, False)

    def output_quantized(self, op_type: Optional[str]) -> bool:
        """Whether the op's output is quantized (before supergroups are applied)."""
        return _first(self._op(op_type).is_output_quantized, self.defaults.ops.is_output_quantized, False)

    def activation_symmetric(self, op_type: Optional[str]) -> bool:
        """Whether the op's input/output activations use symmetric encodings."""
        return _first(self._op(op_type).is_symmetric, self.defaults.ops.is_symmetric, False)

    def per_channel(self, op_type: Optional[str]) -> bool:
        """Whether the op's weights are quantized per output channel."""
        return _first(self._op(op_type).per_channel_quantization, self.defaults.per_channel_quantization, False)

    def param_rule(self, op_type: Optional[str], param_name: str) -> ParamRule:
        """Settings of parameter ``param_name`` ("weight", "bias", ...) of an op of type ``op_type``:
        ``op_type.<Op>.params.<name>`` > ``params.<name>`` > ``defaults.params``, field by field."""
        layers = (self._op(op_type).params.get(param_name), self.params.get(param_name), self.defaults.params)
        q = _first(*(p.is_quantized for p in layers if p is not None), False)
        s = _first(*(p.is_symmetric for p in layers if p is not None), False)
        return ParamRule(is_quantized=q, is_symmetric=s)

    def encoding_constraint(self, op_type: Optional[str]) -> Optional[tuple[Optional[float], Optional[float]]]:
        """Fixed output range ``(min, max)`` of the op, or None. A side that is None is not fixed and is
        calibrated (``{"min": 0.0}`` fixes only the minimum)."""
        return self._op(op_type).encoding_constraints

    def supported_kernels(self, op_type: Optional[str] = None) -> tuple[SupportedKernel, ...]:
        """The op's ``supported_kernels``, else the defaults', else ()."""
        return _first(self._op(op_type).supported_kernels, self.defaults.supported_kernels, ())

    def block_size(self, op_type: Optional[str]) -> Optional[int]:
        """Elements per weight scale along the input dimension of a Gemm/MatMul weight (per-block weights):
        ``op_type.<Op>.block_size`` > ``defaults.block_size`` > None (per channel or per tensor); 0 at the op
        level keeps that op's weights unblocked."""
        b = _first(self._op(op_type).block_size, self.defaults.block_size)
        return b or None

    def decompressed_bw(self, op_type: Optional[str]) -> Optional[int]:
        """LPBQ for per-block weights: the bit width that codes times their integer block scale fit
        (``op_type.<Op>.decompressed_bw`` > ``defaults.decompressed_bw`` > None: plain float block scales)."""
        return _first(self._op(op_type).decompressed_bw, self.defaults.decompressed_bw)

    def default_bitwidths(self) -> tuple[Optional[int], Optional[int]]:
        """(activation, parameter) bit widths of the first integer entry of ``defaults.supported_kernels``, as
        AIMET takes its default bit widths from it; (None, None) without one."""
        for k in self.defaults.supported_kernels or ():
            if k.activation.dtype == "int":
                par = k.param.bitwidth if k.param is not None and k.param.dtype == "int" else None
                return k.activation.bitwidth, par
            break
        return None, None

    # ---- global ----
    @property
    def strict_symmetric(self) -> bool:
        return bool(self.defaults.strict_symmetric)

    @property
    def unsigned_symmetric(self) -> bool:
        return bool(self.defaults.unsigned_symmetric)

    @property
    def hw_version(self) -> Optional[str]:
        return self.defaults.hw_version

    @property
    def model_input_quantized(self) -> bool:
        """Whether the model's (floating-point) inputs are quantized."""
        return bool(self.model_input.is_input_quantized)

    @property
    def model_output_quantized(self) -> bool:
        """Whether ``model_output.is_output_quantized`` is set: the model's outputs are quantized even if
        the last op's rule says otherwise. (Unset, AIMET quantizes them by the last op's rule.)"""
        return bool(self.model_output.is_output_quantized)

    @property
    def kv_bitwidth(self) -> Optional[int]:
        """``kv_cache.bitwidth``: the bit width of the key/value quantizers, or None (none placed)."""
        return self.kv_cache.bitwidth

    def kv_symmetric(self) -> bool:
        """Whether the key/value quantizers are symmetric: ``kv_cache.is_symmetric``, else the Attention
        op's activation rule."""
        return _first(self.kv_cache.is_symmetric, self.activation_symmetric("Attention"))

    # ---- serialization ----
    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict in the AIMET schema; ``load_config(cfg.to_dict()) == cfg``."""
        d = self.defaults
        defaults: dict[str, Any] = {"ops": _settings_dict(d.ops), "params": _settings_dict(d.params)}
        for key in ("per_channel_quantization", "strict_symmetric", "unsigned_symmetric"):
            if getattr(d, key) is not None:
                defaults[key] = _bstr(getattr(d, key))
        if d.hw_version is not None:
            defaults["hw_version"] = d.hw_version
        if d.supported_kernels is not None:
            defaults["supported_kernels"] = [_kernel_dict(k) for k in d.supported_kernels]
        for key in ("block_size", "decompressed_bw"):
            if getattr(d, key) is not None:
                defaults[key] = getattr(d, key)
        out: dict[str, Any] = {
            "defaults": defaults,
            "params": {name: _settings_dict(p) for name, p in self.params.items()},
            "op_type": {name: _op_dict(o) for name, o in self.op_type.items()},
            "supergroups": [{"op_list": list(g)} for g in self.supergroups],
        }
        if self.supergroup_pass_list is not None:
            out["supergroup_pass_list"] = list(self.supergroup_pass_list)
        out["model_input"] = _settings_dict(self.model_input)
        out["model_output"] = _settings_dict(self.model_output)
        if self.kv_cache != KvCache():
            kv: dict[str, Any] = {}
            if self.kv_cache.bitwidth is not None:
                kv["bitwidth"] = self.kv_cache.bitwidth
            if self.kv_cache.is_symmetric is not None:
                kv["is_symmetric"] = _bstr(self.kv_cache.is_symmetric)
            out["kv_cache"] = kv
        return out

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the config as JSON (indent 2), atomically: on any error an existing file at ``path``
        keeps its old content."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def __repr__(self) -> str:
        src = f"{self.source!r}, " if self.source else ""
        return (f"HardwareConfig({src}{len(self.op_type)} op types, {len(self.supergroups)} supergroups, "
                f"per_channel default={self.per_channel(None)}, strict_symmetric={self.strict_symmetric})")


_NO_OP = OpSettings()


def _first(*values):
    for v in values:
        if v is not None:
            return v
    return None


def _bstr(v: bool) -> str:
    return "True" if v else "False"


def _settings_dict(obj) -> dict[str, str]:
    return {f.name: _bstr(getattr(obj, f.name)) for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None}


def _kernel_dict(k: SupportedKernel) -> dict[str, Any]:
    d: dict[str, Any] = {"activation": {"bitwidth": k.activation.bitwidth, "dtype": k.activation.dtype}}
    if k.param is not None:
        d["param"] = {"bitwidth": k.param.bitwidth, "dtype": k.param.dtype}
    return d


def _op_dict(o: OpSettings) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for key in ("is_input_quantized", "is_output_quantized", "is_symmetric", "per_channel_quantization"):
        if getattr(o, key) is not None:
            d[key] = _bstr(getattr(o, key))
    if o.params:
        d["params"] = {name: _settings_dict(p) for name, p in o.params.items()}
    if o.encoding_constraints is not None:
        d["encoding_constraints"] = {k: v for k, v in zip(("min", "max"), o.encoding_constraints) if v is not None}
    if o.supported_kernels is not None:
        d["supported_kernels"] = [_kernel_dict(k) for k in o.supported_kernels]
    for key in ("block_size", "decompressed_bw"):
        if getattr(o, key) is not None:
            d[key] = getattr(o, key)
    return d


# ---------------------------------------------------------------------------------------------
# Loading (the checks of the JSON itself live in config_schema.py)
# ---------------------------------------------------------------------------------------------
def profile_path(name: str) -> str:
    """File path of a named profile (see :data:`PROFILES`)."""
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; the named profiles are {', '.join(PROFILES)}")
    return str(resources.files(__package__).joinpath("configs", f"{name}.json"))


def load_config(config: ConfigLike) -> HardwareConfig:
    """A :class:`HardwareConfig` from a named profile (``"default"``, ``"per_tensor"``,
    ``"strict_symmetric_int8"``, ``"layer_inputs"``), a JSON file path, or a dict in the same schema.

    Raises :class:`ConfigError` (a ValueError) naming the JSON path of the first invalid entry, e.g.
    ``op_type.Conv.params.weight.is_symmetric: expected "True" or "False", got "yes"``. Op names that
    are not ONNX operators are accepted with a :class:`ConfigWarning`.
    """
    # config_schema builds the types defined here, so it is imported on use rather than at the top
    from .config_schema import parse_config

    if isinstance(config, HardwareConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(config, source=None)
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"config must be a profile name, a JSON path or a dict, got {type(config).__name__}")
    text_path = os.fspath(config)
    if isinstance(config, str) and config in PROFILES:
        path, source = profile_path(config), config
    elif os.path.isfile(text_path):
        path, source = text_path, text_path
    else:
        raise ConfigError(f"{text_path!r} is neither a named profile ({', '.join(PROFILES)}) nor an existing "
                          f"JSON file")
    try:
        data = read_json(path, ConfigError)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e}") from None
    return parse_config(data, source=source)
