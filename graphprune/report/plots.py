"""Shared pieces of the reports: number formatting, the spectra panel, figures as PNG bytes."""
from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

__all__ = ["figure_png", "fmt_count", "plot_spectra", "pyplot"]


def fmt_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(ax: Any, groups: Iterable[Any]) -> None:
    """Each group's eigenvalues, normalised by the largest, on a log scale."""
    for g in groups:
        eig = list(g.eigenvalues)
        top = eig[0] if eig and eig[0] > 0 else 1.0
        ax.plot([(i + 1) / len(eig) for i in range(len(eig))], [max(v / top, 1e-16) for v in eig], lw=0.8, alpha=0.7)
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-12)
    ax.set_xlabel("eigenvalue index / channels")
    ax.set_ylabel("eigenvalue / largest")
    ax.set_title("spectra of F_g")


def figure_png(fig: Any) -> bytes:
    """Render and close a figure."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    pyplot().close(fig)
    return buf.getvalue()
