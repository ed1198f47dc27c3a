"""QuantSim: a model with quantizers on its weights, inputs and outputs, calibrated on a few batches,
that predicts on-target accuracy and exports what the target needs (QDQ ONNX + encodings).

Construction: capture the graph (graph.py), plan where quantizers go from the hardware config
(placement.py), install them (weight parametrizations, weights.py; activation quantizer nodes), and
optionally fuse activations into them (fusion.py)."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from .._batches import as_batches, call, iter_batches, reusable
from .._io import atomic_torch_save
from .._layers import BATCH_NORMS, is_transposed, layers_for, weight_axis
from .._progress import Progress
from .._warnings import UnquantizedOpWarning
from ..ops import grid
from ..quant import (RANGE_PARAMS, Encoding, Entropy, LpbqEncoding, LpbqQuantizeDequantize, MinMax, Mse, Percentile,
                     QuantizeDequantize, TfEnhanced, from_range, from_scale_offset, least_error_encoding,
                     lpbq_encoding)
from ..quant.analyzers import EncodingAnalyzer
from . import graph as G
from . import placement as P
from .bias import Int32Bias
from .layerwise_calibration import range_pass, calibrate_layerwise, sync_analyzers
from .config import HardwareConfig, load_config
from . import fusion
from .decoder import attach_generate, graph_example
from .in_place import InPlaceChanges
from .memory import check_copy_fits
from .state_io import QuantizerSnapshot, check_checkpoint, check_encoding_shapes, checkpoint_state, read_checkpoint
from .weights import FoldedWeightQuantizer, WeightQuantizer

# The ops of a torch.export graph that take a bias as their third argument: where `bias(create=True)` adds one.
_BIASED_OPS = {torch.ops.aten.linear.default, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
               torch.ops.aten.conv3d.default, nn.functional.linear, nn.functional.conv1d, nn.functional.conv2d,
               nn.functional.conv3d}

QUANT_SCHEMES = {
    "tf_enhanced": TfEnhanced, "min_max": MinMax, "tf": MinMax, "mse": Mse, "percentile": Percentile,
    "entropy": Entropy,
}

__all__ = ["QuantSim", "QUANT_SCHEMES"]


class QuantSim:
    """Simulates quantized inference (and training) of `model`.

    Args:
        model: the FP32 model. By default it is copied and never modified; with `in_place=True` the
            simulation is built on the model itself (see `in_place`).
        dummy_input: an input (tensor, tuple, or dict for HuggingFace models) used to capture the graph.
        quant_scheme: how encodings are calibrated: "tf_enhanced" (default), "min_max", "mse",
            "percentile" or "entropy" (the last two clip activations; weights then use min/max).
        param_bw / output_bw: bit widths of weights and activations (2..16): W8A8 is (8, 8), W4A16 (4, 16).
            None (default): the first integer kernel of the config's `defaults.supported_kernels` (as AIMET
            reads it), else 8. An argument given always wins over the config.
        config: hardware config: a named profile ("default": per-channel weights, "per_tensor",
            "strict_symmetric_int8"), a JSON path or a dict.
        range_learning: make the encodings trainable after calibration (QAT); otherwise they stay fixed.
        param_quant_scheme: a different scheme for the weights (e.g. "min_max" weights with
            "tf_enhanced" activations); default: `quant_scheme`.
        batchnorm: what a batch norm kept in `model` does to the weight before it: "separate" (default;
            the layer's own weight is quantized, the batch norm runs after it) or "fold_each_step" (QAT
            as deployed: the weight is quantized with the batch norm folded in at its running statistics
            on every forward, the batch norm still normalizing with batch statistics in training).
            Either way, `pq.fold_batchnorms_to_scale(sim)` folds them for good before export.
        range_params: what range learning trains: "minmax" (default; each quantizer's min and max, as
            AIMET does) or "scale_offset" (scale and offset directly, LSQ-style: their gradients come
            straight from the fused kernel, with fewer small ops per quantizer and step); see
            pyquant.quant.range_params.
        fuse_activations: run each ReLU / ReLU6 / Hardtanh and the quantizer after it (and a MaxPool2d
            after that) as one op: the activation is clamped inside the fake-quant kernel, and a max pool of
            non-overlapping windows runs in the same native pass, keeping for the backward only each pooled
            maximum's input value and a byte for its position. A training step then holds one tensor for
            the three ops (QAT memory at or below FP32's). Values and gradients are the separate ops' (the
            range gradients up to summation order). A model input with one channel, quantized and fed to a
            Conv2d, also runs as one node whose range gradient needs no input gradient
            (pyquant.quant.input_conv). The fused nodes leave the graph, so post-training techniques that
            look for them want the default (False).
        unsupported_kernels: what happens when an op's bit widths are not among the kernels the config's
            supported_kernels list for it: "error" (default: a ConfigError naming the op and what the target
            runs) or "nearest" (the op moves to the nearest kernel it runs, with a warning; a float kernel
            leaves the op unquantized).
        int32_bias: simulate biases as integer targets add them (default True): on the int32 grid at scale
            s_x * s_w, the input quantizer's scale times the weight's (per output channel where the weight
            is), for each Conv, ConvTranspose and Linear on a 2-d input (ONNX Gemm) whose input is quantized
            right before it (pyquant.sim.placement.int32_biases says which); onnxruntime's QDQ kernels
            derive the same int32 bias from the export. False keeps every bias in float.
        block_size: quantize the weights of Gemm/MatMul layers (Linear, F.linear, x @ W) per block of
            `block_size` elements along their input dimension, with one scale per output channel and block
            (encoding shape (out, in / block_size)); None (default): the config's `block_size`, else per channel
            or per tensor as the config says. Convolution and embedding weights keep their per-channel or
            per-tensor encodings. A block size that does not divide a layer's input dimension is a ValueError
            naming the weight.
        decompressed_bw: LPBQ (pyquant.quant.lpbq) for the per-block weights: their block scales become one
            float scale per output channel times an integer of `decompressed_bw - param_bw` bits per block
            (e.g. param_bw=4, decompressed_bw=8); None (default): the config's `decompressed_bw`, else float
            block scales. Needs per-block weights (from `block_size` or the config) and symmetric weights.
        kv_bw: bit width (2..16) of quantizers on the keys and values attention reads, what a decoder's
            key/value cache holds: the key and value inputs of each attention op (scaled_dot_product_attention,
            or the second operands of the QK^T and PV products of attention written out), the keys after the
            rotary embedding. One scale per tensor, calibrated like the activations; named
            "<attention module>.key" / ".value", e.g. "model.layers.0.self_attn.key"
            (pyquant.sim.placement.kv_inputs). None
            (default): the config's ``kv_cache.bitwidth``, and no such quantizers when that is unset too.
        kv_cache: capture a transformers language model (a ...ForCausalLM) with its key/value cache as graph
            inputs and outputs (pyquant.sim.decoder), so that `sim.model.generate(...)` runs transformers'
            generation with each step's new token alone through the simulation, the cached keys and values
            read through the key/value quantizers (`kv_bw`). Calls without a cache (calibration, full
            sequences) run the same graph and quantizers with an empty one. Default False: the model is
            captured without its cache (`use_cache=False`) and `sim.model` has no generate().
        in_place: build the simulation on `model` itself instead of a copy (default False). The simulated
            graph then shares the model's parameter tensors, so a simulation costs the model's memory once
            plus its quantizers (what a large language model needs). What it means for `model`: it is put in
            eval mode and prepared for capture (fused modules such as nn.MultiheadAttention / nn.RMSNorm
            run as their ops, with the same parameters and results; a transformers model's config gets
            `use_cache=False` unless `kv_cache=True`), and every technique that changes the simulation's
            weights (batch-norm folding, cross-layer equalization, bias correction, AdaRound, QAT) changes
            the model's weights too. Without it, QuantSim first checks that the copy fits in the free memory
            of the model's device (MemoryError with the bytes needed and available, naming this option).

    After construction, `compute_encodings(forward_fn)` calibrates; `sim.model` then runs simulated
    inference and trains; `export(...)` writes the QDQ ONNX model, the encodings and the weights.

    What other code may use: `model`, `quantizers` / `param_quantizers` / `activation_quantizers`,
    `quantizer(name)`, `placement` (where each quantizer sits: op type, node, kind), `op_type(name)`,
    `weight(name)` / `quantizer_input(name)` / `calibrate_weight(name)` for weight quantizers (a per-block
    weight's blocks: `placement[name].block_size` / `.block_axis`, or the quantizer's `block_size`; LPBQ:
    `placement[name].decompressed_bw`, an `LpbqQuantizeDequantize` quantizer), and the
    batch-norm fold hooks `folds_batchnorm_each_step(name)` / `stop_folding_batchnorm(name)`.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, quant_scheme: str = "tf_enhanced",
                 param_bw: Optional[int] = None, output_bw: Optional[int] = None,
                 config: Union[str, os.PathLike, dict, HardwareConfig] = "default", *,
                 range_learning: bool = False, param_quant_scheme: Optional[str] = None,
                 batchnorm: str = "separate", fuse_activations: bool = False, range_params: str = "minmax",
                 unsupported_kernels: str = "error", int32_bias: bool = True, block_size: Optional[int] = None,
                 decompressed_bw: Optional[int] = None, in_place: bool = False, kv_bw: Optional[int] = None,
                 kv_cache: bool = False):
        if quant_scheme not in QUANT_SCHEMES:
            raise ValueError(f"quant_scheme must be one of {sorted(QUANT_SCHEMES)}, got {quant_scheme!r}")
        self.config = config if isinstance(config, HardwareConfig) else load_config(config)
        cfg_act_bw, cfg_param_bw = self.config.default_bitwidths()
        param_bw = param_bw if param_bw is not None else (cfg_param_bw or 8)
        output_bw = output_bw if output_bw is not None else (cfg_act_bw or 8)
        grid(param_bw, True)
        grid(output_bw, False)
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1):
            raise ValueError(f"block_size must be a positive int (elements per weight scale along the input "
                             f"dimension) or None, got {block_size!r}")
        if decompressed_bw is not None and (isinstance(decompressed_bw, bool) or not isinstance(decompressed_bw, int)
                                            or not param_bw < decompressed_bw <= 16):
            raise ValueError(f"decompressed_bw must be an int in {param_bw + 1}..16 (above param_bw={param_bw}) or "
                             f"None, got {decompressed_bw!r}")
        if param_quant_scheme is not None and param_quant_scheme not in QUANT_SCHEMES:
            raise ValueError(f"param_quant_scheme must be one of {sorted(QUANT_SCHEMES)} or None (same as "
                             f"quant_scheme), got {param_quant_scheme!r}")
        if batchnorm not in ("separate", "fold_each_step"):
            raise ValueError(f"batchnorm must be 'separate' or 'fold_each_step', got {batchnorm!r}")
        if range_params not in RANGE_PARAMS:
            raise ValueError(f"range_params must be one of {sorted(RANGE_PARAMS)}, got {range_params!r}")
        if not isinstance(int32_bias, bool):
            raise TypeError(f"int32_bias must be True or False, got {int32_bias!r}")
        if kv_bw is not None:
            if isinstance(kv_bw, bool) or not isinstance(kv_bw, int) or not 2 <= kv_bw <= 16:
                raise ValueError(f"kv_bw must be None or an integer bit width in 2..16, got {kv_bw!r}")
        if not isinstance(in_place, bool):
            raise TypeError(f"in_place must be True or False, got {in_place!r}")
        if not isinstance(kv_cache, bool):
            raise TypeError(f"kv_cache must be True or False, got {kv_cache!r}")
        self.batchnorm = batchnorm
        self.range_params = range_params
        self.quant_scheme = quant_scheme
        self.param_quant_scheme = param_quant_scheme or quant_scheme
        self.param_bw = param_bw
        self.output_bw = output_bw
        self.kv_bw = kv_bw
        self._dummy_input = dummy_input
        self.in_place = in_place
        if not in_place:
            check_copy_fits(model)
        fp32 = model if in_place else copy.deepcopy(model)
        # in place, a construction refused before the quantizers are installed leaves the model as it was
        undo = InPlaceChanges(model) if in_place else None
        try:
            fp32.eval()
            gm = G.trace(fp32, dummy_input, kv_cache=kv_cache)
            G.propagate_shapes(gm, graph_example(gm, dummy_input))
            if kv_cache:
                attach_generate(gm, fp32)
            self.model: fx.GraphModule = gm
            self.kv_cache = kv_cache
            """Whether the model was captured with its key/value cache (`kv_cache=True`)."""
            self.param_quantizers: dict[str, QuantizeDequantize] = {}
            self.activation_quantizers: dict[str, QuantizeDequantize] = {}
            self.placement: dict[str, P.QuantizerPlacement] = {
                p.name: p for p in P.plan(gm, self.config, param_bw, output_bw, unsupported_kernels, block_size,
                                          decompressed_bw, kv_bw)}
            """Where each quantizer sits (op type, graph node, kind, per-channel axis, block size), by quantizer
            name."""
            if decompressed_bw is not None and not any(p.decompressed_bw for p in self.placement.values()):
                raise ValueError(f"decompressed_bw={decompressed_bw} applies to per-block weights, and no weight "
                                 f"is per block: give block_size (or the config's block_size)")
        except BaseException:
            if undo is not None:
                undo.restore()
            raise
        self.unquantized_ops: list[P.UnquantizedOp] = P.unquantized_ops(gm)
        """Ops the simulation does not know, whose outputs it leaves unquantized (listed by summary())."""
        if self.unquantized_ops:
            names = ", ".join(f"{u.node} ({u.target})" for u in self.unquantized_ops[:5])
            more = f" and {len(self.unquantized_ops) - 5} more" if len(self.unquantized_ops) > 5 else ""
            warnings.warn(f"QuantSim: {len(self.unquantized_ops)} op(s) the simulation does not know are left "
                          f"unquantized: {names}{more}; sim.summary() lists them with the reason",
                          UnquantizedOpWarning, stacklevel=2)
        self.int32_biases: dict[str, P.BiasPlacement] = (
            {b.layer: b for b in P.int32_biases(gm, list(self.placement.values()))} if int32_bias else {})
        """Layers whose bias is simulated on the int32 grid at s_x * s_w, by module name (`bias(layer)`)."""
        self._install()
        for layer in self.int32_biases:
            if gm.get_submodule(layer).bias is not None:
                self._install_int32_bias(layer)
        names = {id(q): n for n, q in self.activation_quantizers.items()}
        self.fused_activations: list[str] = fusion.fuse_activations(gm, names) if fuse_activations else []
        # QAT: encodings are trainable only with range learning (set after calibration)
        self._range_learning = bool(range_learning)
        for q in self.quantizers.values():
            q.set_range_learning(False)
        # Quantizers live where the model's tensors live, so a model built on the GPU simulates there.
        dev = next((t.device for t in fp32.parameters()), None) or next((t.device for t in fp32.buffers()), None)
        if dev is not None and dev.type != "cpu":
            for q in self.quantizers.values():
                q.to(dev)

    # ---- construction -------------------------------------------------------------------------
    def _analyzer(self, shape, param: bool = False) -> EncodingAnalyzer:
        # Percentile and entropy clip outliers of activation distributions; weights, a few hundred
        # values per channel, keep their full range with them.
        scheme = self.param_quant_scheme if param else self.quant_scheme
        if param and scheme in ("percentile", "entropy"):
            return MinMax(shape)
        return QUANT_SCHEMES[scheme](shape)

    def _new_quantizer(self, p: P.QuantizerPlacement) -> QuantizeDequantize:
        shape = p.shape
        if p.decompressed_bw is not None:
            q = LpbqQuantizeDequantize(shape, p.bitwidth, p.decompressed_bw, p.quantizer_block_size,
                                       self._analyzer(shape, param=True), name=p.name, strict=p.strict)
            q.enabled = p.enabled
            return q
        q = QuantizeDequantize(shape, p.bitwidth, p.symmetric, self._analyzer(shape, param=p.is_param),
                               p.quantizer_block_size, name=p.name, range_params=self.range_params, strict=p.strict,
                               unsigned_symmetric=p.unsigned_symmetric)
        q.enabled = p.enabled
        return q

    def _install(self) -> None:
        """One quantizer per planned placement: weight parametrizations on modules, quantizer nodes after
        torch.export graph weights and after quantized activations."""
        gm = self.model
        nodes = {n.name: n for n in gm.graph.nodes}
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        n_weights = n_acts = n_inputs = 0
        for p in self.placement.values():
            q = self._new_quantizer(p)
            node = nodes[p.node]
            if p.is_param and p.graph_weight is None:
                mod = gm.get_submodule(node.target)
                bn = self._following_batchnorm(node) if self.batchnorm == "fold_each_step" else None
                wq = FoldedWeightQuantizer(q, bn, weight_axis(mod)) if bn is not None else WeightQuantizer(q)
                parametrize.register_parametrization(mod, "weight", wq, unsafe=True)
            elif p.is_param:
                w_node = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == p.graph_weight)
                qn = self._insert_after(w_node, f"_pq_w_{n_weights}", q)
                # Quantized where it is first read, not with the attributes at the top of the graph: the
                # generated forward frees each quantized weight after its last use, so a forward holds a few
                # quantized weights at a time, not a quantized copy of the model.
                first = min(qn.users, key=lambda u: order[u], default=None)
                if first is not None:
                    first.prepend(qn)
                n_weights += 1
            elif p.kind == "op_input":  # on the edge source -> op only
                src = nodes[p.source]
                gm.add_submodule(f"_pq_in_{n_inputs}", q)
                with gm.graph.inserting_before(node):
                    qn = gm.graph.call_module(f"_pq_in_{n_inputs}", (src,))
                qn.meta["pq_dtype"] = src.meta.get("pq_dtype")
                node.replace_input_with(src, qn)
                n_inputs += 1
            else:
                qn = self._insert_after(node, f"_pq_act_{n_acts}", q)
                qn.meta["pq_dtype"] = node.meta.get("pq_dtype")
                n_acts += 1
            (self.param_quantizers if p.is_param else self.activation_quantizers)[p.name] = q
        gm.graph.lint()
        gm.recompile()

    def _install_int32_bias(self, layer: str) -> None:
        mod = self.model.get_submodule(layer)
        qx = self.activation_quantizers[self.int32_biases[layer].input_quantizer]
        parametrize.register_parametrization(mod, "bias", Int32Bias(mod, qx), unsafe=True)

    def _insert_after(self, node: fx.Node, qname: str, q: QuantizeDequantize) -> fx.Node:
        gm = self.model
        gm.add_submodule(qname, q)
        with gm.graph.inserting_after(node):
            qn = gm.graph.call_module(qname, (node,))
        node.replace_all_uses_with(qn, delete_user_cb=lambda u: u is not qn)
        return qn

    def _following_batchnorm(self, n: fx.Node) -> Optional[nn.Module]:
        """The batch norm that directly and solely consumes layer node `n`'s output, if any."""
        users = list(n.users)
        if len(users) != 1 or users[0].op != "call_module":
            return None
        mod = self.model.get_submodule(users[0].target)
        layer = self.model.get_submodule(n.target)
        ok = (isinstance(mod, BATCH_NORMS) and mod.track_running_stats
              and isinstance(layer, layers_for("fold_each_step")))
        grouped_t = is_transposed(layer) and layer.groups != 1
        return mod if ok and not grouped_t else None

    # ---- the quantizers -----------------------------------------------------------------------
    @property
    def quantizers(self) -> dict[str, QuantizeDequantize]:
        """Every quantizer by name: '<module>.weight', '<op>.output', 'input.<name>'."""
        return {**self.param_quantizers, **self.activation_quantizers}

    def quantizer(self, name: str) -> QuantizeDequantize:
        """The quantizer called `name` (KeyError naming a few valid names otherwise)."""
        q = self.param_quantizers.get(name)
        q = self.activation_quantizers.get(name) if q is None else q
        if q is None:
            raise KeyError(f"no quantizer named {name!r}; names look like {list(self.quantizers)[:4]}")
        return q

    def op_type(self, name: str) -> str:
        """The ONNX op type of the op quantizer `name` belongs to ("ModelInput" for a model input)."""
        p = self.placement.get(name)
        if p is None:
            self.quantizer(name)  # raises the KeyError
        return p.op_type

    @property
    def op_types(self) -> dict[str, str]:
        """Quantizer name -> ONNX op type, for every quantizer."""
        return {n: p.op_type for n, p in self.placement.items()}

    # ---- weights ------------------------------------------------------------------------------
    def _param(self, name: str) -> P.QuantizerPlacement:
        p = self.placement.get(name)
        if p is None or not p.is_param:
            raise KeyError(f"no weight quantizer named {name!r}; weight quantizers: {list(self.param_quantizers)[:4]}")
        return p

    def _parametrization(self, name: str) -> Optional[WeightQuantizer]:
        p = self._param(name)
        if p.graph_weight is not None:
            return None
        return self.model.get_submodule(name.rsplit(".", 1)[0]).parametrizations.weight[0]

    def weight(self, name: str) -> torch.Tensor:
        """The FP32 weight behind weight quantizer `name` (the parameter itself: change it in place under
        torch.no_grad() to change the model)."""
        p = self._param(name)
        if p.graph_weight is not None:
            return G.get_attr(self.model, p.graph_weight)
        return self.model.get_submodule(name.rsplit(".", 1)[0]).parametrizations.weight.original

    def bias(self, layer: str, create: bool = False) -> Optional[nn.Parameter]:
        """The float bias parameter of module `layer` (behind its int32 simulation where it has one: change it
        in place under torch.no_grad() to change the model), or None when the layer has no bias. With
        `create`, a layer without one first gets a zero bias, simulated like the layer's others would be."""
        mod = self.model.get_submodule(layer)
        params = getattr(mod, "parametrizations", None)
        if params is not None and "bias" in params:
            return params.bias.original
        graph_layer = self.placement.get(f"{layer}.weight")
        if graph_layer is not None and graph_layer.graph_weight is not None:  # a torch.export graph's layer
            bias = getattr(mod, "bias", None)
            return self._add_graph_bias(layer, graph_layer) if bias is None and create else bias
        if mod.bias is None and create:
            w = params.weight.original if params is not None and "weight" in params else mod.weight
            n = w.shape[1] * getattr(mod, "groups", 1) if is_transposed(mod) else w.shape[0]
            mod.bias = nn.Parameter(torch.zeros(n, device=w.device, dtype=w.dtype))
            if layer in self.int32_biases:
                self._install_int32_bias(layer)
                return mod.parametrizations.bias.original
        return mod.bias

    def _add_graph_bias(self, layer: str, p: P.QuantizerPlacement) -> nn.Parameter:
        """A zero bias `<layer>.bias` given to the one linear or convolution op of the graph that reads the
        layer's weight (a torch.export graph's layer without a bias)."""
        gm = self.model
        node = next(n for n in gm.graph.nodes if n.name == p.node)
        w_in = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        readers = len(w_in.users) if isinstance(w_in, fx.Node) else 0
        if node.op != "call_function" or node.target not in _BIASED_OPS or readers != 1:
            raise ValueError(f"layer {layer!r}: a bias can be added only where one linear or convolution op reads "
                             f"the weight; {p.name} is read by {readers} node(s) ({node.target})")
        w = self.weight(p.name)
        bias = nn.Parameter(torch.zeros(w.shape[p.output_axis or 0], device=w.device, dtype=w.dtype))
        gm.get_submodule(layer).register_parameter("bias", bias)
        with gm.graph.inserting_before(node):
            b_node = gm.graph.get_attr(f"{layer}.bias")
        if "bias" in node.kwargs:
            node.update_kwarg("bias", b_node)
        elif len(node.args) > 2:
            node.update_arg(2, b_node)
        else:
            node.args = tuple(node.args) + (b_node,)
        gm.graph.lint()
        gm.recompile()
        return bias

    @contextlib.contextmanager
    def _float_biases(self):
        """Biases in float inside the block (calibration: the input quantizers observe and pass their input)."""
        mods = [m for m in self.model.modules() if isinstance(m, Int32Bias)]
        for m in mods:
            m.active = False
        try:
            yield
        finally:
            for m in mods:
                m.active = True

    def quantizer_input(self, name: str) -> torch.Tensor:
        """What weight quantizer `name` quantizes: the weight, or with batchnorm="fold_each_step" the
        weight with its batch norm folded in."""
        w = self.weight(name)
        wq = self._parametrization(name)
        return wq.quantizer_input(w) if wq is not None else w

    def calibrate_weight(self, name: str) -> None:
        """(Re)computes weight quantizer `name`'s encoding from its weight (a frozen one is kept). With a
        histogram scheme each channel keeps the scheme's encoding unless round-to-nearest over the channel's
        full range reconstructs the weight with a smaller squared error (pyquant.quant.least_error_encoding)."""
        q = self.param_quantizers[self._param(name).name]
        w = self.quantizer_input(name)
        with torch.no_grad(), q.compute_encodings():
            q(w)
        if not q.frozen and not isinstance(q.encoding_analyzer, MinMax):
            # A histogram search scores ranges on bin centres, which for a weight's few values per channel is
            # not the real error; the weight itself is at hand, so keep the search's range wherever it is at
            # least as good and round to nearest over the full range where that is better.
            with torch.no_grad():
                q.set_encoding(least_error_encoding(w.detach(), q.get_encoding()))
        # the weight is all the data there is: its statistics are not needed again (a language model's
        # embedding table keeps a 512-bin histogram per row: a GiB)
        q.encoding_analyzer.reset()

    def folds_batchnorm_each_step(self, name: str) -> bool:
        """Whether weight quantizer `name` folds its batch norm in on every forward (fold_each_step)."""
        return isinstance(self._parametrization(name), FoldedWeightQuantizer)

    def stop_folding_batchnorm(self, name: str) -> None:
        """Weight quantizer `name` quantizes the weight as it is from now on (call it once the batch norm
        has been folded into the weight: the encoding already describes the folded weight)."""
        wq = self._parametrization(name)
        if isinstance(wq, FoldedWeightQuantizer):
            self.model.get_submodule(name.rsplit(".", 1)[0]).parametrizations.weight[0] = WeightQuantizer(wq.q)

    # ---- calibration --------------------------------------------------------------------------
    def compute_encodings(self, forward_fn: Union[Callable[[nn.Module], Any], Iterable],
                          forward_pass_callback_args: Any = None, *, progress: Optional[bool] = None,
                          layerwise: Union[bool, str] = False, process_group: Any = None) -> None:
        """Calibrates: weights first (from the weights themselves), then activations, observed while
        `forward_fn(sim.model)` (or `forward_fn(sim.model, args)`) runs the calibration data with the
        weights already quantized. `forward_fn` may also be the data itself (a tensor, a data loader or
        any iterable of batches, see pyquant._batches), then shown with a progress bar on a terminal.

        `layerwise`: calibrate one block of the model's repeated stack at a time (a transformer's decoder
        layers; True finds the stack, a string names its path, e.g. "model.layers"), each block on its
        inputs as the simulation computes them, the blocks before it already quantized; memory stays at the
        model plus the values between two blocks for every batch (pyquant.sim.layerwise_calibration). Needs
        the data itself, not a callback.

        `process_group`: a torch.distributed group whose ranks each calibrate on their share of the data (the
        same call on every rank); the statistics are all-reduced before the encodings are computed, so every
        rank ends with the encodings of one process over all the data (histogram-based schemes then observe
        in two passes over the data, ranges first, so that the counts add up exactly)."""
        if not isinstance(layerwise, (bool, str)):
            raise TypeError(f"layerwise must be True, False or the path of the block stack, got {layerwise!r}")
        for name, q in self.param_quantizers.items():
            if q.enabled:
                self.calibrate_weight(name)
        constrained = {n: p.constraint for n, p in self.placement.items() if p.constraint is not None}
        fixed = {n for n, (lo, hi) in constrained.items() if lo is not None and hi is not None}
        for n in fixed:  # a fully fixed range (e.g. Softmax in [0, 1]) needs no data
            q = self.activation_quantizers[n]
            lo, hi = constrained[n]
            q.set_encoding(from_range(torch.tensor(lo), torch.tensor(hi), q.bitwidth, q.symmetric, signed=q.signed,
                                      strict=q.strict))
        acts = {n: q for n, q in self.activation_quantizers.items() if q.enabled and n not in fixed}

        def constrain(names: Iterable[str]) -> None:  # one side fixed by the config, the other calibrated
            for n in names:
                if n not in constrained or n in fixed:
                    continue
                q = self.activation_quantizers[n]
                if q.enabled and q.has_encoding and not q.frozen:
                    enc = q.get_encoding()
                    lo, hi = constrained[n]
                    q.set_encoding(from_range(enc.min if lo is None else torch.full_like(enc.min, lo),
                                              enc.max if hi is None else torch.full_like(enc.max, hi),
                                              q.bitwidth, q.symmetric, signed=q.signed, strict=q.strict))

        if layerwise is not False:
            if self.kv_cache:
                raise ValueError("compute_encodings(layerwise=...) cuts the graph at its block stack, which a "
                                 "simulation captured with kv_cache=True threads its cache through; calibrate it "
                                 "with layerwise=False (its peak memory is the model's plus one batch's activations)")
            if callable(forward_fn):
                raise TypeError("compute_encodings(layerwise=...) needs the calibration data (a tensor or an "
                                "iterable of batches), not a callback: it runs the model block by block itself")
            batches = as_batches(forward_fn, batch_size=None, what="forward_fn")
            calibrate_layerwise(self.model, batches, acts, stack=None if layerwise is True else layerwise,
                                process_group=process_group, progress=progress, finish=constrain,
                                float_biases=self._float_biases)
        else:
            if process_group is not None:
                forward_fn = reusable(forward_fn)
            with contextlib.ExitStack() as stack:
                for q in acts.values():
                    stack.enter_context(q.compute_encodings(disable_if_unused=True))
                stack.enter_context(self._float_biases())
                with torch.no_grad():
                    if process_group is not None:
                        named = [(n, q.encoding_analyzer) for n, q in acts.items()]
                        if any(hasattr(a, "update_range") for _, a in named):
                            with range_pass([a for _, a in named]):  # two passes: ranges, then counts
                                self._run(forward_fn, forward_pass_callback_args, progress)
                            sync_analyzers(named, process_group, ranges=True)
                    self._run(forward_fn, forward_pass_callback_args, progress)
                    if process_group is not None:
                        sync_analyzers(named, process_group)
            constrain(constrained)
        unseen = [n for n, q in acts.items() if not q.enabled]
        if unseen:
            warnings.warn(f"QuantSim: {len(unseen)} quantizer(s) saw no data during calibration and were "
                          f"disabled: {', '.join(unseen[:8])}{' ...' if len(unseen) > 8 else ''}", RuntimeWarning,
                          stacklevel=2)
        if self._range_learning:
            self.set_range_learning(True, lsq_grad_scale=any(getattr(q, "lsq_grad_scale", False)
                                                             for q in self.quantizers.values()))

    def _run(self, forward_fn, args, progress) -> None:
        if callable(forward_fn):
            forward_fn(self.model) if args is None else forward_fn(self.model, args)
            return
        bar = Progress(len(forward_fn) if hasattr(forward_fn, "__len__") else None, "calibrating", progress)
        for i, b in enumerate(iter_batches(forward_fn, batch_size=None, what="forward_fn")):  # labels dropped
            try:
                call(self.model, b)
            except (IndexError, RuntimeError) as exc:
                raise _lookup_error(exc, b, i) from exc
            bar.update()
        bar.close()

    # ------------------------------------------------------------------------------------------
    def set_bitwidth(self, name: str, bitwidth: int) -> None:
        """Overrides one quantizer's bit width (recompute or reload its encoding afterwards)."""
        q = self.quantizer(name)
        grid(bitwidth, q.signed, strict=q.strict)
        if isinstance(q, LpbqQuantizeDequantize) and not q.decompressed_bw - 15 <= bitwidth < q.decompressed_bw:
            raise ValueError(f"{name!r}: an LPBQ weight's bit width must stay below its decompressed_bw "
                             f"{q.decompressed_bw} (by 1..15 bits), got {bitwidth}")
        q.bitwidth = bitwidth
        q.reset_encoding()

    def enable(self, name: str, enabled: bool = True) -> None:
        """Switches one quantizer on or off (off: its input passes unchanged, as in FP32)."""
        self.quantizer(name).enabled = enabled

    def encodings(self) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
        """(activation encodings, param encodings) of the enabled, calibrated quantizers."""
        act = {n: q.get_encoding() for n, q in self.activation_quantizers.items() if q.enabled and q.get_encoding()}
        par = {n: q.get_encoding() for n, q in self.param_quantizers.items() if q.enabled and q.get_encoding()}
        return act, par

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's FP32 weights, biases and buffers under the model's own names (copies, without the
        quantizers' state): what a target loads beside the encodings (`export` writes it as `<prefix>.pth`)."""
        return {k.replace("parametrizations.weight.original", "weight").replace("parametrizations.bias.original",
                                                                              "bias"): v.detach().clone()
                for k, v in self.model.state_dict().items()
                if "_pq_act_" not in k and ".parametrizations.weight.0." not in k}

    # ---- quantization-aware training -----------------------------------------------------------
    def quantizer_parameters(self) -> list[nn.Parameter]:
        """The encoding parameters (min/max, or scale/offset) of every quantizer, for an optimizer group
        of their own (range learning usually wants a different learning rate from the weights)."""
        out: list[nn.Parameter] = []
        for q in self.quantizers.values():
            out += [p for p in q.parameters(recurse=False)]
        return out

    def model_parameters(self) -> list[nn.Parameter]:
        """The model's own parameters (weights, biases, batch norms), without the quantizers'."""
        qp = {id(p) for p in self.quantizer_parameters()}
        return [p for p in self.model.parameters() if id(p) not in qp]

    def set_range_learning(self, enabled: bool = True, *, lsq_grad_scale: bool = False,
                           names: Optional[Iterable[str]] = None) -> None:
        """Range learning on (the calibrated quantizers' encodings become trainable, the LSQ gradient
        scale optionally applied) or off (fixed ranges: the encodings stay as calibrated; gradients
        still pass the rounding straight through). Frozen quantizers stay fixed either way."""
        for name in (names if names is not None else self.quantizers):
            self.quantizer(name).set_range_learning(enabled, lsq_grad_scale=bool(lsq_grad_scale) if enabled else None)

    def freeze(self, name: Optional[str] = None) -> None:
        """Freeze one quantizer's encoding (or all): no range learning, no recalibration."""
        for q in ([self.quantizer(name)] if name is not None else self.quantizers.values()):
            q.freeze()

    def unfreeze(self, name: Optional[str] = None) -> None:
        """Releases one frozen quantizer's encoding (or all): range learning and recalibration change it again."""
        for q in ([self.quantizer(name)] if name is not None else self.quantizers.values()):
            q.unfreeze()

    def save_checkpoint(self, path: Union[str, os.PathLike], optimizer: Optional[torch.optim.Optimizer] = None,
                        **extra: Any) -> None:
        """Saves the simulated model's state (weights, encodings, trainable quantizer parameters and the
        quantizers' flags), an optimizer's state and any extra values, atomically. Everything is saved as
        tensors and plain values (an extra value of another kind is a TypeError), so that the file reads
        back without unpickling objects."""
        atomic_torch_save(checkpoint_state(self.model, self.quantizers, optimizer, extra), path)

    def load_checkpoint(self, path: Union[str, os.PathLike],
                        optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, Any]:
        """Restores what save_checkpoint wrote (into this simulation of the same model); returns the
        extra values.

        The file is read as tensors and plain values only: one holding other objects (which unpickling
        could turn into running code) raises `pyquant.UnsafeFileError`. The load is all or nothing: the
        whole file is checked against this simulation and `optimizer` first (`pyquant.CheckpointError`, a
        ValueError, naming the first mismatch or invalid value: bit widths, non-finite or non-positive scales), and a failure while applying it puts the quantizers back as they were."""
        where = f"checkpoint {os.fspath(path)!r}"
        state = read_checkpoint(path)
        check_checkpoint(state, self.model, self.quantizers, optimizer, where)
        snapshot = QuantizerSnapshot(self.quantizers)
        try:
            for n, f in state["quantizers"].items():
                self.quantizer(n).load_state_flags(f)
            self.model.load_state_dict(state["model"])
            if optimizer is not None and state["optimizer"] is not None:
                optimizer.load_state_dict(state["optimizer"])
        except BaseException:
            snapshot.restore()
            raise
        return state["extra"]

    def summary(self, file=None) -> str:
        """A table of every quantizer: name, op type, bits, symmetry, granularity, encoding; then the layers
        whose bias is simulated on the int32 grid, and the ops the simulation does not know, left
        unquantized, each with the reason."""
        rows = [("name", "op", "bw", "sym", "granularity", "enabled", "scale", "offset")]
        for name, q in self.quantizers.items():
            enc = q.get_encoding()
            if enc is None:
                sc = off = "-"
                gran = ("per_block" if q.block_size is not None else
                        "per_channel" if any(s > 1 for s in q.shape) else "per_tensor")
            else:
                s = enc.scale.flatten()
                o = enc.offset.flatten()
                sc = f"{float(s[0]):.4g}" if s.numel() == 1 else f"[{float(s.min()):.3g}..{float(s.max()):.3g}]"
                off = f"{int(o[0])}" if o.numel() == 1 else f"[{int(o.min())}..{int(o.max())}]"
                gran = enc.granularity
            if q.block_size is not None:  # e.g. "per_block 32" or "lpbq 32 (8-bit)"
                gran = (f"lpbq {max(q.block_size)} ({q.decompressed_bw}-bit)" if isinstance(q, LpbqQuantizeDequantize)
                        else f"per_block {max(q.block_size)}")
            rows.append((name, self.op_type(name), str(q.bitwidth), "sym" if q.symmetric else "asym",
                         gran, "yes" if q.enabled else "no", sc, off))
        text = _table(rows)
        if self.int32_biases:
            text += (f"\n\nbiases on the int32 grid at s_x * s_w ({len(self.int32_biases)} layers): "
                     + ", ".join(self.int32_biases))
        if self.unquantized_ops:
            text += "\n\nunquantized (ops the simulation does not know: no quantizer is guessed for them)\n"
            text += _table([("node", "calls", "reason")] + [(u.node, u.target, u.reason) for u in self.unquantized_ops])
        print(text, file=file or sys.stdout)
        return text

    # ------------------------------------------------------------------------------------------
    def load_encodings(self, path: Union[str, os.PathLike], strict: bool = True) -> None:
        """Sets the quantizers' encodings from an encodings file (versions 0.6.1, 1.0.0 and 2.0.0).

        All or nothing: the whole file is read and checked first (`EncodingsError` naming the entry;
        with `strict`, a KeyError for names no quantizer has; a ValueError for an encoding with the wrong
        number of scales), and a quantizer that refuses its encoding while they are set (ValueError) puts
        every quantizer back as it was."""
        from .encodings import load_encodings
        where = f"encodings file {os.fspath(path)!r}"
        act, par = load_encodings(path, param_names=list(self.param_quantizers))
        pairs = [(name, enc, quants[name]) for table, quants in ((act, self.activation_quantizers),
                                                                  (par, self.param_quantizers))
                 for name, enc in table.items() if name in quants]
        missing = [n for n in act if n not in self.activation_quantizers] + \
            [n for n in par if n not in self.param_quantizers]
        if missing and strict:
            raise KeyError(f"{where}: encodings for unknown quantizers: {missing[:8]}")
        check_encoding_shapes(((n, e) for n, e, _ in pairs), self.quantizers, where)
        snapshot = QuantizerSnapshot({n: q for n, _, q in pairs})
        try:
            for _, enc, q in pairs:
                q.adopt_grid(enc)
                q.set_encoding(_reshape_encoding(enc, q.shape))
        except BaseException:
            snapshot.restore()
            raise

    def export(self, path: Union[str, os.PathLike], filename_prefix: str, dummy_input: Any = None, *,
               encoding_version: str = "1.0.0", opset_version: Optional[int] = None,
               onnx_format: str = "qdq", external_data: Optional[bool] = None) -> dict[str, Path]:
        """Writes `<prefix>.onnx`, `<prefix>.encodings` (AIMET-compatible JSON, `encoding_version` 1.0.0,
        2.0.0 or 0.6.1) and `<prefix>.pth` (the FP32 weights under the model's names), each atomically,
        after everything has been built and checked.

        `onnx_format`: "qdq" (default) writes every enabled quantizer as QuantizeLinear/DequantizeLinear
        (8-bit per tensor or per channel at opset 13; 4- and 16-bit grids and per-block weights at 21;
        other bit widths as the next wider type with a Clip of the codes) and the encodings under the
        quantizers' names; "plain" writes the FP32 graph without quantization nodes and the encodings
        keyed by the graph's tensor names (activations by their producer's output, weights by their
        initializer), as targets that take encodings read them. `opset_version`: None (default) for the
        lowest opset that expresses the model, or 13..21 (lower than a quantizer needs: ValueError naming
        it). `external_data`: write the ONNX initializers to `<prefix>.onnx.data` beside the model (None, the
        default: when they exceed 1.5 GiB, as a model beyond protobuf's 2 GiB needs; the path is then
        returned under "onnx_data"). Returns the paths by kind ("onnx", "encodings", "pth"); `.opset` is the
        opset written."""
        from .._io import atomic_write_text
        from .encodings import VERSIONS, encodings_to_json
        from .export import ExportPaths, build_onnx, check_export_args, save_onnx
        check_export_args(onnx_format, opset_version)
        if encoding_version not in VERSIONS:
            raise ValueError(f"encoding_version must be one of {', '.join(VERSIONS)}, got {encoding_version!r}")
        if not isinstance(filename_prefix, str) or not filename_prefix or any(
                sep in filename_prefix for sep in (os.sep, os.altsep) if sep):
            raise ValueError(f"filename_prefix must be a non-empty file name without a folder, got {filename_prefix!r}")
        unfolded = [n for n in self.param_quantizers if self.folds_batchnorm_each_step(n)]
        if unfolded:
            raise RuntimeError(f"export: the weights of {unfolded[:3]} are quantized with their batch norms folded "
                               f"in (batchnorm='fold_each_step'); fold them first: pq.fold_batchnorms_to_scale(sim)")
        out = Path(path)
        dummy = self._dummy_input if dummy_input is None else dummy_input
        onnx_model = build_onnx(self, dummy, opset_version=opset_version, onnx_format=onnx_format)
        if onnx_format == "plain":  # keyed by the graph's tensor names
            act, par = onnx_model.activation_encodings, onnx_model.param_encodings
        else:
            act, par = self.encodings()
        text = encodings_to_json(act, par, version=encoding_version,
                                 quantizer_args={"activation_bitwidth": self.output_bw,
                                                 "param_bitwidth": self.param_bw, "quant_scheme": self.quant_scheme})
        state = self.fp32_state_dict()
        out.mkdir(parents=True, exist_ok=True)
        paths = ExportPaths({"encodings": out / f"{filename_prefix}.encodings", "onnx": out / f"{filename_prefix}.onnx",
                             "pth": out / f"{filename_prefix}.pth"}, opset=onnx_model.opset, onnx_format=onnx_format)
        atomic_write_text(paths["encodings"], text)
        data = save_onnx(onnx_model.model, paths["onnx"], external_data)
        if data is not None:
            paths["onnx_data"] = data
        atomic_torch_save(state, paths["pth"])
        return paths


def _lookup_error(exc: BaseException, batch: Any, i: int) -> BaseException:
    """An embedding lookup past its table (token ids from another tokenizer than the model's) as a ValueError
    naming the batch and the largest id; any other error as it is."""
    text = str(exc).lower()
    if not ("index" in text and "out of" in text):
        return exc
    ids = [t for t in (batch.values() if isinstance(batch, dict) else batch)
           if torch.is_tensor(t) and not t.is_floating_point() and t.numel()]
    top = max((int(t.max()) for t in ids), default=None)
    return ValueError(f"calibration batch {i}: an index lookup failed ({str(exc).splitlines()[0]})"
                      + (f"; its largest integer input is {top}: token ids from another tokenizer than the model's "
                         "are beyond its embedding table" if top is not None else ""))


def _table(rows: list[tuple[str, ...]]) -> str:
    """Rows as left-aligned columns, the header underlined."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _reshape_encoding(enc: Encoding, shape) -> Encoding:
    if isinstance(enc, LpbqEncoding):
        n = enc.int_scale.reshape(shape) if enc.int_scale.numel() == max(1, math.prod(shape)) else enc.int_scale
        ax = next((d for d, b in enumerate(enc.block_size or ()) if b > 1), None)
        c = enc.per_channel_scale.reshape([1 if d == ax else k for d, k in enumerate(n.shape)]) \
            if ax is not None and n.dim() == len(enc.block_size) else enc.per_channel_scale
        return lpbq_encoding(c, n, enc.bitwidth, enc.decompressed_bw, enc.block_size, strict=enc.strict)
    s = enc.scale.reshape(shape) if enc.scale.numel() == max(1, math.prod(shape)) else enc.scale
    o = enc.offset.reshape(shape) if enc.offset.numel() == max(1, math.prod(shape)) else enc.offset
    return from_scale_offset(s, o, enc.bitwidth, enc.symmetric, enc.block_size)
