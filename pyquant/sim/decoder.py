"""Capturing a transformers decoder language model together with its key/value cache.

`QuantSim(..., kv_cache=True)` captures the model as one graph that takes the cached keys and values of
earlier positions as inputs and returns them, extended by the new positions, as outputs:

    graph(input_ids, attention_mask, position_ids, past_keys[0..L), past_values[0..L))
        -> (logits, keys[0..L), values[0..L))

With no past (zero cached positions) it is the plain model, so calibration and full-sequence runs go through
the same graph, and the same quantizers, as each decoding step of `generate()`. The batch size, the number
of new tokens and the number of cached positions are all free dimensions of the capture.

Around the graph, `CacheInterface` makes `sim.model` callable like the transformers model: keyword inputs
(`input_ids`, `attention_mask`, `position_ids`, a `transformers.DynamicCache` as `cache` or
`past_key_values`, `use_cache`), missing ones filled in as the model would (an all-ones mask, positions
following the cached ones, an empty cache), and a `CausalLMOutputWithPast` back whose `cache` is a
DynamicCache when one was asked for. `attach_generate` gives `sim.model` a `generate()` that runs
transformers' generation loop with the simulated graph as the model's forward: each step runs the new
token(s) only, through the simulation."""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from .graph import KV_CACHE_META, SequenceLimit, keep_forward_hooks

__all__ = ["is_generative", "cached_decoder", "CacheInterface", "capture_cached", "attach_generate", "Generate",
           "graph_example"]

_INPUTS = ("input_ids", "attention_mask", "position_ids")
_PRESERVED = "_user_preserved_attributes"  # GraphModule.meta key: attributes a deep copy sets again
# keyword arguments of a transformers forward that the capture runs as the model would with their defaults
_IGNORED = ("cache_position", "return_dict", "output_attentions", "output_hidden_states")


def is_generative(model: nn.Module) -> bool:
    """Whether `model` is a transformers model that generates text (has `generate` and a config)."""
    can = getattr(model, "can_generate", None)
    try:
        return callable(can) and bool(can()) and hasattr(model, "config")
    except Exception:  # noqa: BLE001 - a model that cannot say is not one
        return False


def _dynamic_cache(keys: list[torch.Tensor], values: list[torch.Tensor]):
    from transformers import DynamicCache
    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, i)
    return cache


def cached_decoder(model: nn.Module) -> nn.Module:
    """A view of transformers causal LM `model` as a function of tensors only (what torch.export captures):
    the cache of earlier positions comes in as one key and one value tensor per layer, [batch, kv heads,
    positions, head dim], and goes out extended by the new positions. The view is an instance of a subclass
    of the model's class sharing its submodules, parameters and config, so that parameter and module names
    stay the model's. A cache of full layers (transformers' DynamicLayer): sliding-window attention still
    masks to its window, from the absolute positions."""
    base = type(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_keys: list[torch.Tensor], past_values: list[torch.Tensor]):
        cache = _dynamic_cache(list(past_keys), list(past_values))
        out = base.forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           cache=cache, use_cache=True)
        layers = out.cache.layers
        return out.logits, [layer.keys for layer in layers], [layer.values for layer in layers]

    view = object.__new__(type(f"Cached{base.__name__}", (base,), {"forward": forward}))
    view.__dict__.update(model.__dict__)  # shallow: the same parameter and module tables
    return view


class CacheInterface:
    """Forward pre-hook and hook of a graph captured by capture_cached (see the module docstring): keyword inputs
    as the transformers model takes them become the graph's tensors, and its tensors a CausalLMOutputWithPast.
    `kv_shapes`: per layer, (kv heads, head dim) of the cached keys and values. A class, so that the graph
    deep-copies with it (graph.keep_forward_hooks)."""

    def __init__(self, kv_shapes: list[tuple[tuple[int, int], tuple[int, int]]], limit: Optional[SequenceLimit]):
        self.kv_shapes = kv_shapes
        self.limit = limit
        self._want_cache = False

    def inputs(self, args: tuple, kwargs: dict, like: torch.Tensor) -> dict[str, Any]:
        """The graph's inputs from a call's positional and keyword arguments; `like`: a parameter (device and
        dtype of an empty cache)."""
        kwargs = dict(kwargs)
        if len(args) > len(_INPUTS):
            raise TypeError(f"the simulated model takes {', '.join(_INPUTS)} by position; got {len(args)} "
                            f"positional arguments")
        for name, a in zip(_INPUTS, args):
            if name in kwargs:
                raise TypeError(f"the simulated model got {name} both by position and by name")
            kwargs[name] = a
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy
        use_cache = kwargs.pop("use_cache", None)
        keep = kwargs.pop("logits_to_keep", 0)
        for name in _IGNORED:
            kwargs.pop(name, None)
        ids = kwargs.pop("input_ids", None)
        mask = kwargs.pop("attention_mask", None)
        pos = kwargs.pop("position_ids", None)
        if kwargs:
            raise TypeError(f"the simulated decoder (captured with kv_cache=True) takes input_ids, attention_mask, "
                            f"position_ids, cache / past_key_values and use_cache; got {', '.join(sorted(kwargs))}")
        if keep not in (0, None):
            raise ValueError(f"logits_to_keep: the simulated decoder returns the logits of every new position "
                             f"(0); got {keep!r}")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"input_ids: expected a [batch, sequence] tensor of token ids, got "
                             f"{getattr(ids, 'shape', ids)!r}")
        batch, new = ids.shape
        keys, values = self._past(cache, batch, like)
        past = keys[0].shape[2] if keys else 0
        if self.limit is not None:
            self.limit.check("input_ids", new, past)
        if mask is None:
            mask = torch.ones(batch, past + new, dtype=torch.long, device=ids.device)
        if pos is None:  # as the model: the positions after the cached ones
            pos = torch.arange(past, past + new, device=ids.device).unsqueeze(0).expand(batch, -1)
        self._want_cache = bool(use_cache) if use_cache is not None else cache is not None
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "past_keys": keys,
                "past_values": values}

    def _past(self, cache: Any, batch: int, like: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layers = list(getattr(cache, "layers", None) or []) if cache is not None else []
        if cache is not None and not hasattr(cache, "layers"):
            raise TypeError(f"cache: expected a transformers Cache (DynamicCache), got {type(cache).__name__}")
        from transformers.cache_utils import DynamicLayer
        odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
        if odd:  # a sliding-window layer keeps only its window: the graph would read positions from 0 again
            raise TypeError(f"cache: the simulated decoder reads caches of full layers (transformers.DynamicCache() "
                            f"without a config); this one has {', '.join(odd)}")
        keys, values = [], []
        for i, ((kh, kd), (vh, vd)) in enumerate(self.kv_shapes):
            layer = layers[i] if i < len(layers) else None
            k = getattr(layer, "keys", None)
            v = getattr(layer, "values", None)
            if k is None or v is None:  # a layer the cache has not filled yet
                k = like.new_zeros(batch, kh, 0, kd)
                v = like.new_zeros(batch, vh, 0, vd)
            keys.append(k)
            values.append(v)
        return keys, values

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ex = self.inputs(args, kwargs, next(module.parameters()))
        return (ex["input_ids"], ex["attention_mask"], ex["position_ids"], ex["past_keys"], ex["past_values"]), {}

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast
        logits, keys, values = output
        cache = _dynamic_cache(list(keys), list(values)) if self._want_cache else None
        return CausalLMOutputWithPast(logits=logits, cache=cache)


def capture_cached(model: nn.Module, dummy_input: Any) -> fx.GraphModule:
    """`model` (a transformers causal LM, prepared by graph.trace) captured with its cache (module docstring).
    The example: `dummy_input`'s token ids (dict key "input_ids", or the tensor itself), captured with batch
    and length of at least 2 behind 3 cached positions made by the model itself, so that every size stays
    free."""
    ids = dummy_input.get("input_ids") if isinstance(dummy_input, dict) else (
        dummy_input[0] if isinstance(dummy_input, (tuple, list)) else dummy_input)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("dummy_input: a decoder captured with kv_cache=True needs token ids ([batch, sequence], "
                         "as a tensor or under 'input_ids')")
    ids = ids[:, :1].repeat(1, 2) if ids.shape[1] < 2 else ids
    ids = ids.repeat(2, 1) if ids.shape[0] < 2 else ids
    batch, new = ids.shape
    past = 3
    with torch.no_grad():
        first = model(input_ids=ids[:, :1].repeat(1, past), use_cache=True)
    keys = [layer.keys.detach() for layer in first.cache.layers]
    values = [layer.values.detach() for layer in first.cache.layers]
    example = (ids, torch.ones(batch, past + new, dtype=torch.long, device=ids.device),
               torch.arange(past, past + new, device=ids.device).unsqueeze(0).expand(batch, -1).contiguous(),
               keys, values)
    auto = torch.export.Dim.AUTO
    tokens = {0: auto, 1: auto}
    cached = [{0: auto, 2: auto} for _ in keys]
    ep = torch.export.export(cached_decoder(model), example, dynamic_shapes=(tokens, tokens, tokens, cached, cached),
                             strict=False)
    gm = ep.module()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in placeholders[len(_INPUTS):]:
        n.meta[KV_CACHE_META] = True
    limit = getattr(model.config, "max_position_embeddings", None)
    iface = CacheInterface([((k.shape[1], k.shape[3]), (v.shape[1], v.shape[3])) for k, v in zip(keys, values)],
                           SequenceLimit(limit) if isinstance(limit, int) and limit > 0 else None)
    gm.register_forward_pre_hook(iface.before, with_kwargs=True, prepend=True)  # before export's input check
    gm.register_forward_hook(iface.after, with_kwargs=True)
    gm.meta["pq_cache_interface"] = iface
    keep_forward_hooks(gm)
    return gm


def graph_example(gm: fx.GraphModule, dummy_input: Any) -> Any:
    """What the graph's placeholders take for `dummy_input`: for a graph captured with its cache, the flat
    tensors (token ids, mask, positions, then the empty cache's keys and values); else `dummy_input`."""
    iface = gm.meta.get("pq_cache_interface")
    if iface is None:
        return dummy_input
    args = () if isinstance(dummy_input, dict) else (
        tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,))
    kwargs = dict(dummy_input) if isinstance(dummy_input, dict) else {}
    ex = iface.inputs(args, kwargs, next(gm.parameters()))
    return (ex["input_ids"], ex["attention_mask"], ex["position_ids"], *ex["past_keys"], *ex["past_values"])


def attach_generate(gm: fx.GraphModule, model: nn.Module) -> None:
    """Gives `gm` (captured by capture_cached from `model`) a `generate(...)`: transformers' generation of
    `model`'s class, with `gm` as the forward. The shell shares `model`'s modules (its config and generation
    config); by default it starts from an empty cache of full layers."""
    shell = object.__new__(type(model))
    shell.__dict__.update(model.__dict__)  # a shallow shell: the same submodules, parameters and config
    object.__setattr__(shell, "forward", functools.partial(_forward, gm))
    object.__setattr__(gm, "generate", Generate(shell))
    # a deep copy of the graph gets its own generate(), running the copy (GraphModule keeps these attributes)
    gm.meta.setdefault(_PRESERVED, {})["generate"] = gm.generate


class Generate:
    """`sim.model.generate(...)`: transformers' generate of the model's class, each step run by the simulated
    graph (with use_cache=True, the default, one step per new token on the cached positions, from an empty
    DynamicCache unless one is given). A deep copy of the graph gets its own (GraphModule.meta keeps it)."""

    def __init__(self, shell: nn.Module):
        self.shell = shell

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_cache", True) and kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            from transformers import DynamicCache
            kwargs["cache"] = DynamicCache()  # full layers (see cached_decoder), not the config's sliding ones
        return self.shell.generate(*args, **kwargs)


def _forward(gm: fx.GraphModule, *args: Any, **kwargs: Any):
    return gm(*args, **kwargs)
