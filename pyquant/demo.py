"""`python -m pyquant.demo`: what this install can do, and fake quantization of a weight at several
granularities and bit widths, with the noise each leaves (SQNR) and the kernel speed against torch."""
from __future__ import annotations

import json
import time

import torch

import pyquant
import pyquant.ops as pqo


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).mean() / (x - y).pow(2).mean()))


def _minmax_scale(w: torch.Tensor, bits: int, dims: tuple[int, ...]) -> torch.Tensor:
    """Symmetric scale from the absolute maximum over `dims` (kept as size-1 dims)."""
    amax = w.abs().amax(dim=dims, keepdim=True) if dims else w.abs().amax()
    return (amax / (2 ** (bits - 1) - 1)).clamp_min(torch.finfo(torch.float32).eps)


def main() -> None:
    print("pyquant", pyquant.__version__, json.dumps(pyquant.native_info()))
    g = torch.Generator().manual_seed(0)
    # A weight whose output channels have very different ranges, as after batch-norm folding.
    w = torch.randn(512, 1024, generator=g) * torch.logspace(-2, 0, 512).unsqueeze(1)
    print(f"\nweight {tuple(w.shape)}, channel ranges spread over 100x")
    print(f"{'bits':>4} {'granularity':<22} {'SQNR dB':>8}")
    for bits in (8, 4):
        rows = [
            ("per-tensor", dict(), _minmax_scale(w, bits, ())),
            ("per-channel (axis 0)", dict(axis=0), _minmax_scale(w, bits, (1,)).reshape(-1)),
            ("per-block (1, 64)", dict(block_size=(1, 64)),
             _minmax_scale(w.reshape(512, 16, 64), bits, (2,)).reshape(512, 16)),
        ]
        for name, kw, s in rows:
            y = pqo.quantize_dequantize(w, s, bitwidth=bits, signed=True, **kw)
            print(f"{bits:>4} {name:<22} {sqnr_db(w, y):8.2f}")

    x = torch.randn(4096, 4096, generator=g)
    s = torch.full((4096,), 0.02)
    zp = torch.full((4096,), 128, dtype=torch.int32)

    def best(fn, n=5):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[n // 2]

    t_pq = best(lambda: pqo.quantize_dequantize(x, s, -zp.float(), bitwidth=8, axis=0))
    t_torch = best(lambda: torch.fake_quantize_per_channel_affine(x, s, zp, 0, 0, 255))
    t_clone = best(lambda: x.clone())
    print(f"\nper-channel fake-quant of 16M floats: pyquant {t_pq * 1e3:.1f} ms, torch {t_torch * 1e3:.1f} ms "
          f"({t_torch / t_pq:.1f}x faster), x.clone() {t_clone * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
