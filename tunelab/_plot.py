"""Matplotlib figures drawn on the Agg canvas, without touching pyplot's global backend
(which would break inline plots in a user's notebook)."""

from __future__ import annotations

import io

from tunelab._optional import require


def new_figure(width: float, height: float):
    require("matplotlib", "eval")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
