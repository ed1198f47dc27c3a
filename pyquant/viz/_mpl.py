"""matplotlib, imported on first use and drawn off-screen (Agg canvas per figure: pyplot's global
backend is never touched, so importing pyquant.viz does not change a notebook's plotting)."""
from __future__ import annotations

import io
from typing import Any


def figure(width: float = 8.0, height: float = 3.2) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("pyquant.viz draws with matplotlib, which is not installed: pip install matplotlib "
                          "(or pip install 'pyquant[viz]')") from exc
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
