"""Fuzz targets: each feeds one adversarial input (fuzz_strategies.py) to a pyquant entry point and judges
the outcome. An input may be accepted (then what came out must be valid) or refused with one of the
target's documented exception types, whose message names the offending key or argument. Anything else --
another exception type, a refusal that names nothing, an invalid value accepted, a run past the
per-example time limit -- raises FuzzFailure. tests/test_fuzz.py runs the targets under pytest;
bench/fuzz.py runs them at scale and counts the outcomes."""
from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import functools
import io
import json
import math
import os
import re
import shutil
import signal
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from hypothesis import strategies as st
from torch import nn

import pyquant.ops as pqo
from fuzz_strategies import (ALL_DTYPES, fill_tensor, json_values, lay_out, mutated_text, mutated_tree, scalars,
                             shapes, strided_views, tensor_fill, tree_get)

DATA = Path(__file__).parent / "data"
EXAMPLE_TIME_LIMIT_S = 60.0
"""Longer than any example should take by orders of magnitude: an example still running then is a hang.
Lazy first-call work (imports, op registration) happens before the limit applies (`warm_ops`): a timer
signal in the middle of an import would leave the interpreter half-initialized."""


class FuzzFailure(AssertionError):
    """pyquant handled an input wrongly (the message says how and shows the input)."""


class ExampleTimeout(Exception):
    """An example ran past EXAMPLE_TIME_LIMIT_S."""


@contextlib.contextmanager
def time_limit(seconds: float = EXAMPLE_TIME_LIMIT_S):
    """Turns a hang into ExampleTimeout (a timer signal; main thread only, elsewhere no limit)."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise ExampleTimeout(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclasses.dataclass
class Target:
    """One entry point under fuzzing: `strategy()` draws inputs, `run(example)` returns the outcome's label
    ("accepted" or the documented exception's type name) or raises FuzzFailure."""

    name: str
    what: str
    strategy: Callable[[], st.SearchStrategy]
    run: Callable[[Any], str]


def _short(v: Any, n: int = 400) -> str:
    text = repr(v)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


def _refusal(exc: BaseException, documented: tuple[type, ...], example: Any, names: list[str]) -> str:
    """The label of a refusal, after checking its type and that its message names one of `names`."""
    if isinstance(exc, ExampleTimeout):
        raise FuzzFailure(f"hang: {exc}\ninput: {_short(example)}") from exc
    if not isinstance(exc, documented):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
        raise FuzzFailure(f"undocumented {type(exc).__name__}: {exc}\ninput: {_short(example)}\n{tb}") from exc
    msg = str(exc)
    if names and not any(n and n in msg for n in names):
        raise FuzzFailure(f"{type(exc).__name__} names none of {names[:8]}: {msg!r}\ninput: {_short(example)}")
    return type(exc).__name__


# ---------------------------------------------------------------------------------------------------------
# Seeds: valid files written by pyquant for a small model
# ---------------------------------------------------------------------------------------------------------
def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(),
                         nn.Linear(16, 8)).eval()


def tiny_data() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@functools.lru_cache(maxsize=None)
def sims() -> dict[str, Any]:
    """Calibrated simulations of the tiny model: per channel (scale/offset parameters), per block, LPBQ."""
    from pyquant.sim.quantsim import QuantSim
    x = tiny_data()
    out = {
        "per_channel": QuantSim(tiny_model(), x[:1], quant_scheme="min_max", range_params="scale_offset"),
        "per_block": QuantSim(tiny_model(), x[:1], quant_scheme="min_max", param_bw=4, block_size=8),
        "lpbq": QuantSim(tiny_model(), x[:1], quant_scheme="min_max", param_bw=4, block_size=8, decompressed_bw=8),
    }
    for sim in out.values():
        sim.compute_encodings([x])
    return out


@functools.lru_cache(maxsize=None)
def encodings_seeds() -> dict[str, str]:
    """Encodings texts: every version pyquant writes for each simulation, and AIMET's fixture files."""
    from pyquant.sim.encodings import encodings_to_json
    seeds = {}
    for kind, sim in sims().items():
        act, par = sim.encodings()
        for version in ("0.6.1", "1.0.0", "2.0.0"):
            if version == "0.6.1" and kind != "per_channel":
                continue  # 0.6.1 has no per-block entries
            seeds[f"{kind}/{version}"] = encodings_to_json(act, par, version=version,
                                                           quantizer_args={"activation_bitwidth": 8})
    for path in sorted(DATA.glob("aimet_*.encodings")):
        seeds[path.name] = path.read_text(encoding="utf-8")
    return seeds


# ---------------------------------------------------------------------------------------------------------
# Encodings reader
# ---------------------------------------------------------------------------------------------------------
@st.composite
def encodings_inputs(draw) -> dict:
    seeds = encodings_seeds()
    key = draw(st.sampled_from(sorted(seeds)))
    text = seeds[key]
    doc = json.loads(text)
    mode = draw(st.sampled_from(["tree", "tree", "tree", "text", "shapes"]))
    params = draw(st.sampled_from([None, "weights"]))
    if mode == "tree":
        mutated, steps = draw(mutated_tree(doc))
        return {"seed": key, "mode": mode, "doc": mutated, "steps": steps, "params": params}
    if mode == "text":
        data, damage = draw(mutated_text(text))
        return {"seed": key, "mode": mode, "data": data, "damage": damage, "params": params}
    names = _entry_names(doc)
    hint_shapes = st.lists(st.integers(-3, 300), max_size=4).map(tuple)
    hint = draw(st.dictionaries(st.sampled_from(names) if names else st.text(max_size=4),
                                st.one_of(hint_shapes, hint_shapes, hint_shapes, scalars()), min_size=1, max_size=3))
    return {"seed": key, "mode": mode, "doc": doc, "shapes": hint, "params": params}


def _entry_names(doc: Any) -> list[str]:
    names = []
    if isinstance(doc, dict):
        for key in ("encodings", "activation_encodings", "param_encodings"):
            sec = doc.get(key)
            if isinstance(sec, list):
                names += [e["name"] for e in sec if isinstance(e, dict) and isinstance(e.get("name"), str)]
            elif isinstance(sec, dict):
                names += [n for n in sec if isinstance(n, str)]
    return names


def _path_names(doc: Any, steps: list) -> list[str]:
    """What a message about a mutation at these paths may name: the keys on the paths, list positions as
    `[i]`, the names of the entries they run through, the sections."""
    names = ["top level", "JSON", "version", "not an encodings file"]
    for _, path in steps:
        names += [k for k in path if isinstance(k, str)]
        names += [f"[{k}]" for k in path if isinstance(k, int)]
    names += _entry_names(doc)
    return names


def check_encoding(name: str, enc: Any, learned: bool = False) -> None:
    """A loaded encoding must be one pyquant can simulate: 2..16 bits, positive finite scales, integer offsets
    on its grid (0 for symmetric), LPBQ integers in range. `learned`: a checkpoint's encoding, whose
    asymmetric offset range learning may have made fractional or moved off the grid (finite still)."""
    from pyquant.ops import grid
    from pyquant.quant.lpbq import LpbqEncoding
    if not (isinstance(enc.bitwidth, int) and 2 <= enc.bitwidth <= 16):
        raise FuzzFailure(f"{name}: accepted bit width {enc.bitwidth!r}")
    s, o = enc.scale, enc.offset
    if s.dtype != torch.float32 or not bool((torch.isfinite(s) & (s > 0)).all()):
        raise FuzzFailure(f"{name}: accepted scale {s.flatten()[:6].tolist()}")
    qmin, qmax = grid(enc.bitwidth, enc.signed, strict=enc.strict)
    on_grid = torch.ones_like(o, dtype=torch.bool) if learned and not enc.symmetric else \
        (o == torch.round(o)) & (o >= -qmax) & (o <= -qmin)
    if not bool((torch.isfinite(o) & on_grid).all()):
        raise FuzzFailure(f"{name}: accepted offset {o.flatten()[:6].tolist()} for grid [{qmin}, {qmax}]")
    if enc.symmetric and bool((o != 0).any()):
        raise FuzzFailure(f"{name}: symmetric with offsets {o.flatten()[:6].tolist()}")
    if s.shape != o.shape:
        raise FuzzFailure(f"{name}: scale {tuple(s.shape)} and offset {tuple(o.shape)} differ in shape")
    if not learned and not bool((torch.isfinite(enc.min) & torch.isfinite(enc.max) & (enc.min < enc.max)).all()):
        raise FuzzFailure(f"{name}: range not finite and increasing")
    if isinstance(enc, LpbqEncoding):
        k = enc.decompressed_bw - enc.bitwidth
        n = enc.int_scale
        if not 1 <= k <= 15 or not bool(((n >= 1) & (n <= 2 ** k) & (n == torch.round(n))).all()):
            raise FuzzFailure(f"{name}: LPBQ integers {n.flatten()[:6].tolist()} with k={k}")


def run_encodings(ex: dict) -> str:
    from pyquant.sim.encodings import EncodingsError, parse_encodings, read_encodings
    pnames = None
    if ex["params"] == "weights":
        pnames = [n for n in _entry_names(json.loads(encodings_seeds()[ex["seed"]])) if n.endswith(".weight")]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with time_limit():
                if ex["mode"] == "text":
                    path = os.path.join(tmp, "fuzz.encodings")
                    with open(path, "wb") as f:
                        f.write(ex["data"])
                    out = read_encodings(path, param_names=pnames)
                else:
                    out = parse_encodings(ex["doc"], shapes=ex.get("shapes"), param_names=pnames)
        except BaseException as exc:
            if ex["mode"] == "text":
                names = [os.path.join(tmp, "fuzz.encodings")]
            elif ex["mode"] == "shapes":
                names = ["shapes"]
            else:
                names = _path_names(ex["doc"], ex["steps"])
            documented = (EncodingsError, TypeError, ValueError) if ex["mode"] == "shapes" else (EncodingsError,)
            return _refusal(exc, documented, ex, names)
    for table in (out.activation, out.params):
        for name, enc in table.items():
            check_encoding(name, enc)
    if not isinstance(out.excluded_layers, list) or not all(isinstance(n, str) for n in out.excluded_layers):
        raise FuzzFailure(f"accepted excluded_layers {_short(out.excluded_layers)}")
    if out.quantizer_args is not None and not isinstance(out.quantizer_args, dict):
        raise FuzzFailure(f"accepted quantizer_args {_short(out.quantizer_args)}")
    if out.producer is not None and not isinstance(out.producer, dict):
        raise FuzzFailure(f"accepted producer {_short(out.producer)}")
    return "accepted"


# ---------------------------------------------------------------------------------------------------------
# Hardware config loader
# ---------------------------------------------------------------------------------------------------------
FULL_CONFIG = {
    "defaults": {"ops": {"is_output_quantized": "True", "is_symmetric": "False"},
                 "params": {"is_quantized": "True", "is_symmetric": "True"},
                 "per_channel_quantization": "True", "strict_symmetric": "False", "unsigned_symmetric": "False",
                 "hw_version": "V73", "supported_kernels": [{"activation": {"bitwidth": 8, "dtype": "int"},
                                                             "param": {"bitwidth": 8, "dtype": "int"}}],
                 "block_size": 32, "decompressed_bw": 8},
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {"Conv": {"per_channel_quantization": "True", "params": {"weight": {"is_symmetric": "True"}},
                         "supported_kernels": [{"activation": {"bitwidth": 16, "dtype": "float"}}],
                         "block_size": 0},
                "Softmax": {"encoding_constraints": {"min": 0.0, "max": 1.0}},
                "Gemm": {"decompressed_bw": 12, "is_input_quantized": "True"}},
    "supergroups": [{"op_list": ["Conv", "Relu"]}, {"op_list": ["Gemm", "Relu"]}],
    "supergroup_pass_list": ["MatmulAdd"],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {"is_output_quantized": "False"},
    "kv_cache": {"bitwidth": 8, "is_symmetric": "True"},
}


@functools.lru_cache(maxsize=None)
def config_seeds() -> dict[str, str]:
    from pyquant.sim.config import PROFILES, load_config
    seeds = {name: json.dumps(load_config(name).to_dict(), indent=2) for name in PROFILES}
    seeds["full"] = json.dumps(FULL_CONFIG, indent=2)
    seeds["aimet_default"] = (DATA / "aimet_default_config.json").read_text(encoding="utf-8")
    return seeds


@st.composite
def config_inputs(draw) -> dict:
    seeds = config_seeds()
    key = draw(st.sampled_from(sorted(seeds)))
    if draw(st.integers(0, 3)) == 0:
        data, damage = draw(mutated_text(seeds[key]))
        return {"seed": key, "mode": "text", "data": data, "damage": damage}
    doc, steps = draw(mutated_tree(json.loads(seeds[key])))
    return {"seed": key, "mode": "tree", "doc": doc, "steps": steps}


def _keys_in(doc: Any) -> list[str]:
    """Every key of every object in a JSON document."""
    if isinstance(doc, dict):
        return [k for k in doc if isinstance(k, str)] + [n for v in doc.values() for n in _keys_in(v)]
    if isinstance(doc, list):
        return [n for v in doc for n in _keys_in(v)]
    return []


def run_config(ex: dict) -> str:
    from pyquant.sim.config import ConfigError, load_config
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "fuzz_config.json")
        try:
            with time_limit():
                if ex["mode"] == "text":
                    with open(path, "wb") as f:
                        f.write(ex["data"])
                    cfg = load_config(path)
                else:
                    cfg = load_config(ex["doc"])
        except BaseException as exc:
            # the file, the config argument, or a JSON path: keys of the document, list positions
            names = [path, "(top level)", "config must be", "neither a named profile", "unknown section", "unknown key"]
            if ex["mode"] == "text":
                names += _keys_in(json.loads(config_seeds()[ex["seed"]]))
            else:
                names += _keys_in(ex["doc"])
                for _, p in ex["steps"]:
                    names += [k for k in p if isinstance(k, str)] + [f"[{k}]" for k in p if isinstance(k, int)]
            return _refusal(exc, (ConfigError,), ex, names)
        try:  # an accepted config describes itself in a form that loads back to the same config
            again = load_config(json.loads(json.dumps(cfg.to_dict(), allow_nan=False)))
        except Exception as exc:
            raise FuzzFailure(f"accepted a config whose to_dict() does not load back: {type(exc).__name__}: {exc}\n"
                              f"input: {_short(ex)}") from exc
        if again != cfg:
            raise FuzzFailure(f"accepted a config that does not round-trip\ninput: {_short(ex)}")
    return "accepted"


# ---------------------------------------------------------------------------------------------------------
# QuantSim checkpoints
# ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def checkpoint_seeds() -> dict[str, tuple[dict, dict, dict]]:
    """Per simulation: (the state save_checkpoint writes, the model's state dict, the quantizers' flags),
    the last two kept to restore the simulation after each example."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("per_channel", "lpbq"):
            sim = sims()[kind]
            path = os.path.join(tmp, "seed.pt")
            sim.save_checkpoint(path, epoch=3)
            state = torch.load(path, map_location="cpu", weights_only=True)
            out[kind] = (state, {k: v.clone() for k, v in sim.model.state_dict().items()},
                         {n: q.state_flags() for n, q in sim.quantizers.items()})
    return out


TENSOR_MUTATIONS = ("shape", "dtype", "fill", "scalar", "empty", "python")


@st.composite
def checkpoint_inputs(draw) -> dict:
    kind = draw(st.sampled_from(["per_channel", "lpbq"]))
    state = copy.deepcopy(checkpoint_seeds()[kind][0])
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        paths = _state_paths(state)
        path = draw(st.sampled_from(paths))
        node = tree_get(state, path) if path else state
        if isinstance(node, torch.Tensor) and draw(st.booleans()):
            how = draw(st.sampled_from(TENSOR_MUTATIONS))
            state = _set_state(state, path, _mutate_tensor(draw, node, how))
            steps.append((f"tensor:{how}", path))
            continue
        how = draw(st.sampled_from(["drop", "replace", "add_key", "retype"]))
        if how == "drop" and path:
            del tree_get(state, path[:-1])[path[-1]]
        elif how == "add_key" and isinstance(node, dict):
            node[draw(st.sampled_from(["unknown", "0.weight", "3.parametrizations.weight.0.q.scale", ""]))] = \
                draw(st.one_of(json_values(), st.just(torch.ones(2))))
        elif how == "retype" and isinstance(node, dict):
            state = _set_state(state, path, draw(st.sampled_from([list(node.items()), list(node), None, 7])))
        else:
            state = _set_state(state, path, draw(st.one_of(json_values(), st.builds(
                lambda n: torch.full((n,), math.nan), st.integers(0, 3)))))
        steps.append((how, path))
    return {"sim": kind, "state": state, "steps": steps}


def _state_paths(state: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(state, dict):
        for k, v in state.items():
            out += _state_paths(v, prefix + (k,))
    elif isinstance(state, list):
        for i, v in enumerate(state):
            out += _state_paths(v, prefix + (i,))
    return out


def _set_state(state: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    tree_get(state, path[:-1])[path[-1]] = value
    return state


def _mutate_tensor(draw, t: torch.Tensor, how: str) -> Any:
    if how == "shape":
        shape = list(t.shape)
        choice = draw(st.sampled_from(["grow", "shrink", "extra_dim", "drop_dim"]))
        if choice == "grow" and shape:
            shape[draw(st.integers(0, len(shape) - 1))] += 1
        elif choice == "shrink" and shape and max(shape) > 0:
            d = max(range(len(shape)), key=lambda i: shape[i])
            shape[d] -= 1
        elif choice == "extra_dim":
            shape.append(1)
        elif shape:
            shape = shape[1:]
        return torch.ones(shape, dtype=t.dtype) if t.dtype != torch.bool else torch.ones(shape, dtype=torch.bool)
    if how == "dtype":
        return t.to(draw(st.sampled_from([d for d in ALL_DTYPES if d != t.dtype])))
    if how == "fill":
        fill = draw(st.sampled_from(["nan", "inf", "-inf", "zero", "negative", "huge"]))
        value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "zero": 0.0, "negative": -0.5, "huge": 1e38}[fill]
        out = t.clone()
        if out.is_floating_point() and out.numel():
            out.view(-1)[draw(st.integers(0, out.numel() - 1))] = value
        elif out.numel():
            out.view(-1)[0] = 0
        return out
    if how == "scalar":
        return torch.tensor(1.0)
    if how == "empty":
        return torch.empty(0)
    return draw(scalars())


def _same_state(sim, model_sd: dict, flags: dict) -> bool:
    now = sim.model.state_dict()
    if set(now) != set(model_sd):
        return False
    for k, v in model_sd.items():
        if now[k].shape != v.shape or now[k].dtype != v.dtype or not torch.equal(
                torch.nan_to_num(now[k].float(), 7.0), torch.nan_to_num(v.float(), 7.0)):
            return False
    return all(q.state_flags() == flags[n] for n, q in sim.quantizers.items())


def _restore(sim, model_sd: dict, flags: dict) -> None:
    sim.model.load_state_dict(model_sd)
    for n, q in sim.quantizers.items():
        q.load_state_flags(flags[n])


def run_checkpoint(ex: dict) -> str:
    from pyquant import CheckpointError
    sim = sims()[ex["sim"]]
    _, model_sd, flags = checkpoint_seeds()[ex["sim"]]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fuzz.pt")
        torch.save(ex["state"], path)
        try:
            with time_limit():
                sim.load_checkpoint(path)
        except BaseException as exc:
            names = ["model", "quantizers", "extra", "optimizer", "checkpoint"]
            for _, p in ex["steps"]:
                names += [str(k) for k in p if isinstance(k, str) and k]
                names += [k.rsplit(".", 1)[0] for k in p if isinstance(k, str) and "." in k]
            label = _refusal(exc, (CheckpointError,), ex, names)
            if not _same_state(sim, model_sd, flags):
                _restore(sim, model_sd, flags)
                raise FuzzFailure(f"a refused checkpoint changed the simulation ({label}: {exc})\n"
                                  f"input: {_short(ex['steps'])}")
            return label
        try:
            for name, q in sim.quantizers.items():
                enc = q.get_encoding()
                if enc is not None:
                    check_encoding(name, enc, learned=True)
        finally:
            _restore(sim, model_sd, flags)
    return "accepted"


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
FLAG_VALUES = {
    "--param-bw": "bitwidth", "--output-bw": "bitwidth", "--config": "config", "--quant-scheme": "scheme",
    "--calib-samples": "count", "--batch-size": "count", "--threads": "threads", "-o": "path", "--output": "path",
    "--metric": "metric", "--eval-samples": "count", "--layer-samples": "count", "--allowed-drop": "number",
    "--time-budget": "number", "--cache-dir": "path", "--name": "name", "--encoding-version": "version",
    "--onnx": "path", "--mode": "mode", "--samples": "count", "--dump": "path", "--per-image": "count",
    "--calib": "count",
}
SWITCHES = ("--keep-bn", "--progress", "--no-progress", "--traceback", "--no-sensitivity", "--no-cle",
            "--no-adaround", "--optimize", "--version", "--help", "-h", "--bogus", "-", "--")
COMMANDS = ("analyze", "autoquant", "export", "compare", "demo", "nonsense", "")
SPECS = ("no_such_package_pyquant_fuzz.models:build", "fuzz_specs:returns_none", "fuzz_specs:returns_short_tuple",
         "fuzz_specs:returns_dict_without_model", "fuzz_specs:returns_unknown_keys", "fuzz_specs:returns_not_a_module",
         "fuzz_specs:returns_bad_metric", "fuzz_specs:returns_bad_name", "fuzz_specs:raises", "fuzz_specs:missing",
         "fuzz_specs:", ":build", "no colon", "a.b:c:d", "1bad:build", "", "\u00e9t\u00e9:f", "fuzz_specs:NOT_CALLABLE")
FAILING_SPECS = ("fuzz_specs:raises",)


@functools.lru_cache(maxsize=None)
def cli_files() -> dict[str, str]:
    """Files a command line may name: a valid config, damaged ones, a folder, a missing path."""
    root = Path(tempfile.mkdtemp(prefix="pyquant_fuzz_cli_"))
    atexit.register(shutil.rmtree, root, True)
    files = {"valid.json": json.dumps(FULL_CONFIG), "bad_json.json": '{"defaults": ', "bad_utf8.json": None,
             "deep.json": "[" * 100_000 + "]" * 100_000, "big_number.json": '{"kv_cache": {"bitwidth": ' +
             "9" * 5000 + "}}", "unknown_key.json": '{"nope": {}}', "list.json": "[]"}
    out = {}
    for name, text in files.items():
        p = root / name
        p.write_bytes(b'{"defaults": {"hw_version": "\xff"}}' if text is None else text.encode())
        out[name] = str(p)
    (root / "folder").mkdir()
    out["folder"] = str(root / "folder")
    out["missing"] = str(root / "missing" / "x.json")
    out["root"] = str(root)
    return out


def _flag_value(kind: str) -> st.SearchStrategy:
    files = cli_files()
    common = st.one_of(st.sampled_from(["", "-1", "0", "nan", "inf", "1e400", "x", "\u00e9", "--", "-o"]),
                       st.text(max_size=6))
    specific = {
        "bitwidth": st.sampled_from(["2", "8", "16", "1", "17", "33", "-1", "8.5", "0x8", "99999999999999999999"]),
        "config": st.sampled_from(["default", "per_tensor", "layer_inputs", "nonexistent_profile"]
                                  + [files[k] for k in files if k != "root"]),
        "scheme": st.sampled_from(["min_max", "tf_enhanced", "mse", "percentile", "bogus"]),
        "count": st.sampled_from(["1", "2", "0", "-5", "1.5", "10000000000000000000000"]),
        "threads": st.sampled_from(["1", "2", "0", "-1", "5000", "1000000000000", "99999999999999999999", "2.5"]),
        "path": st.sampled_from([files["folder"], files["missing"], os.path.join(files["root"], "out"),
                                 files["valid.json"]]),
        "metric": st.sampled_from(["sqnr", "kl", "spec", "top1_agreement", "accuracy"]),
        "number": st.sampled_from(["0.01", "0", "1", "-0.5", "nan", "inf", "-inf", "1e309"]),
        "name": st.sampled_from(["model", "../escape", "a/b", ".hidden", "", "\u00e9"]),
        "version": st.sampled_from(["1.0.0", "2.0.0", "0.6.1", "3"]),
        "mode": st.sampled_from(["end_to_end", "lockstep", "both"]),
    }[kind]
    return st.one_of(specific, specific, specific, common)


@st.composite
def cli_inputs(draw) -> list[str]:
    if draw(st.booleans()):  # one flag of a runnable command line: every value of every flag gets its turn
        flag = draw(st.sampled_from(sorted(set(FLAG_VALUES) - {"--per-image", "--calib"})))
        return [draw(st.sampled_from(COMMANDS[:4])), draw(st.sampled_from(SPECS[1:9])), flag,
                draw(_flag_value(FLAG_VALUES[flag]))]
    argv = []
    command = draw(st.sampled_from(COMMANDS))
    if command:
        argv.append(command)
    if command and command != "nonsense" and draw(st.integers(0, 5)):
        argv.append(draw(st.sampled_from(SPECS)))
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.integers(0, 4)):
            flag = draw(st.sampled_from(sorted(FLAG_VALUES)))
            argv.append(flag)
            if draw(st.integers(0, 9)):
                argv.append(draw(_flag_value(FLAG_VALUES[flag])))
        else:
            argv.append(draw(st.sampled_from(SWITCHES)))
    if command == "demo" and "--bogus" not in argv:  # never the real demo: it runs MobileNetV2
        argv.append("--bogus")
    return argv


EXIT_CODES = (0, 1, 2, 3)


def run_cli(argv: list[str]) -> str:
    from pyquant.cli import main
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), time_limit(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main(list(argv))
    except BaseException as exc:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
        raise FuzzFailure(f"main() raised {type(exc).__name__}: {exc}\nargv: {argv!r}\n{tb}") from exc
    finally:
        torch.set_num_threads(threads)
    text = err.getvalue()
    if not isinstance(rc, int) or rc not in EXIT_CODES:
        raise FuzzFailure(f"exit code {rc!r} outside the documented ones for a bad command line\nargv: {argv!r}\n"
                          f"{text}")
    if rc == 1:  # "the run failed": only a SPEC whose function raises gets that far
        if not any(s in argv for s in FAILING_SPECS) or "failed:" not in text:
            raise FuzzFailure(f"exit code 1\nargv: {argv!r}\n{text}")
    if rc == 2 and "error" not in text:
        raise FuzzFailure(f"exit code 2 without an error message\nargv: {argv!r}\n{text}")
    internal = re.search(r"\b(KeyError|IndexError|AttributeError|ZeroDivisionError|Traceback)\b", text)
    if internal and internal.group(1) == "Traceback" and "--traceback" in argv and rc == 1:
        internal = None  # asked for: the SPEC's own error, with its traceback
    if internal:
        raise FuzzFailure(f"an internal error reached the user\nargv: {argv!r}\n{text}")
    return f"exit {rc}"


# ---------------------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------------------
OPS = ("quantize_dequantize", "quantize", "dequantize", "quantize_dequantize_int32", "adaround_weight",
       "adaround_regularizer", "adaround_init_alpha", "grid")
OP_ARGS = {
    "quantize_dequantize": ("x", "scale", "offset", "bitwidth", "signed", "axis", "block_size", "activation",
                            "lsq_grad_scale"),
    "quantize": ("x", "scale", "offset", "bitwidth", "signed", "axis", "block_size", "out_dtype", "NaN"),
    "dequantize": ("q", "scale", "offset", "axis", "block_size", "out_dtype"),
    "quantize_dequantize_int32": ("x", "scale", "overflow"),
    "adaround_weight": ("w", "alpha", "scale", "offset", "bitwidth", "signed"),
    "adaround_regularizer": ("alpha", "beta"),
    "adaround_init_alpha": ("w", "scale"),
    "grid": ("bitwidth", "signed", "strict"),
}


@st.composite
def tensors(draw, shape=None, dtypes=ALL_DTYPES) -> tuple:
    """A tensor description (shape, dtype, fill, layout, seed); `make_tensor` builds it."""
    shape = draw(shapes()) if shape is None else shape
    return (tuple(shape), draw(st.sampled_from(dtypes)), draw(tensor_fill()), draw(strided_views()),
            draw(st.integers(0, 2 ** 16)))


def make_tensor(desc: tuple) -> torch.Tensor:
    shape, dtype, fill, layout, seed = desc
    if math.prod(shape) > 1 << 20:
        raise AssertionError(f"the fuzzer drew a tensor of {math.prod(shape)} elements")  # a harness bug
    return lay_out(fill_tensor(shape, dtype, fill, seed), layout)


def _scale_like(draw, shape: tuple, valid: str = "positive") -> Any:
    """A scale (or offset) argument: mostly a valid tensor of `shape` (`valid`: the fill that makes it valid),
    else a number or a tensor with edge values and other dtypes."""
    kind = draw(st.sampled_from(["valid", "number", "tensor"]) if draw(st.integers(0, 1)) else st.just("valid"))
    if kind == "number":
        return draw(st.one_of(st.sampled_from([0.1, 1.0, 0.0, -0.1, math.nan, math.inf, 1e-45, 1e38, 2.5e9, 1e30]),
                              st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3)))
    if kind == "valid":
        desc = (tuple(shape), torch.float32, valid, draw(strided_views()), draw(st.integers(0, 2 ** 16)))
        return ("tensor", desc, draw(st.booleans()))
    return ("tensor", draw(tensors(shape=shape, dtypes=(torch.float32, torch.float32, torch.float64,
                                                        torch.float16, torch.int32))), draw(st.booleans()))


X_DTYPES = (torch.float32,) * 12 + (torch.float16, torch.bfloat16) * 4 + ALL_DTYPES


def _block_sizes(shape: tuple) -> st.SearchStrategy:
    """block_size arguments for x of `shape`: per dimension the whole (-1 or n), 1, a divisor, a non-divisor,
    0, a negative, a non-int; sometimes one entry too many or too few."""
    def per_dim(n: int) -> st.SearchStrategy:
        divisors = [d for d in range(1, min(n, 64) + 1) if n % d == 0] or [1]
        return st.integers(0, 5).flatmap(lambda k: st.sampled_from([-1, n, 1] + divisors) if k else st.sampled_from(
            [0, -2, n + 1, 3, True, 2.0]))
    exact = st.tuples(*[per_dim(n) for n in shape]) if shape else st.just(())
    wrong_length = st.lists(st.integers(-2, 4), max_size=len(shape) + 1).map(tuple)
    return st.integers(0, 5).flatmap(lambda k: exact if k else wrong_length)


def _small(shape: tuple) -> tuple:
    """`shape`, or (1,) where it would hold more elements than a scale of a tiny input should."""
    return shape if math.prod(shape) <= 4096 else (1,)


def _param_shape_guess(draw, x_shape: tuple, axis: Any, block: Any) -> tuple:
    right = None
    try:
        if isinstance(axis, int) and not isinstance(axis, bool) and x_shape and -len(x_shape) <= axis < len(x_shape):
            right = (x_shape[axis],)
        elif isinstance(block, tuple) and len(block) == len(x_shape) and all(
                isinstance(b, int) and not isinstance(b, bool) and (b == -1 or b > 0 and n % b == 0)
                for n, b in zip(x_shape, block)):
            right = tuple(1 if b == -1 else n // b for n, b in zip(x_shape, block))
    except Exception:
        right = None
    if right is not None and math.prod(right) > 4096:  # a scale that large is never drawn (x has no elements)
        right = None
    whole = tuple(x_shape) if math.prod(x_shape) <= 4096 else (1,)
    if draw(st.integers(0, 3)):
        return right or ()
    return draw(st.sampled_from([(), (1,), (2,), (3, 1), whole]))


@st.composite
def op_inputs(draw) -> dict:
    op = draw(st.sampled_from(OPS))
    # mostly valid choices (the result is then checked against the formula), else adversarial ones
    bitwidth = draw(st.sampled_from([2, 3, 4, 8, 16]) if draw(st.integers(0, 3)) else st.one_of(
        st.sampled_from([0, 1, 17, 33, -1, True, 8.0, None, "8"]), st.integers(-40, 40)))
    signed = draw(st.booleans() if draw(st.integers(0, 5)) else st.sampled_from([None, 1, "yes"]))
    if op == "grid":
        return {"op": op, "kwargs": {"bitwidth": bitwidth, "signed": signed,
                                     "strict": draw(st.sampled_from([False, True, None]))}}
    x = draw(tensors(dtypes=X_DTYPES))
    shape = x[0]
    nd = len(shape)
    granularity = draw(st.sampled_from(["tensor", "axis", "block", "block", "adversarial"]))
    axis = block = None
    if granularity == "axis" and nd:
        axis = draw(st.integers(-nd, nd - 1))
    elif granularity == "block":
        block = draw(_block_sizes(shape))
    elif granularity == "adversarial":
        axis = draw(st.one_of(st.none(), st.integers(-nd - 2, nd + 1), st.sampled_from([True, 1.0, "0"])))
        block = draw(st.one_of(st.none(), _block_sizes(shape)))
    p_shape = _param_shape_guess(draw, shape, axis, block)
    kw: dict[str, Any] = {}
    if op in ("quantize_dequantize", "quantize", "dequantize"):
        kw = {"scale": _scale_like(draw, p_shape), "offset": draw(st.one_of(
            st.none(), st.just("same"), st.just("same"),
            st.sampled_from([0.0, -3.0, 0.5, 1e30, -1e30, math.nan, math.inf])))}
        if kw["offset"] == "same":
            kw["offset"] = _scale_like(draw, p_shape, valid="integer")
        if axis is not None:
            kw["axis"] = axis
        if block is not None:
            kw["block_size"] = block
        if op != "dequantize":
            kw.update(bitwidth=bitwidth, signed=signed)
        if op != "quantize_dequantize":
            valid = [torch.float32, torch.int16, torch.int32] if op == "quantize" else [
                torch.float32, torch.float16, torch.bfloat16]
            kw["out_dtype"] = draw(st.sampled_from(valid) if draw(st.integers(0, 2)) else st.sampled_from(
                [torch.int8, torch.uint8, torch.int64, torch.float64, torch.float16, "float32"]))
        else:
            if draw(st.booleans()):
                kw["activation"] = draw(st.sampled_from([(0, None), (0, 6), (None, None), (6, 0), (math.nan, 1),
                                                         (1, 1), (None, -math.inf), 5, (0,), [0.0, 6.0]]))
            kw["lsq_grad_scale"] = draw(st.booleans())
    elif op == "quantize_dequantize_int32":
        kw = {"scale": _scale_like(draw, draw(st.sampled_from([(), _small(shape[-1:]), (2,), (7,)]))),
              "overflow": draw(st.sampled_from(["clamp", "float", "wrap", None]))}
    elif op == "adaround_weight":
        a_shape = draw(st.sampled_from([shape, shape, (1,) + shape, ()]))
        rows = _small(shape[:1])
        kw = {"alpha": draw(tensors(shape=a_shape, dtypes=(torch.float32, torch.float32, torch.float16))),
              "scale": _scale_like(draw, draw(st.sampled_from([(), rows, (5,)]))),
              "offset": draw(st.sampled_from([None, 0.0, -3.0, math.nan, 1e30])),
              "bitwidth": bitwidth, "signed": signed, "hard": draw(st.booleans())}
    elif op == "adaround_regularizer":
        kw = {"beta": draw(st.one_of(st.sampled_from([20.0, 2.0, 0.0, -1.0, math.nan, math.inf, 1e30]),
                                     st.floats(allow_nan=True)))}
    elif op == "adaround_init_alpha":
        rows = _small(shape[:1])
        kw = {"scale": _scale_like(draw, draw(st.sampled_from([(), rows, (5,)])))}
    return {"op": op, "x": x, "kwargs": kw}


def _materialize(v: Any) -> Any:
    if isinstance(v, tuple) and len(v) == 3 and v[0] == "tensor":
        t = make_tensor(v[1])
        return t.reshape(()) if v[2] and t.numel() == 1 else t
    if isinstance(v, tuple) and len(v) == 5 and isinstance(v[1], torch.dtype):
        return make_tensor(v)
    return v


def _expected_fake_quant(op: str, x: torch.Tensor, kw: dict, out: torch.Tensor) -> torch.Tensor:
    """The result of 5.2 computed here with plain torch: the scale and offset spread over x's elements, then
    the formula in float32 (round half to even)."""
    if x.numel() == 0:
        dtype = x.dtype if op == "quantize_dequantize" else kw.get("out_dtype", torch.float32)
        return torch.empty(x.shape, dtype=dtype)
    scale = kw["scale"]
    s = scale.float() if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))
    off = kw.get("offset")
    o = torch.zeros_like(s) if off is None else (off.float() if isinstance(off, torch.Tensor) else
                                                 torch.full_like(s, float(off)))
    nd = x.dim()
    if kw.get("axis") is not None:
        shape = [1] * nd
        shape[kw["axis"] % nd] = -1
        s, o = s.reshape(shape), o.reshape(shape)
    elif kw.get("block_size") is not None:
        full = [1 if b == -1 else n // b for n, b in zip(x.shape, kw["block_size"])]
        s, o = s.reshape(full), o.reshape(full)
        for d, n in enumerate(x.shape):
            if s.shape[d] > 1 and n:  # size 1 broadcasts
                s = s.repeat_interleave(n // s.shape[d], dim=d)
                o = o.repeat_interleave(n // o.shape[d], dim=d)
    else:
        s, o = s.reshape(()), o.reshape(())
    if op == "dequantize":
        return ((x.float() + o) * s).to(kw.get("out_dtype", torch.float32))
    qmin, qmax = pqo.grid(kw["bitwidth"], kw["signed"])
    xf = x.float()
    act = kw.get("activation")
    if act is not None:
        lo, hi = act
        xf = torch.clamp(xf, min=lo, max=hi) if (lo is not None or hi is not None) else xf
    q = torch.clamp(torch.round(xf / s) - o, qmin, qmax)
    if op == "quantize":
        return q.to(kw.get("out_dtype", torch.float32))
    return ((q + o) * s).to(x.dtype)


def _expected_adaround(w: torch.Tensor, kw: dict) -> torch.Tensor:
    """AdaRound's weight (docs/design.md 5.10) computed here with plain torch."""
    def per_row(v: Any) -> torch.Tensor:
        t = (v if isinstance(v, torch.Tensor) else torch.tensor(float(v or 0.0))).float().reshape(-1)
        return t.reshape((-1,) + (1,) * (w.dim() - 1)) if w.dim() > 0 else t.reshape(())
    s, o = per_row(kw["scale"]), per_row(kw.get("offset"))
    qmin, qmax = pqo.grid(kw.get("bitwidth", 4), kw.get("signed", True))
    alpha = kw["alpha"]
    sig = torch.sigmoid(alpha.double()).float()
    h = (alpha >= 0).float() if kw.get("hard") else torch.clamp(sig * 1.2 + (-0.1), 0, 1)
    t = (torch.floor(w / s) + h) - o
    return (torch.clamp(t, qmin, qmax) + o) * s


@functools.lru_cache(maxsize=None)
def warm_ops() -> None:
    """Calls every public op once, forward and backward, so that what torch does on a first call (imports,
    dispatcher and autograd set-up) is done before any example runs under the time limit."""
    w = torch.randn(4, 8, requires_grad=True)
    s, o = torch.full((4, 1), 0.1, requires_grad=True), torch.zeros(4, 1, requires_grad=True)
    pqo.quantize_dequantize(w, s, o, axis=0).sum().backward()
    pqo.dequantize(pqo.quantize(w.detach(), 0.1, out_dtype=torch.int16), 0.1)
    pqo.quantize_dequantize_int32(w, 0.01).sum().backward()
    alpha = pqo.adaround_init_alpha(w.detach(), 0.1).requires_grad_(True)
    (pqo.adaround_weight(w.detach(), alpha, 0.1).sum() + pqo.adaround_regularizer(alpha, 2.0)).backward()


def run_op(ex: dict) -> str:
    warm_ops()
    op = ex["op"]
    fn = getattr(pqo, op)
    kw = {k: _materialize(v) for k, v in ex["kwargs"].items()}
    args = [] if op == "grid" else [make_tensor(ex["x"])]
    try:
        with time_limit(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(*args, **kw)
    except BaseException as exc:
        return _refusal(exc, (ValueError, TypeError), ex, list(OP_ARGS[op]))
    if op == "grid":
        qmin, qmax = out
        if not (isinstance(kw["bitwidth"], int) and 2 <= kw["bitwidth"] <= 16 and qmin < qmax):
            raise FuzzFailure(f"grid accepted {kw}: {out}")
        return "accepted"
    x = args[0]
    _check_accepted_op(op, x, kw, out, ex)
    return "accepted"


def _check_accepted_op(op: str, x: torch.Tensor, kw: dict, out: Any, ex: dict) -> None:
    scale = kw.get("scale")
    s = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale)) if scale is not None else None
    if s is not None and s.numel() and not bool((torch.isfinite(s.float()) & (s.float() > 0)).all()):
        raise FuzzFailure(f"{op} accepted scale {s.flatten()[:4].tolist()}\ninput: {_short(ex)}")
    off = kw.get("offset")
    if isinstance(off, (int, float)) and not math.isfinite(off) or isinstance(off, torch.Tensor) and not bool(
            torch.isfinite(off.float()).all()):
        raise FuzzFailure(f"{op} accepted a non-finite offset\ninput: {_short(ex)}")
    if op in ("quantize_dequantize", "quantize", "dequantize"):
        if out.shape != x.shape:
            raise FuzzFailure(f"{op}: output shape {tuple(out.shape)} for input {tuple(x.shape)}")
        want = _expected_fake_quant(op, x, kw, out)
        if out.dtype != want.dtype or not torch.equal(torch.nan_to_num(out.float(), 7.0, 8.0, -8.0),
                                                       torch.nan_to_num(want.float(), 7.0, 8.0, -8.0)) \
                or not torch.equal(out.float().isnan(), want.float().isnan()):
            bad = (out.float() != want.float()) & ~(out.float().isnan() & want.float().isnan())
            raise FuzzFailure(f"{op} differs from the formula at {int(bad.sum())} elements "
                              f"(first: {out.float()[bad][:3].tolist()} vs {want.float()[bad][:3].tolist()})\n"
                              f"input: {_short(ex)}")
    elif op == "quantize_dequantize_int32":
        if out.shape != x.shape or out.dtype != x.dtype:
            raise FuzzFailure(f"{op}: output {tuple(out.shape)} {out.dtype} for input {tuple(x.shape)} {x.dtype}")
    elif op == "adaround_weight":
        if out.shape != x.shape or out.dtype != torch.float32:
            raise FuzzFailure(f"{op}: output {tuple(out.shape)} {out.dtype} for w {tuple(x.shape)}")
        want = _expected_adaround(x, kw)
        if not torch.equal(out.isnan(), want.isnan()) or not torch.equal(torch.nan_to_num(out, 7.0),
                                                                          torch.nan_to_num(want, 7.0)):
            raise FuzzFailure(f"{op} differs from the formula of 5.10\ninput: {_short(ex)}")
    elif op == "adaround_regularizer":
        beta = kw["beta"]
        if not (math.isfinite(beta) and beta > 0):
            raise FuzzFailure(f"{op} accepted beta={beta}")
    elif op == "adaround_init_alpha":
        if out.shape != x.shape:
            raise FuzzFailure(f"{op}: output {tuple(out.shape)} for w {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------------------
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("encodings", "encodings reader: mutated 0.6.1 / 1.0.0 / 2.0.0 files (per block, LPBQ) and texts",
           encodings_inputs, run_encodings),
    Target("config", "hardware-config loader: mutated profiles and configs, damaged JSON files",
           config_inputs, run_config),
    Target("checkpoint", "QuantSim.load_checkpoint: mutated state dicts saved with torch.save",
           checkpoint_inputs, run_checkpoint),
    Target("cli", "pyquant.cli.main(argv): random commands, flags, values and paths",
           cli_inputs, run_cli),
    Target("ops", "pyquant.ops: shapes, strides, dtypes, NaN/inf, scales, offsets, bit widths, blocks",
           op_inputs, run_op),
)}
