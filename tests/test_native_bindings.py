"""The native modules' op signatures against what pyquant/ops/_backend.py passes: the parameter names and
their order (declared once in csrc/include/pyquant/op_args.h), the number of positional arguments of each
call, and the error an op gives for a dtype outside its set."""
from __future__ import annotations

import math
import re

import pytest
import torch

from pyquant import _native
from pyquant.ops import _backend, _layout

C = _native.cpu_module()
G = _native.cuda_module()


def parameter_names(fn) -> tuple[str, ...]:
    """Parameter names from the signature line pybind11 puts first in a function's __doc__."""
    first = fn.__doc__.splitlines()[0]
    m = re.fullmatch(rf"{fn.__name__}\((.*)\) -> .*", first)
    assert m, f"no signature line in {fn.__name__}.__doc__: {first!r}"
    return tuple(re.findall(r"(?:^|, )(\w+):", m.group(1)))


@pytest.mark.parametrize("name", sorted(_backend.NATIVE_PARAMS["cpu"]))
def test_cpu_signature(name):
    assert parameter_names(getattr(C, name)) == _backend.NATIVE_PARAMS["cpu"][name]


@pytest.mark.skipif(G is None, reason="pyquant._C_cuda was not built")
@pytest.mark.parametrize("name", sorted(_backend.NATIVE_PARAMS["cuda"]))
def test_cuda_signature(name):
    assert parameter_names(getattr(G, name)) == _backend.NATIVE_PARAMS["cuda"][name]


def test_the_parser_reads_names_and_order():
    assert parameter_names(C.search)[:3] == ("counts", "G", "nbins")
    assert parameter_names(C.fake_quant_forward)[-3:] == ("layout", "act_lo", "act_hi")


class _Recorder:
    """Passes calls through to a module, recording each op's positional argument count."""

    def __init__(self, module):
        self._m = module
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        attr = getattr(self._m, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def call(*args, **kwargs):
            assert not kwargs, f"{name} called with keywords {sorted(kwargs)}"
            self.calls[name] = len(args)
            return attr(*args)
        return call


def test_cpu_backend_calls_pass_the_declared_parameters():
    rec = _Recorder(C)
    b = _backend.NativeBackend(rec, "cpu", ws_slots=C.num_threads, native_scale_check=True)
    x = torch.randn(2, 4, 6, 8)
    s, o = torch.full((1, 4, 1, 1), 0.05), torch.full((1, 4, 1, 1), -128.0)
    y = b.qdq(x, s, o, 0, 255, act_min=0.0)
    b.qdq_backward(torch.ones_like(y), x, s, o, 0, 255, 1.0, [True, True, True])
    b.dequantize(b.quantize(x, s, o, 0, 255, torch.uint8), s, o, torch.float32)
    mn, mx, _ = b.minmax(x, [1, 4, 1, 1])
    counts = b.histogram(x, mn, mx - mn, 16).reshape(4, 16)
    c0, bw = torch.zeros(4), torch.ones(4)
    b.search(counts, c0, bw, torch.ones(4, 3), torch.zeros(4, 3), 255, 1.0, 2.0)
    b.entropy_search(counts, 4)
    out, argmax = b.max_pool2d_window(x, [2, 2])
    b.max_pool2d_window_backward(torch.ones_like(out), argmax, [2, 2], list(x.shape))
    b.qdq_max_pool2d(x, s, o, 0, 255, [2, 2])
    w, alpha = torch.randn(4, 9), torch.randn(4, 9)
    ws, wo = torch.full((4, 1), 0.05), torch.zeros(4, 1)
    b.adaround_weight(w, alpha, ws, wo, -128, 127)
    b.adaround_weight_backward(torch.ones_like(w), w, alpha, ws, wo, -128, 127)
    b.adaround_regularizer(alpha, 2.0)
    b.minmax_encoding(-torch.rand(4), torch.rand(4), 0, 255, 1e-7, False, True)
    y, enc, state = b.minmax_qdq_forward(x, -torch.rand(1, 4, 1, 1), torch.rand(1, 4, 1, 1), 0, 255, 1e-7, False, 0.0)
    b.minmax_qdq_backward(torch.ones_like(y), x, enc, state, 0, 255, False, 1.0, True, (1, 4, 1, 1))
    b.int32_fake_quant(torch.randn(8), torch.full((8,), 0.01), "float")
    b.minmax_scale_product(-torch.rand(1), torch.rand(1), 0, 255, 1e-7, -torch.rand(4), torch.rand(4), -127, 127, 1e-7)
    expected = _backend.NATIVE_PARAMS["cpu"]
    assert set(rec.calls) == set(expected), "every CPU op is called above and declared in NATIVE_PARAMS"
    for name, n in rec.calls.items():
        assert n == len(expected[name]), name


def _minmax_args(x, code):
    layout = _layout._native_layout(C, tuple(x.shape), (1,) * x.dim())
    t = C.num_threads()
    mn, mx = torch.empty(1), torch.empty(1)
    nf = torch.empty(1, dtype=torch.int64)
    ws_f, ws_i = torch.empty(2 * t), torch.empty(t, dtype=torch.int64)
    return (x.data_ptr(), code, layout, mn.data_ptr(), mx.data_ptr(), nf.data_ptr(), ws_f.data_ptr(),
            ws_i.data_ptr()), (mn, mx, nf, ws_f, ws_i)


@pytest.mark.parametrize("code", [_layout.DTYPE_CODE[torch.int8], 7, -1])
def test_cpu_op_refuses_a_dtype_outside_its_set(code):
    x = torch.zeros(8, dtype=torch.int8)
    args, _keep = _minmax_args(x, code)
    with pytest.raises(RuntimeError, match=r"minmax: dtype must be float32, float16 or bfloat16"):
        C.minmax(*args)


def test_cpu_fake_quant_refuses_an_unknown_op_or_dtype():
    x = torch.randn(16)
    y = torch.empty_like(x)
    s, o = torch.ones(1), torch.zeros(1)
    layout = _layout._native_layout(C, (16,), (1,))
    f32 = _layout.DTYPE_CODE[torch.float32]

    def call(op, xdt, ydt):
        C.fake_quant_forward(op, x.data_ptr(), xdt, y.data_ptr(), ydt, s.data_ptr(), o.data_ptr(), 0.0, 255.0,
                             layout, -math.inf, math.inf)

    with pytest.raises(RuntimeError, match="fake_quant_forward: op must be 0"):
        call(3, f32, f32)
    with pytest.raises(RuntimeError, match="fake_quant_forward: dtype must be float32, float16, bfloat16, int8, "
                                           "uint8, int16 or int32"):
        call(0, f32, 9)
    call(0, f32, f32)
    assert torch.equal(y, torch.clamp(torch.round(x), 0, 255))


def test_per_level_objects_share_no_inline_code():
    """The CPU loops are compiled once per SIMD level and linked into one module: an out-of-line copy of a
    shared inline function (a weak symbol outside the level's own namespace) would be one symbol for all
    levels, and the linker could keep the AVX-512 copy for the baseline loops of a CPU without AVX-512.
    Checked on the object files of this checkout's build."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "build"
    objects = {isa: sorted(root.glob(f"*/CMakeFiles/pq_cpu_{isa}.dir/**/*.o")) for isa in ("scalar", "avx2", "avx512")}
    if shutil.which("nm") is None or not all(objects.values()):
        pytest.skip("needs nm and the per-level objects of a build in ./build")
    shared = []
    for isa, files in objects.items():
        for f in files:
            out = subprocess.run(["nm", "-C", str(f)], capture_output=True, text=True, check=True).stdout
            for line in out.splitlines():
                parts = line.split(maxsplit=2)
                if len(parts) == 3 and parts[1] in ("W", "V", "u") and parts[2].startswith("pq::") \
                        and f"pq::{isa}::" not in parts[2]:
                    shared.append(f"{f.name}: {parts[2]}")
    assert not shared, shared
