"""QuantSim: a model with quantizers on its weights, inputs and outputs, calibrated on a few batches,
that predicts on-target accuracy and exports what the target needs (QDQ ONNX + encodings)."""
from __future__ import annotations

import contextlib
import math
import copy
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from .._io import atomic_torch_save
from .._progress import Progress
from ..quant import (Encoding, Entropy, MinMax, Mse, Percentile, QuantizeDequantize, TfEnhanced, from_range)
from ..quant.analyzers import EncodingAnalyzer
from ..quant.input_conv import can_fuse_input_conv, quantized_input_conv
from . import graph as G
from .config import HardwareConfig, load_config
from .staged import batch_args

QUANT_SCHEMES = {
    "tf_enhanced": TfEnhanced, "min_max": MinMax, "tf": MinMax, "mse": Mse, "percentile": Percentile,
    "entropy": Entropy,
}

__all__ = ["QuantSim", "QUANT_SCHEMES"]


class _WeightQuantizer(nn.Module):
    """Parametrization that fake-quantizes a module's weight on every access."""

    def __init__(self, q: QuantizeDequantize):
        super().__init__()
        self.q = q

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.q(w)


class _FoldedWeightQuantizer(nn.Module):
    """Parametrization for QAT with batch norms kept: quantizes the weight as it will be deployed, with
    the following batch norm folded in at its current running statistics, then divides the factor back
    out so the batch norm itself still runs (batch statistics in training, running ones in eval).
    In eval mode the layer + batch norm compute exactly conv(x, q(w * f)) + shift, the folded target."""

    def __init__(self, q: QuantizeDequantize, bn: nn.Module, axis: int):
        super().__init__()
        self.q = q
        self.axis = axis
        object.__setattr__(self, "bn", bn)  # not a submodule: the model owns it (no duplicate state)

    def factor(self, w: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        sigma = torch.sqrt(bn.running_var + bn.eps)  # the formula the final fold uses: the same weights
        f = bn.weight / sigma if bn.affine else 1.0 / sigma
        f = torch.where(f == 0, torch.ones_like(f), f)  # a dead channel: nothing to undo
        shape = [1] * w.dim()
        shape[self.axis] = -1
        return f.reshape(shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        f = self.factor(w)
        return self.q(w * f) / f


class QuantSim:
    """Simulates quantized inference (and training) of `model`.

    Args:
        model: the FP32 model; it is copied, never modified.
        dummy_input: an input (tensor, tuple, or dict for HuggingFace models) used to capture the graph.
        quant_scheme: how encodings are calibrated: "tf_enhanced" (default), "min_max", "mse",
            "percentile" or "entropy" (the last two clip activations; weights then use min/max).
        param_bw / output_bw: bit widths of weights and activations (2..16).
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
            straight from the fused kernel, with fewer small ops per quantizer and step).
        fuse_activations: run each ReLU / ReLU6 / Hardtanh and the quantizer after it (and a MaxPool2d
            after that) as one op: the activation is clamped inside the fake-quant kernel, and a max pool of
            non-overlapping windows runs in the same native pass, keeping for the backward only each pooled
            maximum's input value and a byte for its position. A training step then holds one tensor for
            the three ops (QAT memory at or below FP32's). Values and gradients are the separate ops' (the
            range gradients up to summation order). A model input with one channel, quantized and fed to a
            Conv2d, also runs as one node whose range gradient needs no input gradient
            (pyquant.quant.input_conv). The fused nodes leave the graph, so post-training techniques that
            look for them want the default (False).

    After construction, `compute_encodings(forward_fn)` calibrates; `sim.model` then runs simulated
    inference and trains; `export(...)` writes the QDQ ONNX model, the encodings and the weights.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, quant_scheme: str = "tf_enhanced", param_bw: int = 8,
                 output_bw: int = 8, config: Union[str, os.PathLike, dict, HardwareConfig] = "default", *,
                 range_learning: bool = False, param_quant_scheme: Optional[str] = None,
                 batchnorm: str = "separate", fuse_activations: bool = False, range_params: str = "minmax"):
        if quant_scheme not in QUANT_SCHEMES:
            raise ValueError(f"quant_scheme must be one of {sorted(QUANT_SCHEMES)}, got {quant_scheme!r}")
        from ..ops import grid
        grid(param_bw, True)
        grid(output_bw, False)
        if param_quant_scheme is not None and param_quant_scheme not in QUANT_SCHEMES:
            raise ValueError(f"param_quant_scheme must be one of {sorted(QUANT_SCHEMES)} or None (same as "
                             f"quant_scheme), got {param_quant_scheme!r}")
        if batchnorm not in ("separate", "fold_each_step"):
            raise ValueError(f"batchnorm must be 'separate' or 'fold_each_step', got {batchnorm!r}")
        self.batchnorm = batchnorm
        if range_params not in ("minmax", "scale_offset"):
            raise ValueError(f"range_params must be 'minmax' or 'scale_offset', got {range_params!r}")
        self.range_params = range_params
        self.quant_scheme = quant_scheme
        self.param_quant_scheme = param_quant_scheme or quant_scheme
        self.param_bw = param_bw
        self.output_bw = output_bw
        self.config = config if isinstance(config, HardwareConfig) else load_config(config)
        self._dummy_input = dummy_input
        fp32 = copy.deepcopy(model)
        fp32.eval()
        gm = G.trace(fp32, dummy_input)
        G.propagate_shapes(gm, dummy_input)
        self.model: fx.GraphModule = gm
        self.param_quantizers: dict[str, QuantizeDequantize] = {}
        self.activation_quantizers: dict[str, QuantizeDequantize] = {}
        self._op_types: dict[str, str] = {}
        self._constraints: dict[str, tuple[float, float]] = {}
        self._graph_weights: dict[str, str] = {}  # quantizer name -> parameter (torch.export graphs)
        self._place_quantizers()
        self.fused_activations: list[str] = self._fuse_activations() if fuse_activations else []
        # QAT: encodings are trainable only with range learning (set after calibration)
        self._range_learning = bool(range_learning)
        for q in self.quantizers.values():
            for p in q._encoding_params():
                p.requires_grad_(False)
        # Quantizers live where the model's tensors live, so a model built on the GPU simulates there.
        dev = next((t.device for t in fp32.parameters()), None) or next((t.device for t in fp32.buffers()), None)
        if dev is not None and dev.type != "cpu":
            for q in self.quantizers.values():
                q.to(dev)

    # ------------------------------------------------------------------------------------------
    def _analyzer(self, shape, param: bool = False) -> EncodingAnalyzer:
        # Percentile and entropy clip outliers of activation distributions; weights, a few hundred
        # values per channel, keep their full range with them.
        scheme = self.param_quant_scheme if param else self.quant_scheme
        if param and scheme in ("percentile", "entropy"):
            return MinMax(shape)
        return QUANT_SCHEMES[scheme](shape)

    def _place_quantizers(self) -> None:
        gm, cfg = self.model, self.config
        nodes = list(gm.graph.nodes)
        op_type = {n: G.node_op_type(gm, n) for n in nodes}
        users = {n: list(n.users) for n in nodes}

        # Supergroups: no quantizer between the ops of a group (e.g. Conv -> Relu). Data-movement
        # nodes between them (an Identity left by batch-norm folding, a reshape) do not break a group.
        def next_op(node: fx.Node) -> Optional[fx.Node]:
            while True:
                u = users[node]
                if len(u) != 1:
                    return None
                if op_type.get(u[0]) == "Passthrough":
                    node = u[0]
                    continue
                return u[0]

        in_group_middle: set[fx.Node] = set()
        for group in cfg.supergroups:
            for n in nodes:
                if op_type.get(n) != group[0]:
                    continue
                chain, cur = [n], n
                for t in group[1:]:
                    nxt = next_op(cur)
                    if nxt is None or op_type.get(nxt) != t:
                        break
                    chain.append(nxt)
                    cur = nxt
                if len(chain) == len(group):
                    in_group_middle.update(chain[:-1])

        # Weights: one parametrized quantizer per weight parameter the config quantizes.
        for n in nodes:
            if n.op != "call_module" or op_type[n] is None or op_type[n] == "Passthrough":
                continue
            mod = gm.get_submodule(n.target)
            axis = next((a for t, a in G.WEIGHT_AXIS.items() if isinstance(mod, t)), None)
            w = getattr(mod, "weight", None)
            if axis is None or not isinstance(w, nn.Parameter):
                continue
            rule = cfg.param_rule(op_type[n], "weight")
            if not rule.is_quantized:
                continue
            per_channel = cfg.per_channel(op_type[n]) and op_type[n] in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            shape = tuple(w.shape[d] if (per_channel and d == axis) else 1 for d in range(w.dim()))
            name = f"{n.target}.weight"
            q = QuantizeDequantize(shape, self.param_bw, rule.is_symmetric, self._analyzer(shape, param=True), name=name,
                                   param_mode=self.range_params)
            bn = self._following_batchnorm(n) if self.batchnorm == "fold_each_step" else None
            wq = _FoldedWeightQuantizer(q, bn, axis) if bn is not None else _WeightQuantizer(q)
            parametrize.register_parametrization(mod, "weight", wq, unsafe=True)
            self.param_quantizers[name] = q
            self._op_types[name] = op_type[n]

        # Weights of ATen ops (graphs from torch.export): a quantizer node between the parameter and the op.
        for n in nodes:
            spec = G.ATEN_WEIGHTS.get(n.target) if n.op == "call_function" else None
            if spec is None or len(n.args) <= spec[0]:
                continue
            w_node = n.args[spec[0]]
            if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
                continue
            w = _get_attr(gm, w_node.target)
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                continue
            rule = cfg.param_rule(op_type[n], "weight")
            name = f"{w_node.target}"
            if not rule.is_quantized or name in self.param_quantizers:
                continue
            axis = spec[1]
            per_channel = cfg.per_channel(op_type[n]) and op_type[n] in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            shape = tuple(w.shape[d] if (per_channel and d == axis) else 1 for d in range(w.dim()))
            q = QuantizeDequantize(shape, self.param_bw, rule.is_symmetric, self._analyzer(shape, param=True),
                                   name=name, param_mode=self.range_params)
            qname = f"_pq_w_{len(self.param_quantizers)}"
            gm.add_submodule(qname, q)
            with gm.graph.inserting_after(w_node):
                qn = gm.graph.call_module(qname, (w_node,))
            w_node.replace_all_uses_with(qn, delete_user_cb=lambda u, qn=qn: u is not qn)
            self.param_quantizers[name] = q
            self._op_types[name] = op_type[n]
            self._graph_weights[name] = w_node.target

        # Activations: model inputs, and outputs of quantizable ops (not inside a supergroup).
        is_float = lambda n: n.meta.get("pq_dtype") in (torch.float32, torch.float16, torch.bfloat16)
        outputs: set[fx.Node] = set()
        for n in nodes:
            if n.op == "output":
                fx.node.map_arg(n.args, outputs.add)
        counter = 0
        for n in nodes:
            t = op_type.get(n)
            if n.op == "placeholder":
                if not (cfg.model_input_quantized and is_float(n)):
                    continue
                name, ot = f"input.{n.target}", "ModelInput"
            elif t is None or t == "Passthrough" or not is_float(n) or n in in_group_middle:
                continue
            else:
                if not cfg.output_quantized(t):
                    continue
                if n in outputs and not cfg.model_output_quantized:
                    continue
                base = n.target if n.op == "call_module" else n.name
                name, ot = f"{base}.output", t
            sym = cfg.activation_symmetric(ot if ot != "ModelInput" else "")
            q = QuantizeDequantize((), self.output_bw, sym, self._analyzer(()), name=name,
                                   param_mode=self.range_params)
            qname = f"_pq_act_{counter}"
            counter += 1
            gm.add_submodule(qname, q)
            with gm.graph.inserting_after(n):
                qn = gm.graph.call_module(qname, (n,))
            n.replace_all_uses_with(qn, delete_user_cb=lambda u, qn=qn: u is not qn)
            qn.meta["pq_dtype"] = n.meta.get("pq_dtype")
            self.activation_quantizers[name] = q
            self._op_types[name] = ot
            c = cfg.encoding_constraint(ot) if ot != "ModelInput" else None
            if c is not None:
                self._constraints[name] = c
        gm.graph.lint()
        gm.recompile()

    def _fuse_activations(self) -> list[str]:
        """Rewrites `act -> quantizer` as `quantizer(x, activation=(lo, hi))` where the activation is a
        ReLU / ReLU6 / Hardtanh whose only user is the quantizer. Returns the fused quantizers' names."""
        gm = self.model
        names = {id(q): n for n, q in self.activation_quantizers.items()}
        fused = []
        for qn in list(gm.graph.nodes):
            if qn.op != "call_module" or not isinstance(gm.get_submodule(qn.target), QuantizeDequantize):
                continue
            act = qn.args[0] if qn.args else None
            if not isinstance(act, fx.Node) or len(act.users) != 1 or qn.kwargs:
                continue
            rng = _activation_range(gm, act)
            src = act.args[0] if act.args else None
            if rng is None or not isinstance(src, fx.Node) or len(src.users) != 1:
                continue  # an in-place activation's input seen by others would change meaning
            qn.args = (src,)
            qn.kwargs = {"activation": rng}
            gm.graph.erase_node(act)
            fused.append(names.get(id(gm.get_submodule(qn.target)), qn.target))
        # quantizer -> max pool: the pool's backward needs only its indices and the input's shape
        for qn in list(gm.graph.nodes):
            if qn.op != "call_module" or not isinstance(gm.get_submodule(qn.target), QuantizeDequantize):
                continue
            users = list(qn.users)
            if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (qn,):
                continue
            pool_node = users[0]
            pool = _pool_args(gm.get_submodule(pool_node.target))
            if pool is None or len(pool_node.args) != 1 or pool_node.kwargs:
                continue
            qn.kwargs = {**qn.kwargs, "pool": pool}
            pool_node.replace_all_uses_with(qn)
            gm.graph.erase_node(pool_node)
            name = names.get(id(gm.get_submodule(qn.target)), qn.target)
            if name not in fused:
                fused.append(name)
        # model input -> quantizer -> single-channel Conv2d: one node (pyquant.quant.input_conv)
        for qn in list(gm.graph.nodes):
            if (qn.op != "call_module" or not isinstance(gm.get_submodule(qn.target), QuantizeDequantize)
                    or qn.kwargs or len(qn.args) != 1 or getattr(qn.args[0], "op", None) != "placeholder"):
                continue
            users = list(qn.users)
            if len(users) != 1 or users[0].op != "call_module" or users[0].args != (qn,) or users[0].kwargs:
                continue
            conv_node = users[0]
            if not can_fuse_input_conv(gm.get_submodule(conv_node.target)):
                continue
            with gm.graph.inserting_before(conv_node):
                q_attr = gm.graph.get_attr(qn.target)
                c_attr = gm.graph.get_attr(conv_node.target)
                node = gm.graph.call_function(quantized_input_conv, (q_attr, c_attr, qn.args[0]))
            conv_node.replace_all_uses_with(node)
            gm.graph.erase_node(conv_node)
            gm.graph.erase_node(qn)
            fused.append(names.get(id(gm.get_submodule(qn.target)), qn.target))
        gm.graph.lint()
        gm.recompile()
        return fused

    def _following_batchnorm(self, n: fx.Node) -> Optional[nn.Module]:
        """The batch norm that directly and solely consumes layer node `n`'s output, if any."""
        users = list(n.users)
        if len(users) != 1 or users[0].op != "call_module":
            return None
        mod = self.model.get_submodule(users[0].target)
        layer = self.model.get_submodule(n.target)
        ok = (isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and mod.track_running_stats
              and isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                     nn.ConvTranspose3d, nn.Linear)))
        grouped_t = isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and layer.groups != 1
        return mod if ok and not grouped_t else None

    # ------------------------------------------------------------------------------------------
    @property
    def quantizers(self) -> dict[str, QuantizeDequantize]:
        """Every quantizer by name: '<module>.weight', '<op>.output', 'input.<name>'."""
        return {**self.param_quantizers, **self.activation_quantizers}

    def compute_encodings(self, forward_fn: Union[Callable[[nn.Module], Any], Iterable],
                          forward_pass_callback_args: Any = None, *, progress: Optional[bool] = None) -> None:
        """Calibrates: weights first (from the weights themselves), then activations, observed while
        `forward_fn(sim.model)` (or `forward_fn(sim.model, args)`) runs the calibration data with the
        weights already quantized. `forward_fn` may also be an iterable of input batches (a data
        loader), then shown with a progress bar on a terminal."""
        with torch.no_grad():
            for name, q in self.param_quantizers.items():
                if not q.enabled:
                    continue
                w = self._quantizer_input(name)
                with q.compute_encodings():
                    q(w)
        fixed = {n for n in self._constraints}
        for n in fixed:  # encoding constraints (e.g. Softmax in [0, 1]) need no data
            lo, hi = self._constraints[n]
            q = self.activation_quantizers[n]
            q.set_encoding(from_range(torch.tensor(lo), torch.tensor(hi), q.bitwidth, q.symmetric))
        acts = {n: q for n, q in self.activation_quantizers.items() if q.enabled and n not in fixed}
        seen: dict[str, bool] = {n: False for n in acts}
        with contextlib.ExitStack() as stack:
            for n, q in acts.items():
                stack.enter_context(_tolerant_calibration(q, seen, n))
            with torch.no_grad():
                self._run(forward_fn, forward_pass_callback_args, progress)
        unseen = [n for n, s in seen.items() if not s]
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
        batches = forward_fn
        bar = Progress(len(batches) if hasattr(batches, "__len__") else None, "calibrating", progress)
        for b in batches:
            if isinstance(b, dict):
                self.model(**b)
            else:
                self.model(*batch_args(b, "forward_fn"))  # (inputs, labels) batches: labels dropped
            bar.update()
        bar.close()

    def _weight_of(self, name: str) -> torch.Tensor:
        if name in self._graph_weights:
            return _get_attr(self.model, self._graph_weights[name])
        mod = self.model.get_submodule(name.rsplit(".", 1)[0])
        return mod.parametrizations.weight.original

    def _quantizer_input(self, name: str) -> torch.Tensor:
        """What weight quantizer `name` quantizes: the weight, or with batchnorm="fold_each_step" the
        weight with its batch norm folded in."""
        w = self._weight_of(name)
        if name not in self._graph_weights:
            wq = self.model.get_submodule(name.rsplit(".", 1)[0]).parametrizations.weight[0]
            if isinstance(wq, _FoldedWeightQuantizer):
                return w * wq.factor(w)
        return w

    # ------------------------------------------------------------------------------------------
    def set_bitwidth(self, name: str, bitwidth: int) -> None:
        """Overrides one quantizer's bit width (recompute or reload its encoding afterwards)."""
        from ..ops import grid
        q = self._get(name)
        grid(bitwidth, q.symmetric)
        q.bitwidth = bitwidth
        q.reset_encoding()

    def enable(self, name: str, enabled: bool = True) -> None:
        self._get(name).enabled = enabled

    def _get(self, name: str) -> QuantizeDequantize:
        try:
            return self.quantizers[name]
        except KeyError:
            raise KeyError(f"no quantizer named {name!r}; names look like {list(self.quantizers)[:4]}") from None

    def encodings(self) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
        """(activation encodings, param encodings) of the enabled, calibrated quantizers."""
        act = {n: q.get_encoding() for n, q in self.activation_quantizers.items() if q.enabled and q.get_encoding()}
        par = {n: q.get_encoding() for n, q in self.param_quantizers.items() if q.enabled and q.get_encoding()}
        return act, par

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
            q = self._get(name)
            q.lsq_grad_scale = bool(lsq_grad_scale) if enabled else q.lsq_grad_scale
            learn = bool(enabled) and not q.frozen and q.enabled and q._has_encoding
            for p in q._encoding_params():
                p.requires_grad_(learn)
            if q.param_mode == "scale_offset" and q.symmetric:
                q.offset.requires_grad_(False)

    def freeze(self, name: Optional[str] = None) -> None:
        """Freeze one quantizer's encoding (or all): no range learning, no recalibration."""
        for q in ([self._get(name)] if name is not None else self.quantizers.values()):
            q.freeze()

    def unfreeze(self, name: Optional[str] = None) -> None:
        for q in ([self._get(name)] if name is not None else self.quantizers.values()):
            q.unfreeze()

    def save_checkpoint(self, path: Union[str, os.PathLike], optimizer: Optional[torch.optim.Optimizer] = None,
                        **extra: Any) -> None:
        """Saves the simulated model's state (weights, encodings, trainable quantizer parameters and the
        quantizers' flags), an optimizer's state and any extra values, atomically."""
        flags = {n: dict(enabled=q.enabled, frozen=q.frozen, bitwidth=q.bitwidth, symmetric=q.symmetric,
                         lsq=getattr(q, "lsq_grad_scale", False),
                         learn=[p.requires_grad for p in q._encoding_params()])
                 for n, q in self.quantizers.items()}
        state = {"model": self.model.state_dict(), "quantizers": flags, "extra": extra,
                 "optimizer": optimizer.state_dict() if optimizer is not None else None}
        atomic_torch_save(state, path)

    def load_checkpoint(self, path: Union[str, os.PathLike],
                        optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, Any]:
        """Restores what save_checkpoint wrote (into this simulation of the same model); returns the
        extra values."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        for n, f in state["quantizers"].items():
            q = self._get(n)
            q.enabled, q.frozen, q.bitwidth, q.symmetric = f["enabled"], f["frozen"], f["bitwidth"], f["symmetric"]
            q.lsq_grad_scale = f["lsq"]
            for p, r in zip(q._encoding_params(), f["learn"]):
                p.requires_grad_(r)
        self.model.load_state_dict(state["model"])
        if optimizer is not None and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        return state["extra"]

    def summary(self, file=None) -> str:
        """A table of every quantizer: name, op type, bits, symmetry, granularity, encoding."""
        rows = [("name", "op", "bw", "sym", "granularity", "enabled", "scale", "offset")]
        for name, q in self.quantizers.items():
            enc = q.get_encoding()
            if enc is None:
                sc = off = "-"
                gran = "per_channel" if any(s > 1 for s in q.shape) else "per_tensor"
            else:
                s = enc.scale.flatten()
                o = enc.offset.flatten()
                sc = f"{float(s[0]):.4g}" if s.numel() == 1 else f"[{float(s.min()):.3g}..{float(s.max()):.3g}]"
                off = f"{int(o[0])}" if o.numel() == 1 else f"[{int(o.min())}..{int(o.max())}]"
                gran = enc.granularity
            rows.append((name, self._op_types.get(name, "?"), str(q.bitwidth), "sym" if q.symmetric else "asym",
                         gran, "yes" if q.enabled else "no", sc, off))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        text = "\n".join(lines)
        print(text, file=file or sys.stdout)
        return text

    # ------------------------------------------------------------------------------------------
    def load_encodings(self, path: Union[str, os.PathLike], strict: bool = True) -> None:
        """Sets the quantizers' encodings from an encodings file (versions 1.0.0 and 2.0.0)."""
        from .encodings import load_encodings
        act, par = load_encodings(path, param_names=list(self.param_quantizers))
        missing = []
        for table, quants in ((act, self.activation_quantizers), (par, self.param_quantizers)):
            for name, enc in table.items():
                q = quants.get(name)
                if q is None:
                    missing.append(name)
                    continue
                q.bitwidth, q.symmetric = enc.bitwidth, enc.symmetric
                q.set_encoding(_reshape_encoding(enc, q.shape))
        if missing and strict:
            raise KeyError(f"encodings for unknown quantizers: {missing[:8]}")

    def export(self, path: Union[str, os.PathLike], filename_prefix: str, dummy_input: Any = None, *,
               encoding_version: str = "1.0.0", opset_version: int = 13) -> dict[str, Path]:
        """Writes `<prefix>.onnx` (QuantizeLinear/DequantizeLinear, per-channel with axis),
        `<prefix>.encodings` (AIMET-compatible JSON) and `<prefix>.pth` (the FP32 weights), each
        atomically. Returns the paths."""
        from .encodings import write_encodings
        from .export import export_onnx
        unfolded = [n for n in self.param_quantizers if n not in self._graph_weights and isinstance(
            self.model.get_submodule(n.rsplit(".", 1)[0]).parametrizations.weight[0], _FoldedWeightQuantizer)]
        if unfolded:
            raise RuntimeError(f"export: the weights of {unfolded[:3]} are quantized with their batch norms folded "
                               f"in (batchnorm='fold_each_step'); fold them first: pq.fold_batchnorms_to_scale(sim)")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        dummy = self._dummy_input if dummy_input is None else dummy_input
        act, par = self.encodings()
        paths = {"encodings": out / f"{filename_prefix}.encodings", "onnx": out / f"{filename_prefix}.onnx",
                 "pth": out / f"{filename_prefix}.pth"}
        write_encodings(paths["encodings"], act, par, version=encoding_version,
                        quantizer_args={"activation_bitwidth": self.output_bw, "param_bitwidth": self.param_bw,
                                        "quant_scheme": self.quant_scheme})
        export_onnx(self, paths["onnx"], dummy, opset_version=opset_version)
        state = {k.replace("parametrizations.weight.original", "weight"): v.detach().clone()
                 for k, v in self.model.state_dict().items()
                 if "_pq_act_" not in k and ".parametrizations.weight.0." not in k}
        atomic_torch_save(state, paths["pth"])
        return paths


def _pool_args(m: nn.Module):
    """aten.max_pool2d_with_indices' arguments for an nn.MaxPool2d that returns values only, else None."""
    if type(m) is not nn.MaxPool2d or m.return_indices:
        return None
    pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]
    stride = m.stride if m.stride is not None else m.kernel_size
    return (pair(m.kernel_size), pair(stride), pair(m.padding), pair(m.dilation), bool(m.ceil_mode))


def _activation_range(gm: fx.GraphModule, n: fx.Node) -> Optional[tuple[float, float]]:
    """(lo, hi) of a ReLU / ReLU6 / Hardtanh node with the input as its only argument, else None."""
    import torch.nn.functional as F
    inf = float("inf")
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if type(m) is nn.ReLU:
            return (0.0, inf)
        if type(m) in (nn.ReLU6, nn.Hardtanh):
            return (float(m.min_val), float(m.max_val))
        return None
    if len(n.args) != 1 or any(k != "inplace" for k in n.kwargs):
        return None
    if n.op == "call_function" and n.target in (torch.relu, F.relu, torch.relu_):
        return (0.0, inf)
    if n.op == "call_function" and n.target is F.relu6:
        return (0.0, 6.0)
    if n.op == "call_method" and n.target in ("relu", "relu_"):
        return (0.0, inf)
    return None


@contextlib.contextmanager
def _tolerant_calibration(q: QuantizeDequantize, seen: dict, name: str):
    """q.compute_encodings(), but a quantizer that saw no data is disabled instead of failing."""
    q.encoding_analyzer.reset()
    q._calibrating = True
    try:
        yield
    finally:
        q._calibrating = False
    if q.encoding_analyzer.num_batches == 0:
        q.enabled = False
        return
    seen[name] = True
    if not q.frozen:
        q.set_encoding(q.encoding_analyzer.compute_encodings(q.bitwidth, q.symmetric))


def _reshape_encoding(enc: Encoding, shape) -> Encoding:
    from ..quant import from_scale_offset
    s = enc.scale.reshape(shape) if enc.scale.numel() == max(1, math.prod(shape)) else enc.scale
    o = enc.offset.reshape(shape) if enc.offset.numel() == max(1, math.prod(shape)) else enc.offset
    return from_scale_offset(s, o, enc.bitwidth, enc.symmetric, enc.block_size)


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
