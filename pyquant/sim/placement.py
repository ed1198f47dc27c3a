"""Where QuantSim puts quantizers, computed from the captured graph and the hardware config alone.

This is the one place that reads the config's placement rules: which parameters are quantized (and
per channel or per tensor, symmetric or not), which op outputs and model inputs get an activation
quantizer, which ops fuse into one kernel (supergroups: no quantizer between them) and which outputs
have a fixed range. QuantSim turns each `QuantizerPlacement` into a quantizer; honouring a further
config key means changing `plan` here, not the simulation.

What a node is (a model input, an op's output, data movement, part of a larger op, not data-dependent, an
op the simulation does not know) comes from graph.classify; this module only decides, from that and the
config, where quantizers go."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from .._layers import layers_for, weight_axis
from . import graph as G
from .config import HardwareConfig
from .kernels import apply_supported_kernels
from .passes import internal_nodes, single_consumer

__all__ = ["QuantizerPlacement", "UnquantizedOp", "BiasPlacement", "PER_CHANNEL_OPS", "PER_BLOCK_OPS", "KV_ROLES",
           "plan", "unquantized_ops", "int32_biases", "kv_inputs"]

PER_CHANNEL_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""Op types whose weights may be quantized per output channel (when the config says so)."""

PER_BLOCK_OPS = ("Gemm", "MatMul")
"""Op types whose (2-d) weights may be quantized per block along their input dimension; other weights
(convolutions, embedding tables) keep per-channel or per-tensor encodings."""

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class QuantizerPlacement:
    """One quantizer QuantSim places.

    `name`: "<module>.weight" (a module's weight), "<parameter path>" (a weight of a torch.export graph),
    "<op>.output", "input.<name>" (a model input) or "<op>.input_<k>" (the k-th activation input of an op
    the config quantizes the inputs of). `kind`: "param", "output", "input" or "op_input". `op_type`: the
    ONNX op type of the op it belongs to ("ModelInput" for model inputs). `node`: the graph node it acts
    on (the weighted op, the node whose output it quantizes, or the op whose input it quantizes);
    `source`: for an op input, the node that produces it (the quantizer sits on that edge only).
 `symmetric`: its encoding's symmetry.
    `axis`: a weight's per-channel axis (None: per tensor). `weight_shape`: the weight's shape.
    `graph_weight`: for a weight that is a graph attribute (torch.export graphs), its attribute path.
    `constraint`: a fixed output range (min, max) from the config (a side that is None is calibrated).
    `bitwidth`: its bit width (param_bw or output_bw, unless the config's supported_kernels moved it);
    `enabled`: False where the op runs in floating point (a float kernel). `strict` / `unsigned_symmetric`:
    a symmetric quantizer's grid, from the config's defaults (strict_symmetric, unsigned_symmetric).
    `output_axis`: a weight's output-channel axis (whether or not it is quantized per channel).
    `block_size`: a Gemm/MatMul weight quantized per block: elements per scale along its input dimension
    (the dimension other than `axis`, the output channels, which then always have scales of their own).
    `decompressed_bw`: a per-block weight with LPBQ block scales (pyquant.quant.lpbq): the bit width codes
    times their integer block scale fit."""

    name: str
    kind: str
    op_type: str
    node: str
    symmetric: bool
    axis: Optional[int] = None
    weight_shape: Optional[tuple[int, ...]] = None
    graph_weight: Optional[str] = None
    constraint: Optional[tuple[Optional[float], Optional[float]]] = None
    source: Optional[str] = None
    bitwidth: int = 8
    enabled: bool = True
    strict: bool = False
    unsigned_symmetric: bool = False
    output_axis: Optional[int] = None
    block_size: Optional[int] = None
    decompressed_bw: Optional[int] = None

    @property
    def is_param(self) -> bool:
        return self.kind == "param"

    @property
    def block_axis(self) -> Optional[int]:
        """The dimension a per-block weight's blocks lie along (its input dimension), else None."""
        return None if self.block_size is None else 1 - self.axis

    @property
    def quantizer_block_size(self) -> Optional[tuple[int, ...]]:
        """The quantizer's `block_size`: elements per scale along each dimension, e.g. (1, B)."""
        if self.block_size is None:
            return None
        return tuple(self.block_size if d == self.block_axis else 1 for d in range(len(self.weight_shape)))

    @property
    def shape(self) -> tuple[int, ...]:
        """The encoding's shape: one scale per channel along `axis` (and per block of `block_size` along the
        block axis), else one in all."""
        if self.weight_shape is None:
            return ()
        if self.block_size is not None:
            return tuple(k // self.block_size if d == self.block_axis else k for d, k in enumerate(self.weight_shape))
        return tuple(k if d == self.axis else 1 for d, k in enumerate(self.weight_shape))


@dataclasses.dataclass(frozen=True)
class UnquantizedOp:
    """A data-dependent op output that gets no quantizer because the simulation does not know the op:
    `node` (the graph node), `target` (what it calls) and `reason`."""

    node: str
    target: str
    reason: str


@dataclasses.dataclass(frozen=True)
class BiasPlacement:
    """A layer whose bias an integer target adds on the int32 grid at scale s_x * s_w: `layer` (the module),
    `node` (its graph node), `input_quantizer` (what quantizes its input, per tensor) and `weight_quantizer`."""

    layer: str
    node: str
    input_quantizer: str
    weight_quantizer: str


def plan(gm: fx.GraphModule, cfg: HardwareConfig, param_bw: int = 8, output_bw: int = 8,
         unsupported_kernels: str = "error", block_size: Optional[int] = None,
         decompressed_bw: Optional[int] = None, kv_bw: Optional[int] = None) -> list[QuantizerPlacement]:
    """The quantizers of `gm` under `cfg`: module weights, then graph-attribute weights (torch.export
    graphs, functional calls), then activations, then op inputs, each in graph order (QuantSim names its
    graph quantizers in this order), with weights at `param_bw` bits and activations at `output_bw` unless
    the config's supported_kernels say otherwise (kernels.py: an error, or the nearest kernel with
    `unsupported_kernels="nearest"`). Gemm/MatMul weights are per block of `block_size` along their input
    dimension (else the config's `block_size`), with LPBQ scales at `decompressed_bw` (else the config's);
    a block size that does not divide a weight's input dimension is a ValueError naming the weight. Last come
    the key/value quantizers of attention (`kv_inputs`), at `kv_bw` bits, else the config's
    ``kv_cache.bitwidth``; none when both are None. Their width is the cache's storage, which supported_kernels
    (the ops' compute) do not move."""
    roles = G.classify(gm)
    # internal nodes are parts of a larger op: no supergroup starts, ends or runs through them by type
    op_type = {n: (None if r.kind == "internal" else r.op_type) for n, r in roles.items()}
    modules = _module_weights(gm, cfg, op_type)
    middle = _supergroup_middles(gm, cfg, op_type)
    acts = _activations(gm, cfg, roles, middle)
    placed = (modules + _graph_weights(gm, cfg, op_type, {p.name for p in modules}) + acts
              + _op_inputs(gm, cfg, roles, middle, {p.node for p in acts}))
    placed = [dataclasses.replace(p, bitwidth=param_bw if p.is_param else output_bw,
                                  strict=p.symmetric and cfg.strict_symmetric,
                                  unsigned_symmetric=p.symmetric and cfg.unsigned_symmetric) for p in placed]
    placed = [_blocked(p, cfg, block_size, decompressed_bw) if p.is_param else p for p in placed]
    placed = apply_supported_kernels(placed, cfg, unsupported_kernels)
    kv_bw = kv_bw if kv_bw is not None else cfg.kv_bitwidth
    if kv_bw is None:
        return placed
    taken = {p.name for p in placed}
    kv = [dataclasses.replace(p, bitwidth=kv_bw, strict=p.symmetric and cfg.strict_symmetric)
          for p in kv_inputs(gm, cfg, roles) if p.name not in taken]
    return placed + kv


def _blocked(p: QuantizerPlacement, cfg: HardwareConfig, block_size: Optional[int],
             decompressed_bw: Optional[int]) -> QuantizerPlacement:
    """A 2-d Gemm/MatMul weight per block along its input dimension when the argument or the config asks."""
    b = block_size if block_size is not None else cfg.block_size(p.op_type)
    if (b is None or p.op_type not in PER_BLOCK_OPS or p.weight_shape is None or len(p.weight_shape) != 2
            or p.output_axis is None):
        return p
    where = "block_size" if block_size is not None else f"the config's block_size for {p.op_type}"
    k = p.weight_shape[1 - p.output_axis]
    if k % b:
        raise ValueError(f"{where} = {b} does not divide the input dimension {k} of weight {p.name!r} (shape "
                         f"{p.weight_shape}); use a divisor of {k}")
    dbw = decompressed_bw if decompressed_bw is not None else cfg.decompressed_bw(p.op_type)
    if dbw is not None and not p.symmetric:
        raise ValueError(f"weight {p.name!r}: LPBQ (decompressed_bw={dbw}) needs symmetric weights, and the "
                         f"config makes {p.op_type} weights asymmetric")
    return dataclasses.replace(p, axis=p.output_axis, block_size=int(b), decompressed_bw=dbw)


def unquantized_ops(gm: fx.GraphModule) -> list[UnquantizedOp]:
    """The data-dependent outputs of ops the simulation does not know, in graph order: no quantizer is
    guessed for them (an unknown op may be anything on the target), and QuantSim.summary lists them."""
    out = []
    for n, r in G.classify(gm).items():
        if r.kind == "unknown":
            target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
            out.append(UnquantizedOp(n.name, str(target), r.reason))
    return out


def _per_channel_axis(cfg: HardwareConfig, op: str, axis: int) -> Optional[int]:
    return axis if cfg.per_channel(op) and op in PER_CHANNEL_OPS else None


def _module_weights(gm: fx.GraphModule, cfg: HardwareConfig, op_type: dict) -> list[QuantizerPlacement]:
    """One quantizer per weight parameter of a module the config quantizes (one for all the module's
    call sites: the weight is one tensor)."""
    out, seen = [], set()
    for n in gm.graph.nodes:
        t = op_type[n]
        if n.op != "call_module" or t is None or t == "Passthrough" or n.target in seen:
            continue
        seen.add(n.target)
        mod = gm.get_submodule(n.target)
        axis, w = weight_axis(mod), getattr(mod, "weight", None)
        if axis is None or not isinstance(w, nn.Parameter):
            continue
        rule = cfg.param_rule(t, "weight")
        if rule.is_quantized:
            out.append(QuantizerPlacement(f"{n.target}.weight", "param", t, n.name, rule.is_symmetric,
                                          _per_channel_axis(cfg, t, axis), tuple(w.shape), output_axis=axis))
    return out


def _graph_weights(gm: fx.GraphModule, cfg: HardwareConfig, op_type: dict,
                   taken: set[str]) -> list[QuantizerPlacement]:
    """Weights that are graph attributes: those of ATen ops (graphs from torch.export) and of functional
    calls such as F.linear(x, self.weight); one quantizer per parameter, on the whole tensor, also when ops
    read slices of its output channels. A weight read by several ops (a language model's embedding table
    tied to its output head) gets one quantizer, per channel where one of its readers runs per channel:
    the head's output channels are the table's rows, so the lookup reads per-row encodings as well, where a
    per-tensor grid over a whole vocabulary would cost the head its precision."""
    uses: dict[str, list[tuple[fx.Node, int, fx.Node]]] = {}
    for n in gm.graph.nodes:
        found = G.weight_of(n)
        if found is None or op_type.get(n) is None:
            continue
        w_node, axis = found
        w = G.get_attr(gm, w_node.target)
        name = str(w_node.target)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or name in taken:
            continue
        if cfg.param_rule(op_type[n], "weight").is_quantized:
            uses.setdefault(name, []).append((n, axis, w_node))
    out = []
    for name, readers in uses.items():
        per_channel = [r for r in readers if _per_channel_axis(cfg, op_type[r[0]], r[1]) is not None]
        n, axis, w_node = (per_channel or readers)[0]
        rule = cfg.param_rule(op_type[n], "weight")
        out.append(QuantizerPlacement(name, "param", op_type[n], n.name, rule.is_symmetric,
                                      _per_channel_axis(cfg, op_type[n], axis),
                                      tuple(G.get_attr(gm, w_node.target).shape), graph_weight=name,
                                      output_axis=axis))
    return out


def _supergroup_middles(gm: fx.GraphModule, cfg: HardwareConfig, op_type: dict) -> set[fx.Node]:
    """Nodes inside a supergroup (all but its last op): no quantizer after them (e.g. Conv -> Relu).
    Data-movement nodes between the ops (an Identity left by batch-norm folding, a reshape) do not break
    a group. The config's supergroup_pass_list adds the matches of those named passes (passes.py)."""
    middle: set[fx.Node] = set()
    for group in cfg.supergroups:
        for n in gm.graph.nodes:
            if op_type.get(n) != group[0]:
                continue
            chain, cur = [n], n
            for t in group[1:]:
                nxt = single_consumer(cur, op_type)
                if nxt is None or op_type.get(nxt) != t:
                    break
                chain.append(nxt)
                cur = nxt
            if len(chain) == len(group):
                middle.update(chain[:-1])
    return middle | internal_nodes(cfg.supergroup_pass_list or (), gm, op_type)


def _call_index(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Which call of its module each call_module node is (0, 1, ...), whatever is quantized: names stay
    stable when the config changes."""
    calls: dict[str, int] = {}
    out: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[n] = calls.get(n.target, 0)
            calls[n.target] = out[n] + 1
    return out


def _op_inputs(gm: fx.GraphModule, cfg: HardwareConfig, roles: dict[fx.Node, G.NodeRole], middle: set[fx.Node],
               quantized: set[str]) -> list[QuantizerPlacement]:
    """Inputs of known ops the config quantizes the inputs of (is_input_quantized): each floating-point
    data input (not a mask, table or shape: graph.classify) that is not already quantized where it comes
    from (its producer, through data movement, has no output or model-input quantizer) gets a quantizer on
    that edge. Inputs from inside a supergroup stay unquantized (the group is one kernel); weights are the
    parameter rules' business."""
    call_index = _call_index(gm)
    out = []
    for n in gm.graph.nodes:
        role = roles[n]
        t = role.op_type
        if role.kind != "op" or t is None or not cfg.input_quantized(t):
            continue
        for k, a in enumerate(dict.fromkeys(n.all_input_nodes)):
            src = a
            while roles[src].kind == "passthrough" and len(src.all_input_nodes) == 1:
                src = src.all_input_nodes[0]
            if (src.name in quantized or src in middle or roles[a].kind not in ("input", "op", "passthrough")
                    or a.meta.get("pq_dtype") not in _FLOATS):
                continue
            base = n.target if n.op == "call_module" else n.name
            suffix = f"_{call_index[n]}" if call_index.get(n) else ""
            out.append(QuantizerPlacement(f"{base}.input_{k}{suffix}", "op_input", t, n.name,
                                          cfg.activation_symmetric(t), source=a.name))
    return out


KV_ROLES = ("key", "value")
"""The suffixes of key/value quantizer names: "<attention module>.key", "<attention module>.value"."""


def kv_inputs(gm: fx.GraphModule, cfg: HardwareConfig,
              roles: Optional[dict[fx.Node, G.NodeRole]] = None) -> list[QuantizerPlacement]:
    """Op-input quantizers on the keys and values attention reads, what a decoder's key/value cache holds
    (after the rotary embedding for the keys): for a fused attention op (scaled_dot_product_attention) its
    key and value inputs; for attention written out as MatMul -> (scale, mask) -> Softmax -> MatMul, the
    second operand of each product (the transposed keys, the values). Named "<module>.key" / "<module>.value"
    after the module that runs the attention ("model.layers.0.self_attn.key"; the graph node's name where the
    graph does not record modules), one scale per tensor, symmetric as the config's
    ``kv_cache.is_symmetric`` (else the Attention op's rule). A quantizer placed on the edge into attention
    quantizes every key and value read, cached ones included; with a fixed encoding that equals quantizing
    each once as it enters the cache, so a simulation with and without a cache computes the same."""
    roles = roles if roles is not None else G.classify(gm)
    sym = cfg.kv_symmetric()
    out: list[QuantizerPlacement] = []
    seen: dict[str, int] = {}
    for n in gm.graph.nodes:
        r = roles[n]
        if r.op_type == "Attention" and r.kind == "op":
            base = n
            pairs = [("key", n, n.args[1] if len(n.args) > 1 else n.kwargs.get("key")),
                     ("value", n, n.args[2] if len(n.args) > 2 else n.kwargs.get("value"))]
        elif r.op_type == "Softmax" and r.kind == "op":
            qk, pv = _scores_product(n, roles), _probs_product(n, roles)
            if qk is None or pv is None:
                continue
            base = qk
            pairs = [("key", qk, qk.args[1]), ("value", pv, pv.args[1])]
        else:
            continue
        where = _attention_module(base) or base.name
        if where in seen:  # one module calling attention twice: its calls in order
            seen[where] += 1
            where = f"{where}_{seen[where]}"
        else:
            seen[where] = 0
        for what, op, src in pairs:
            if isinstance(src, fx.Node) and src.meta.get("pq_dtype") in _FLOATS:
                out.append(QuantizerPlacement(f"{where}.{what}", "op_input", "Attention", op.name, sym,
                                              source=src.name))
    return out


def _attention_module(n: fx.Node) -> Optional[str]:
    """The path of the innermost module a torch.export graph node was recorded in (None: not recorded)."""
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def _scores_product(softmax: fx.Node, roles: dict[fx.Node, G.NodeRole]) -> Optional[fx.Node]:
    """The Q K^T MatMul a Softmax's input comes from, through scaling, an additive mask, casts and data
    movement (each taking the scores as its first operand)."""
    cur = softmax.args[0] if softmax.args else None
    for _ in range(8):
        if not isinstance(cur, fx.Node):
            return None
        r = roles.get(cur)
        if r is not None and r.op_type == "MatMul" and cur.op == "call_function" and len(cur.args) >= 2:
            return cur
        if r is None or r.op_type not in ("Mul", "Div", "Add", "Passthrough", None) or not cur.args:
            return None
        cur = cur.args[0]
    return None


def _probs_product(softmax: fx.Node, roles: dict[fx.Node, G.NodeRole]) -> Optional[fx.Node]:
    """The MatMul that multiplies the attention probabilities (a Softmax's output, through casts, dropout and
    data movement) by the values, as its first operand."""
    cur = softmax
    for _ in range(6):
        users = [u for u in cur.users if u.users or u.op == "output"]  # not checks such as metadata asserts
        if len(users) != 1:
            return None
        u = users[0]
        r = roles.get(u)
        if r is not None and r.op_type == "MatMul" and u.op == "call_function" and u.args and u.args[0] is cur:
            return u
        if r is None or r.op_type not in ("Passthrough", None):
            return None
        cur = u
    return None


def _activations(gm: fx.GraphModule, cfg: HardwareConfig, roles: dict[fx.Node, G.NodeRole],
                 middle: set[fx.Node]) -> list[QuantizerPlacement]:
    """Model inputs holding data, and outputs of known ops holding data outside a supergroup's middle: one
    per call site (a module called k times has "<module>.output", "<module>.output_1", ... in call order).
    Parts of a larger op, tensors that are not data-dependent (masks, rotary tables, shapes) and ops the
    simulation does not know get none (graph.classify)."""
    outputs: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            fx.node.map_arg(n.args, outputs.add)
    call_index = _call_index(gm)
    out = []
    for n in gm.graph.nodes:
        role = roles[n]
        t = role.op_type
        is_float = n.meta.get("pq_dtype") in _FLOATS
        if n.op == "placeholder":
            if cfg.model_input_quantized and is_float and role.kind == "input":
                out.append(QuantizerPlacement(f"input.{n.target}", "input", "ModelInput", n.name,
                                              cfg.activation_symmetric("")))
            continue
        if role.kind != "op" or not is_float or n in middle or not cfg.output_quantized(t):
            continue
        if n in outputs and not cfg.model_output_quantized:
            continue
        if n.op == "call_module":
            name = f"{n.target}.output" + (f"_{call_index[n]}" if call_index[n] else "")
        else:
            name = f"{n.name}.output"
        out.append(QuantizerPlacement(name, "output", t, n.name, cfg.activation_symmetric(t),
                                      constraint=cfg.encoding_constraint(t)))
    return out


# Nodes between a quantizer and a layer that leave the layer's input the quantizer's DequantizeLinear output
# in the exported graph: no ONNX node at all (identity, eval-mode dropout, contiguous copies) or one that
# onnxruntime moves a DequantizeLinear across (Reshape, Transpose, Squeeze, Unsqueeze). Flatten is not
# one of them: a Gemm after torch.flatten reads a Flatten, and its bias stays float.
_TRANSPARENT_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_TRANSPARENT_FUNCTIONS = {torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.t,
                          torch.swapaxes, nn.functional.dropout}
_TRANSPARENT_METHODS = {"view", "reshape", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "t",
                        "clone", "detach", "view_as", "reshape_as", "swapaxes"}


def _transparent(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _TRANSPARENT_MODULES)
    if n.op == "call_function":
        return n.target in _TRANSPARENT_FUNCTIONS
    return n.op == "call_method" and n.target in _TRANSPARENT_METHODS


def int32_biases(gm: fx.GraphModule, placed: list[QuantizerPlacement]) -> list[BiasPlacement]:
    """The layers an integer target runs with an int32 bias at scale s_x * s_w (the input's scale times the
    weight's), as onnxruntime's QDQ kernels derive it from the exported graph: a Conv, ConvTranspose or a
    Linear on a 2-d input (an ONNX Gemm; on more dimensions it is MatMul + Add, whose bias stays float),
    called as a module at one call site, with a quantized weight and an input quantized per tensor right
    before it (the quantizer's output reaches the layer through nodes that leave it the DequantizeLinear's
    output: identity, dropout, reshape, transpose, (un)squeeze). Whether the encodings allow it (a weight
    per tensor or per output channel of a Conv/Gemm, enabled quantizers) is decided when the layer runs.
    Layers without a bias are listed too: a bias they gain later (bias correction, folding) is simulated."""
    weights = {p.name for p in placed if p.is_param and p.graph_weight is None}
    after = {p.node: p.name for p in placed if p.kind in ("output", "input")}
    on_edge = {(p.node, p.source): p.name for p in placed if p.kind == "op_input"}
    found: dict[str, list[tuple[str, Optional[str]]]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or f"{n.target}.weight" not in weights:
            continue
        mod = gm.get_submodule(n.target)
        if not isinstance(mod, layers_for("int32_bias")) or len(n.args) != 1 or n.kwargs:
            continue
        x = n.args[0]
        q = None
        if isinstance(x, fx.Node) and not (isinstance(mod, nn.Linear) and x.meta.get("pq_ndim") != 2):
            q = on_edge.get((n.name, x.name))
            src = x
            while q is None and _transparent(gm, src) and src.args and isinstance(src.args[0], fx.Node):
                src = src.args[0]
            q = q or after.get(src.name)
        found.setdefault(n.target, []).append((n.name, q))
    out = []
    for layer, sites in found.items():
        qs = {q for _, q in sites}
        if len(sites) == 1 and None not in qs:  # one call site: one input scale
            out.append(BiasPlacement(layer, sites[0][0], sites[0][1], f"{layer}.weight"))
    return out
