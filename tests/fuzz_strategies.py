"""Hypothesis strategies for malformed and adversarial inputs: mutations of valid JSON documents (encodings
files, hardware configs) and of their text, mutations of checkpoint state dicts, command lines, and
arguments of the public ops. The targets that feed them to pyquant are in fuzz_targets.py."""
from __future__ import annotations

import copy
import json
import math
from typing import Any, Sequence

import torch
from hypothesis import strategies as st

Path = tuple  # a path into a JSON tree: keys (str) and list indices (int)

# ---- single adversarial values ------------------------------------------------------------------------
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-45, 5e-324, 1e-38, 3.5e38, 1e300, -1e300,
                  0.5, 2.5, -0.5)
SPECIAL_INTS = (0, 1, -1, 2, 16, 17, 32, 33, 64, -128, 255, 256, 65535, 65536, 2 ** 31, -(2 ** 31) - 1, 2 ** 63,
                -(2 ** 63), 10 ** 400)
SPECIAL_STRINGS = ("", "8", "True", "False", "true", "NaN", "Infinity", "PER_BLOCK", "LPBQ", "int8", "uint4",
                   "float16", "INT", "\u00e9\u4e2d\U0001f600", "\ud800", "a" * 300, "\x00", "../../etc/passwd")


def scalars() -> st.SearchStrategy:
    """A JSON-representable value of the wrong kind or at the edge of a range."""
    return st.one_of(
        st.sampled_from(SPECIAL_FLOATS), st.sampled_from(SPECIAL_INTS), st.sampled_from(SPECIAL_STRINGS),
        st.booleans(), st.none(),
        st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
        st.text(max_size=12),
    )


def json_values(max_leaves: int = 6) -> st.SearchStrategy:
    """Any JSON value, nested a little."""
    return st.recursive(scalars(), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
        max_leaves=max_leaves)


# ---- JSON tree mutations --------------------------------------------------------------------------------
def tree_paths(doc: Any, prefix: Path = ()) -> list[Path]:
    """Every node's path, the root's included."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += tree_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += tree_paths(v, prefix + (i,))
    return out


def tree_get(doc: Any, path: Path) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _related_numbers(v: Any) -> st.SearchStrategy:
    """Numbers derived from a number: sign flips, out-of-range neighbours, fractions, overflow."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return st.sampled_from(SPECIAL_INTS + SPECIAL_FLOATS)
    try:
        x = float(v) if math.isfinite(float(v)) else 1.0
    except OverflowError:  # an int beyond float's range
        x = 1.0
    return st.sampled_from([-x, 0, x + 0.5, x * 1e30, x * 1e-30, int(x) + 1, int(x) - 1, int(x) * 2 ** 20,
                            math.nan, math.inf, -math.inf, 10 ** 400, str(v)])


MUTATIONS = ("drop", "replace", "number", "duplicate", "wrap", "unwrap", "resize", "rename", "retype", "swap")


@st.composite
def mutated_tree(draw, seed: Any, max_steps: int = 3) -> tuple[Any, list[tuple[str, Path]]]:
    """(a mutated copy of `seed`, the (mutation, path) steps applied)."""
    doc = copy.deepcopy(seed)
    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        paths = tree_paths(doc)
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(MUTATIONS))
        doc = _mutate(draw, doc, path, kind)
        steps.append((kind, path))
    return doc, steps


def _set(doc: Any, path: Path, value: Any) -> Any:
    if not path:
        return value
    tree_get(doc, path[:-1])[path[-1]] = value
    return doc


def _mutate(draw, doc: Any, path: Path, kind: str) -> Any:
    node = tree_get(doc, path)
    parent = tree_get(doc, path[:-1]) if path else None
    if kind == "drop":
        if not path:
            return {}
        del parent[path[-1]]
        return doc
    if kind == "replace":
        return _set(doc, path, draw(json_values()))
    if kind == "number":
        return _set(doc, path, draw(_related_numbers(node)))
    if kind == "duplicate":
        if isinstance(parent, list):
            parent.insert(path[-1], copy.deepcopy(node))
            return doc
        if isinstance(node, list) and node:
            node.append(copy.deepcopy(node[draw(st.integers(0, len(node) - 1))]))
            return doc
        return _set(doc, path, [node, copy.deepcopy(node)])
    if kind == "wrap":
        return _set(doc, path, draw(st.sampled_from([[node], {"value": node}, [[node]]])))
    if kind == "unwrap":
        if isinstance(node, list):
            return _set(doc, path, node[0] if node else None)
        if isinstance(node, dict):
            return _set(doc, path, next(iter(node.values())) if node else [])
        return _set(doc, path, [])
    if kind == "resize":
        if isinstance(node, list):
            n = draw(st.integers(0, len(node) + 3))
            fill = node[-1] if node else draw(scalars())
            return _set(doc, path, (node + [copy.deepcopy(fill)] * n)[:n])
        return _set(doc, path, [node] * draw(st.integers(0, 3)))
    if kind == "rename":
        if isinstance(parent, dict):
            new = draw(st.one_of(st.sampled_from(SPECIAL_STRINGS), st.text(max_size=10),
                                 st.just(str(path[-1]).upper()), st.just(str(path[-1]) + "_")))
            value = parent.pop(path[-1])
            parent[new] = value
            return doc
        return _set(doc, path, {str(draw(st.text(max_size=6))): node})
    if kind == "retype":
        if isinstance(node, bool):
            new = draw(st.sampled_from([str(node), int(node), None]))
        elif isinstance(node, (int, float)):
            new = draw(st.sampled_from([str(node), [node], bool(node), None]))
        elif isinstance(node, str):
            new = draw(st.sampled_from([node == "True", 8, [node], None, node.lower(), node.upper()]))
        else:
            new = draw(st.sampled_from([json.dumps(node), 0, None, True]))
        return _set(doc, path, new)
    if kind == "swap":  # the value of another node of the tree in this place
        other = draw(st.sampled_from(tree_paths(doc)))
        return _set(doc, path, copy.deepcopy(tree_get(doc, other)))
    raise AssertionError(kind)


# ---- text mutations --------------------------------------------------------------------------------------
TEXT_MUTATIONS = ("truncate", "insert", "replace_char", "bad_utf8", "bom", "deep", "big_number", "dup_key",
                  "nan_literal", "trailing")


@st.composite
def mutated_text(draw, text: str) -> tuple[bytes, str]:
    """(bytes of a damaged JSON text, the damage)."""
    kind = draw(st.sampled_from(TEXT_MUTATIONS))
    n = len(text)
    at = draw(st.integers(0, max(n - 1, 0)))
    if kind == "truncate":
        out = text[:at]
    elif kind == "insert":
        out = text[:at] + draw(st.text(min_size=1, max_size=8)) + text[at:]
    elif kind == "replace_char":
        out = text[:at] + draw(st.sampled_from(list("{}[],:\"0-.eE \\"))) + text[at + 1:]
    elif kind == "bad_utf8":
        return text[:at].encode() + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + \
            text[at:].encode(), kind
    elif kind == "bom":
        return b"\xef\xbb\xbf" + text.encode(), kind
    elif kind == "deep":
        depth = draw(st.sampled_from([1000, 100_000]))
        out = text[:at] + "[" * depth + "]" * depth + text[at:]
    elif kind == "big_number":
        out = text[:at] + "1" * draw(st.sampled_from([400, 5000])) + text[at:]
    elif kind == "dup_key":  # JSON objects may repeat a key; json keeps the last
        i = text.find('"', at)
        j = text.find('":', i + 1) if i >= 0 else -1
        if i < 0 or j < 0:
            out = text
        else:
            out = text[:i] + text[i:j + 2] + json.dumps(draw(json_values()), allow_nan=True) + ", " + text[i:]
    elif kind == "nan_literal":
        out = text[:at] + draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"])) + text[at:]
    else:
        out = text + draw(st.sampled_from(["}", "]", "garbage", "\x00", "{}"]))
    return out.encode("utf-8", "surrogatepass"), kind


# ---- tensors ----------------------------------------------------------------------------------------------
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ALL_DTYPES = FLOAT_DTYPES + (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)


def tensor_fill() -> st.SearchStrategy:
    """How to fill a tensor: random normal values, or containing NaN / inf / zeros / negatives / huge."""
    return st.sampled_from(["randn", "nan", "inf", "-inf", "zero", "negative", "huge", "tiny", "mixed"])


def fill_tensor(shape: Sequence[int], dtype: torch.dtype, fill: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * 3
    special = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "zero": 0.0, "huge": 1e38, "tiny": 1e-42}
    if fill in special and t.numel():
        t.view(-1)[torch.randint(0, t.numel(), (max(1, t.numel() // 3),), generator=g)] = special[fill]
    elif fill == "negative":
        t = -t.abs() - 0.1
    elif fill == "positive":  # a valid scale
        t = t.abs() * 0.05 + 1e-3
    elif fill == "integer":  # a valid offset of an 8-bit unsigned grid
        t = -(t.abs() * 20).round().clamp(0, 255)
    elif fill == "mixed" and t.numel():
        t.view(-1)[0] = math.nan
        t.view(-1)[-1] = math.inf
    if not dtype.is_floating_point:
        if dtype == torch.bool:
            return t > 0
        info = torch.iinfo(dtype)
        t = torch.nan_to_num(t, 0.0, info.max, info.min).round().clamp(info.min, info.max)
    return t.to(dtype)


def strided_views() -> st.SearchStrategy:
    """How to lay a tensor out in memory: contiguous, transposed, sliced with a step, expanded (stride 0)."""
    return st.sampled_from(["contiguous", "transpose", "step", "expand", "channels_last"])


def lay_out(t: torch.Tensor, how: str) -> torch.Tensor:
    """`t`'s values (same shape) in the memory layout `how` names."""
    if how == "transpose" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "step" and t.dim() >= 1 and t.numel():
        return torch.repeat_interleave(t, 2, dim=-1)[..., ::2]
    if how == "expand" and t.dim() >= 1 and t.numel() and all(k > 0 for k in t.shape):
        # the first element repeated: a stride-0 view of one value along dim 0
        return t.narrow(0, 0, 1).expand(t.shape)
    if how == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def shapes() -> st.SearchStrategy:
    """Tensor shapes: 0-d, small, zero-size, and huge dimensions with few (zero) elements."""
    small = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)
    zero = st.lists(st.integers(0, 4), min_size=1, max_size=4).filter(lambda s: 0 in s).map(tuple)
    huge_empty = st.tuples(st.just(0), st.sampled_from([2 ** 31 + 1, 2 ** 40, 2 ** 62]))
    return st.one_of(st.just(()), small, small, small, zero, huge_empty)

