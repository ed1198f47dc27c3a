import pytest
import torch

import pyquant  # noqa: F401  (registers the ops)
from pyquant import _native

CUDA = torch.cuda.is_available() and _native.cuda_module() is not None


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU and pyquant._C_cuda")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip_cuda)


def devices():
    """cpu always; cuda as a marked parameter that skips without a GPU."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def simd_levels():
    C = _native.cpu_module()
    if C is None:
        return []
    levels = []
    for name in ("avx512", "avx2", "baseline"):
        if C.set_simd_level(name):
            levels.append(name)
    C.set_simd_level("auto")
    return levels


@pytest.fixture(params=simd_levels())
def simd(request):
    """Runs a test once per SIMD level this CPU supports, restoring the automatic choice after."""
    C = _native.cpu_module()
    assert C.set_simd_level(request.param)
    yield request.param
    C.set_simd_level("auto")
