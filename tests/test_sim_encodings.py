"""Encodings files (pyquant.sim.encodings): exact round trips, atomic writes, AIMET-written files.

The files under tests/data/aimet_* were written by aimet-torch 2.42 (QuantizationSimModel.export for 1.0.0
and 0.6.1, QuantizationSimModel.onnx.export for 2.0.0, AffineEncoding.to_qnn_encoding_dict for the
aimet_entries_* files, which wrap those entries in the layouts AIMET's writers use); the values AIMET's
quantizers held are in aimet_reference_values.json (scale, v2 offset, get_min/get_max)."""
import json
import os
import pathlib
import zlib

import pytest
import torch

import pyquant
from pyquant.quant import Encoding, from_range, from_scale_offset
from pyquant.sim import encodings as E
from pyquant.sim.encodings import (EncodingsError, EncodingsWarning, encodings_to_json, load_encodings,
                                   read_encodings, write_encodings)

DATA = pathlib.Path(__file__).parent / "data"
REF = json.loads((DATA / "aimet_reference_values.json").read_text())
AIMET_PARAMS = ("conv1.weight", "dw.weight", "pw.weight", "fc.weight")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().to(torch.float32).view(torch.int32)


def _make(gran: str, bw: int, sym: bool, seed: int, *, activation: bool = False) -> Encoding:
    g = torch.Generator().manual_seed(seed)
    if gran == "pt":
        x = torch.randn(1000, generator=g) * 2 + 0.3
        return from_range(x.min(), x.max(), bw, sym)
    if gran == "pc":
        if activation:  # per channel of an NCHW activation
            x = torch.randn(4, 5, 6, 6, generator=g) * torch.rand(1, 5, 1, 1, generator=g) * 3
            return from_range(x.amin((0, 2, 3), keepdim=True), x.amax((0, 2, 3), keepdim=True), bw, sym)
        w = torch.randn(8, 16, 3, 3, generator=g) * torch.rand(8, 1, 1, 1, generator=g)
        return from_range(w.amin((1, 2, 3), keepdim=True), w.amax((1, 2, 3), keepdim=True), bw, sym)
    w = torch.randn(6, 64, generator=g) * torch.rand(6, 1, generator=g) + 0.05  # per block of 16 along dim 1
    r = w.reshape(6, 4, 16)
    return from_range(r.amin(-1), r.amax(-1), bw, sym, block_size=(1, 16))


def _assert_same(got: Encoding, want: Encoding, *, exact_shape: bool = True):
    assert got.bitwidth == want.bitwidth and got.symmetric == want.symmetric
    assert got.granularity == want.granularity
    if exact_shape:
        assert got.scale.shape == want.scale.shape and got.offset.shape == want.offset.shape
        assert got.block_size == want.block_size
    assert torch.equal(_bits(got.scale).flatten(), _bits(want.scale).flatten())  # bit for bit
    assert torch.equal(got.offset.flatten(), want.offset.flatten())
    rebuilt = from_scale_offset(want.scale, want.offset, want.bitwidth, want.symmetric)
    assert torch.equal(got.min.flatten(), rebuilt.min.flatten())
    assert torch.equal(got.max.flatten(), rebuilt.max.flatten())


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
@pytest.mark.parametrize("gran", ["pt", "pc", "pb"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bw", [4, 8, 16])
def test_round_trip(tmp_path, version, gran, sym, bw):
    seed = zlib.crc32(f"{gran}{sym}{bw}".encode()) % 1000
    par = {"layer.weight": _make(gran, bw, sym, seed)}
    act = {"layer.output": _make(gran, bw, sym, seed + 1, activation=True)}
    path = tmp_path / "m.encodings"
    write_encodings(path, act, par, version=version, quantizer_args={"param_bitwidth": bw})
    shapes = {n: tuple(e.scale.shape) for n, e in {**act, **par}.items()}
    got_act, got_par = load_encodings(path, shapes=shapes, param_names=par)
    assert set(got_act) == set(act) and set(got_par) == set(par)
    for n in act:
        _assert_same(got_act[n], act[n])
    for n in par:
        _assert_same(got_par[n], par[n])
    # without shape hints the values are the same, in the file's shape
    flat_act, flat_par = load_encodings(path, param_names=par)
    for n, e in {**act, **par}.items():
        _assert_same({**flat_act, **flat_par}[n], e, exact_shape=False)
    if version == "1.0.0":
        f = read_encodings(path)
        assert f.quantizer_args == {"param_bitwidth": bw} and f.excluded_layers == []
        assert f.producer["package"] == "pyquant"


def test_shapes_recovered_without_hints(tmp_path):
    """What the files themselves say about shapes."""
    pc_w, pc_a, pb, pt = _make("pc", 8, True, 1), _make("pc", 8, False, 2, activation=True), _make("pb", 4, False, 3), \
        _make("pt", 8, False, 4)
    write_encodings(tmp_path / "v2", {"a": pc_a, "t": pt}, {"w": pc_w, "b": pb}, version="2.0.0")
    act, par = load_encodings(tmp_path / "v2", param_names=["w", "b"])
    assert par["w"].scale.shape == (8,)                 # axis 0 of a weight: rank unknown, flat
    assert act["a"].scale.shape == (5, 1, 1)            # negative axis -3: exact right-aligned shape
    assert par["b"].scale.shape == (6, 4) and par["b"].block_size == (1, 16)  # nested per-block y_scale
    assert act["t"].scale.shape == ()
    write_encodings(tmp_path / "v1", {}, {"w": pc_w, "b": pb}, version="1.0.0")
    _, par = load_encodings(tmp_path / "v1")
    assert par["w"].scale.shape == (8,) and par["w"].granularity == "per_channel"
    assert par["b"].scale.shape == (24,) and par["b"].block_size == (16,) and par["b"].granularity == "per_block"
    # 2.0.0 without param_names: one list, everything comes back as activations
    act, par = load_encodings(tmp_path / "v2")
    assert set(act) == {"a", "t", "w", "b"} and par == {}


@pytest.mark.parametrize("gran", ["pt", "pc"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bw", [4, 8, 16])
def test_round_trip_legacy_0_6_1(tmp_path, gran, sym, bw):
    par = {"w": _make(gran, bw, sym, 7)}
    act = {"a": _make(gran, bw, sym, 8, activation=True)}
    write_encodings(tmp_path / "x", act, par, version="0.6.1", excluded_layers=["head"])
    shapes = {n: tuple(e.scale.shape) for n, e in {**act, **par}.items()}
    got_act, got_par = load_encodings(tmp_path / "x", shapes=shapes)
    _assert_same(got_act["a"], act["a"])
    _assert_same(got_par["w"], par["w"])
    assert read_encodings(tmp_path / "x").excluded_layers == ["head"]


def test_scales_bit_exact_for_awkward_floats(tmp_path):
    """Every float32 scale (subnormal-adjacent, huge, with long decimal expansions) reads back bit for bit."""
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(0x00800000, 0x7F000000, (4096,), generator=g, dtype=torch.int32)  # normal positives
    extra = torch.tensor([1.1920929e-07, 0.1, 1 / 3, 2 ** -126, 3.4e38, 1.0, 0.007843137718737125],
                         dtype=torch.float32)
    scale = torch.cat([bits.view(torch.float32), extra])
    enc = from_scale_offset(scale, torch.zeros_like(scale), 8, True)
    for version in ("1.0.0", "2.0.0", "0.6.1"):
        p = tmp_path / f"s{version}"
        write_encodings(p, {}, {"w": enc}, version=version)
        _, par = load_encodings(p, param_names=["w"])
        assert torch.equal(_bits(par["w"].scale), _bits(scale)), version


def test_file_offset_convention(tmp_path):
    """Symmetric: file offset o - 2^(bw-1); asymmetric: o unchanged; 2.0.0: y_zero_point = -o."""
    sym8, sym16, sym4 = _make("pt", 8, True, 1), _make("pt", 16, True, 1), _make("pt", 4, True, 1)
    asym = from_range(torch.tensor(-1.0), torch.tensor(3.0), 8, False)
    assert float(asym.offset) == -64.0
    write_encodings(tmp_path / "a", {"asym": asym}, {"s8": sym8, "s16": sym16, "s4": sym4})
    d = json.loads((tmp_path / "a").read_text())
    offs = {e["name"]: e["offset"] for e in d["param_encodings"] + d["activation_encodings"]}
    assert offs == {"s8": [-128], "s16": [-32768], "s4": [-8], "asym": [-64]}
    write_encodings(tmp_path / "b", {"asym": asym}, {"s8": sym8}, version="2.0.0")
    d = {e["name"]: e for e in json.loads((tmp_path / "b").read_text())["encodings"]}
    assert d["asym"] == {"name": "asym", "output_dtype": "uint8", "y_scale": float(asym.scale), "y_zero_point": 64}
    assert d["s8"] == {"name": "s8", "output_dtype": "int8", "y_scale": float(sym8.scale)}


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------
def _listing(folder):
    return sorted(os.listdir(folder))


def test_atomic_write_failure_mid_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.encodings"
    write_encodings(path, {}, {"w": _make("pc", 8, True, 1)})
    old = path.read_bytes()
    seen = {}

    def failing_fsync(fd):  # the new content is in the temp file; the disk "fails" before the rename
        seen["listing"] = _listing(tmp_path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(E.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_encodings(path, {}, {"w": _make("pc", 8, False, 2)})
    monkeypatch.undo()
    assert len(seen["listing"]) == 2 and any(n.startswith(".m.encodings.") for n in seen["listing"])
    assert path.read_bytes() == old
    assert _listing(tmp_path) == ["m.encodings"]  # no temp file left


@pytest.mark.parametrize("exc", [OSError("rename failed"), KeyboardInterrupt()])
def test_atomic_write_failure_at_rename(tmp_path, monkeypatch, exc):
    path = tmp_path / "m.encodings"
    write_encodings(path, {}, {"w": _make("pt", 8, True, 1)})
    old = path.read_bytes()

    def failing_replace(src, dst):
        raise exc

    monkeypatch.setattr(E.os, "replace", failing_replace)
    with pytest.raises(type(exc)):
        write_encodings(path, {}, {"w": _make("pt", 8, False, 2)})
    monkeypatch.undo()
    assert path.read_bytes() == old and _listing(tmp_path) == ["m.encodings"]


def test_invalid_encoding_touches_nothing(tmp_path):
    path = tmp_path / "m.encodings"
    write_encodings(path, {}, {"w": _make("pt", 8, True, 1)})
    old = path.read_bytes()
    bad = from_scale_offset(torch.tensor([0.1, float("nan")]).reshape(2, 1), torch.zeros(2, 1), 8, True)
    with pytest.raises(EncodingsError, match=r"w: scale must be positive and finite, got nan at index 1"):
        write_encodings(path, {"a": _make("pt", 8, False, 2)}, {"v": _make("pt", 8, True, 3), "w": bad})
    assert path.read_bytes() == old and _listing(tmp_path) == ["m.encodings"]
    with pytest.raises(EncodingsError, match="cannot write the encodings as JSON"):
        write_encodings(path, {}, {"w": _make("pt", 8, True, 2)}, quantizer_args={"fn": object()})
    assert path.read_bytes() == old and _listing(tmp_path) == ["m.encodings"]


def test_atomic_write_file_mode(tmp_path):
    path = tmp_path / "m.encodings"
    write_encodings(path, {}, {"w": _make("pt", 8, True, 1)})
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)  # like open(), not mkstemp's 0600
    os.chmod(path, 0o640)
    write_encodings(path, {}, {"w": _make("pt", 8, True, 2)})
    assert (path.stat().st_mode & 0o777) == 0o640  # an existing file keeps its mode


# ---------------------------------------------------------------------------------------------
# Files AIMET wrote
# ---------------------------------------------------------------------------------------------
def _check_against_reference(enc: Encoding, name: str, *, shape: bool = False):
    r = REF[name]
    assert enc.bitwidth == r["bitwidth"] and enc.symmetric == r["symmetric"], name
    assert torch.equal(_bits(enc.scale).flatten(), _bits(torch.tensor(r["scale"]))), name
    assert enc.offset.flatten().tolist() == r["offset_v2"], name
    assert torch.equal(enc.min.flatten(), torch.tensor(r["min"])), name  # AIMET's get_min(), bit for bit
    assert torch.equal(enc.max.flatten(), torch.tensor(r["max"])), name
    if shape:
        assert list(enc.scale.shape) == r["scale_shape"], name


@pytest.mark.parametrize("fname,kwargs", [
    ("aimet_mobilenet_like.encodings", {}),
    ("aimet_mobilenet_like_v2.encodings", {"param_names": AIMET_PARAMS}),
    ("aimet_mobilenet_like_v061.encodings", {}),
])
def test_aimet_model_export_loads(fname, kwargs):
    f = read_encodings(DATA / fname, **kwargs)
    assert set(f.params) == set(AIMET_PARAMS)
    for name in AIMET_PARAMS:
        e = f.params[name]
        assert e.granularity == "per_channel" and e.symmetric and e.bitwidth == 8
        _check_against_reference(e, name)
    assert f.activation and all(e.granularity == "per_tensor" and not e.symmetric for e in f.activation.values())
    # the same activation tensor gets the same encoding in every version AIMET wrote
    v1 = read_encodings(DATA / "aimet_mobilenet_like.encodings").activation
    for name in set(v1) & set(f.activation):
        _assert_same(f.activation[name], v1[name])
    assert "/relu1/Clip_output_0" in f.activation
    if f.version != "2.0.0":
        assert f.quantizer_args["quant_scheme"] == "post_training_tf_enhanced"
    assert f.producer == {"package": "aimet-torch", "version": "2.42.0"}


@pytest.mark.parametrize("fname", ["aimet_entries_v1.encodings", "aimet_entries_v2.encodings"])
def test_aimet_entries_all_granularities(fname):
    names = [n for n in REF if n not in AIMET_PARAMS]
    v2 = "v2" in fname
    f = read_encodings(DATA / fname, param_names=names if v2 else None)
    assert set(f.params) == set(names)
    for name in names:
        e = f.params[name]
        gran = {"pt": "per_tensor", "pc": "per_channel", "pb": "per_block"}[name[:2]]
        assert e.granularity == gran, name
        _check_against_reference(e, name, shape=v2)  # 2.0.0 gives the exact shape (negative axes, nested blocks)
        if gran == "per_block":
            assert e.block_size == ((1, 16) if v2 else (16,))


@pytest.mark.parametrize("fname,version,kwargs", [
    ("aimet_mobilenet_like.encodings", "1.0.0", {}),
    ("aimet_entries_v1.encodings", "1.0.0", {}),
    ("aimet_mobilenet_like_v061.encodings", "0.6.1", {}),
])
def test_pyquant_writes_what_aimet_writes(fname, version, kwargs):
    """Read an AIMET file, write it back with pyquant: the same file, byte for byte, but the producer."""
    f = read_encodings(DATA / fname)
    text = encodings_to_json(f.activation, f.params, version=version, quantizer_args=f.quantizer_args,
                             excluded_layers=f.excluded_layers)
    ours = json.loads(text)
    assert ours.pop("producer") == {"package": "pyquant", "version": pyquant.__version__}
    theirs = json.loads((DATA / fname).read_text())
    theirs.pop("producer")
    assert ours == theirs
    theirs["producer"] = {"package": "pyquant", "version": pyquant.__version__}
    assert text == json.dumps(theirs, sort_keys=True, indent=4)  # AIMET's formatting: sorted keys, indent 4


@pytest.mark.parametrize("fname,params", [
    ("aimet_mobilenet_like_v2.encodings", AIMET_PARAMS),
    ("aimet_entries_v2.encodings", ()),  # AIMET wrote these without a graph: negative axes, as for activations
])
def test_pyquant_writes_what_aimet_writes_2_0_0(fname, params):
    f = read_encodings(DATA / fname, param_names=params)
    ours = json.loads(encodings_to_json(f.activation, f.params, version="2.0.0"))
    theirs = json.loads((DATA / fname).read_text())
    assert list(ours) == list(theirs) == ["producer", "version", "encodings"]
    assert {e["name"]: e for e in ours["encodings"]} == {e["name"]: e for e in theirs["encodings"]}
    for e in ours["encodings"]:  # AIMET's key order within an entry
        assert list(e) == [k for k in ("name", "output_dtype", "y_scale", "y_zero_point", "axis", "block_size")
                           if k in e]


def test_pyquant_1_0_0_entry_schema_matches_aimet(tmp_path):
    """Key sets and JSON types of pyquant's 1.0.0 entries, per enc_type, are those of AIMET's entries."""
    theirs = json.loads((DATA / "aimet_entries_v1.encodings").read_text())["param_encodings"]
    theirs += json.loads((DATA / "aimet_mobilenet_like.encodings").read_text())["activation_encodings"]
    write_encodings(tmp_path / "x", {"a": _make("pt", 8, False, 1)},
                    {"pc": _make("pc", 4, True, 2), "pb": _make("pb", 16, False, 3)}, quantizer_args={"k": 1})
    top = json.loads((tmp_path / "x").read_text())
    aimet_top = json.loads((DATA / "aimet_mobilenet_like.encodings").read_text())
    assert set(top) == set(aimet_top)

    def schema(e):
        return {k: (type(v).__name__, sorted({type(x).__name__ for x in v}) if isinstance(v, list) else None)
                for k, v in e.items() if k != "name"} | {"enc_type": e["enc_type"]}

    aimet_schemas = {e["enc_type"]: schema(e) for e in theirs}
    assert set(aimet_schemas) == {"PER_TENSOR", "PER_CHANNEL", "PER_BLOCK"}
    for e in top["param_encodings"] + top["activation_encodings"]:
        assert schema(e) == aimet_schemas[e["enc_type"]], e["name"]


# ---------------------------------------------------------------------------------------------
# Errors and odd entries
# ---------------------------------------------------------------------------------------------
def _doc(entry, version="1.0.0"):
    if version == "2.0.0":
        return {"version": "2.0.0", "encodings": [entry]}
    return {"version": version, "activation_encodings": [], "param_encodings": [entry]}


@pytest.mark.parametrize("doc,message", [
    ({"version": "3.0.0", "encodings": []}, "version '3.0.0' is not supported"),
    ({"hello": 1}, "not an encodings file"),
    (_doc({"name": "w", "dtype": "INT", "bw": 8, "is_sym": True, "enc_type": "PER_TENSOR", "scale": [0.1],
           "offset": [-5]}), r"param_encodings\[0\] \('w'\): symmetric entry with offsets other than -128"),
    (_doc({"name": "w", "dtype": "INT", "bw": 8, "compressed_bw": 4, "is_sym": False, "enc_type": "LPBQ",
           "scale": [0.1], "offset": [0]}), r"\('w'\): LPBQ entries are symmetric"),
    (_doc({"name": "w", "dtype": "INT", "bw": 8, "is_sym": True, "enc_type": "ROWWISE", "scale": [0.1],
           "offset": [0]}), "enc_type 'ROWWISE' is not supported"),
    (_doc({"name": "w", "dtype": "INT", "bw": 8, "is_sym": False, "enc_type": "PER_CHANNEL", "scale": [0.1, 0.2],
           "offset": [0]}), "2 scales but 1 offsets"),
    (_doc({"name": "w", "dtype": "INT", "bw": 8, "is_sym": "True", "enc_type": "PER_TENSOR", "scale": [0.1],
           "offset": [-128]}), "is_sym must be true or false"),
    (_doc({"name": "w", "dtype": "INT", "bw": 8, "is_sym": False, "enc_type": "PER_TENSOR", "scale": [0.0],
           "offset": [0]}), "scales must be positive"),
    (_doc({"name": "w", "dtype": "INT", "bw": 8, "is_sym": False, "enc_type": "PER_TENSOR", "scale": [0.1],
           "offset": [-300]}), "offset out of range"),
    (_doc({"name": "w", "output_dtype": "uint8", "y_scale": 0.1, "y_zero_point": 127.5}, "2.0.0"),
     "fractional zero points are not supported"),
    (_doc({"name": "w", "output_dtype": "uint8", "y_scale": [[0.1, 0.2], [0.3]], "axis": 0, "block_size": 4},
          "2.0.0"), "not a rectangular array"),
    ({"version": "0.6.1", "activation_encodings": {"conv": {"output": {"0": {}}}}, "param_encodings": {}},
     "module-keyed layout"),
])
def test_read_errors(tmp_path, doc, message):
    p = tmp_path / "bad.encodings"
    p.write_text(json.dumps(doc))
    with pytest.raises(EncodingsError, match=message):
        load_encodings(p)


def test_float_and_wide_entries_are_set_aside(tmp_path):
    doc = {"version": "2.0.0", "encodings": [
        {"name": "x", "output_dtype": "uint8", "y_scale": 0.5, "y_zero_point": 3},
        {"name": "h", "output_dtype": "float16", "y_scale": 1.0},
        {"name": "fc.bias", "output_dtype": "int32", "y_scale": [1e-5, 2e-5], "axis": 0},
        {"name": "y", "output_dtype": "int8", "y_scale": 0.25, "y_zero_point": -10},  # signed asymmetric
    ]}
    p = tmp_path / "m.encodings"
    p.write_text(json.dumps(doc))
    f = read_encodings(p)
    assert f.float_tensors == {"h": 16} and f.skipped == {"fc.bias": "int32"}
    # a signed grid with a zero point is an asymmetric encoding on pyquant's unsigned grid
    y = f.activation["y"]
    assert not y.symmetric and float(y.offset) == 10 - 128
    with pytest.warns(EncodingsWarning, match="fc.bias"):
        act, _ = load_encodings(p)
    assert set(act) == {"x", "y"} and float(act["x"].offset) == -3
    # 1.0.0 float entries
    p.write_text(json.dumps(_doc({"name": "h", "dtype": "FLOAT", "bw": 16, "enc_type": "PER_TENSOR"})))
    assert read_encodings(p).float_tensors == {"h": 16}


def test_unsigned_and_strict_symmetric_entries_read_on_their_grids(tmp_path):
    p = tmp_path / "m.encodings"
    p.write_text(json.dumps(_doc({"name": "w", "dtype": "INT", "bw": 8, "is_sym": True, "enc_type": "PER_TENSOR",
                                  "scale": [0.5], "offset": [0]})))
    (_, par) = load_encodings(p)
    w = par["w"]
    assert w.symmetric and not w.signed and float(w.offset) == 0 and float(w.max) == 0.5 * 255 and w.qmin == 0
    p.write_text(json.dumps(_doc({"name": "w", "dtype": "INT", "bw": 8, "is_sym": True, "enc_type": "PER_TENSOR",
                                  "scale": [0.5], "offset": [-127]})))
    (_, par) = load_encodings(p)
    assert par["w"].strict and (par["w"].qmin, par["w"].qmax) == (-127, 127) and float(par["w"].min) == -63.5
    # both write back as they were read (1.0.0 and 0.6.1 name the grid by the offset)
    for version in ("1.0.0", "0.6.1"):
        for enc in (w, par["w"]):
            write_encodings(tmp_path / "b.encodings", {}, {"w": enc}, version=version)
            back = load_encodings(tmp_path / "b.encodings")[1]["w"]
            assert (back.symmetric, back.signed, back.strict) == (enc.symmetric, enc.signed, enc.strict)
            torch.testing.assert_close(back.scale.reshape(()), enc.scale.reshape(()))
    with pytest.raises(EncodingsError, match="offsets other than -128"):
        p.write_text(json.dumps(_doc({"name": "w", "dtype": "INT", "bw": 8, "is_sym": True,
                                      "enc_type": "PER_TENSOR", "scale": [0.5], "offset": [-3]})))
        load_encodings(p)


def test_write_errors(tmp_path):
    two_d = from_scale_offset(torch.full((4, 4), 0.1), torch.zeros(4, 4), 8, True)
    with pytest.raises(EncodingsError, match="varies along several axes .* no block_size"):
        write_encodings(tmp_path / "x", {}, {"w": two_d})
    blocks_2d = from_scale_offset(torch.full((4, 4), 0.1), torch.zeros(4, 4), 8, True, block_size=(2, 8))
    with pytest.raises(EncodingsError, match="blocks along several axes"):
        write_encodings(tmp_path / "x", {}, {"w": blocks_2d})
    with pytest.raises(EncodingsError, match="0.6.1 has no per-block"):
        write_encodings(tmp_path / "x", {}, {"w": _make("pb", 8, True, 1)}, version="0.6.1")
    frac = from_scale_offset(torch.tensor(0.1), torch.tensor(-3.5), 8, False)
    with pytest.raises(EncodingsError, match="offsets must be integers"):
        write_encodings(tmp_path / "x", {"a": frac}, {})
    with pytest.raises(EncodingsError, match="in both"):
        write_encodings(tmp_path / "x", {"t": _make("pt", 8, True, 1)}, {"t": _make("pt", 8, True, 1)},
                        version="2.0.0")
    with pytest.raises(EncodingsError, match="version must be one of"):
        write_encodings(tmp_path / "x", {}, {}, version="1.1")
    assert not (tmp_path / "x").exists() and _listing(tmp_path) == []


def test_single_block_per_block_encoding_is_written_per_channel(tmp_path):
    """block_size (1, K) on a (C, K) weight is one scale per channel: written as PER_CHANNEL (AIMET cannot
    export it as PER_BLOCK)."""
    w = torch.randn(4, 32)
    enc = from_range(w.amin(1, keepdim=True), w.amax(1, keepdim=True), 8, True, block_size=(1, 32))
    write_encodings(tmp_path / "x", {}, {"w": enc})
    entry = json.loads((tmp_path / "x").read_text())["param_encodings"][0]
    assert entry["enc_type"] == "PER_CHANNEL" and "block_size" not in entry
    _, par = load_encodings(tmp_path / "x", shapes={"w": (4, 1)})
    assert torch.equal(par["w"].scale, enc.scale) and par["w"].granularity == "per_channel"
