"""A dependency-free progress bar on stderr for pyquant's long steps (calibration, bias correction,
AdaRound, sensitivity sweeps). Shown on a terminal by default; `enabled=True/False` forces it."""
from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    def __init__(self, total: Optional[int], desc: str, enabled: Optional[bool] = None, width: int = 24):
        self.total = total
        self.desc = desc
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.width = width
        self.n = 0
        self.t0 = time.perf_counter()
        self.note = ""

    def update(self, n: int = 1, note: str = "") -> None:
        self.n += n
        self.note = note
        if self.enabled:
            self._draw()

    def _draw(self) -> None:
        dt = time.perf_counter() - self.t0
        if self.total:
            frac = min(self.n / self.total, 1.0)
            fill = int(frac * self.width)
            eta = dt / self.n * (self.total - self.n) if self.n else 0.0
            text = (f"\r{self.desc} [{'#' * fill}{'.' * (self.width - fill)}] {self.n}/{self.total} "
                    f"{dt:.0f}s<{eta:.0f}s {self.note}")
        else:
            text = f"\r{self.desc} {self.n} {dt:.0f}s {self.note}"
        print(text[:160].ljust(80), end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
