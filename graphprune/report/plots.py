"""Shared pieces of the reports: number formatting, the spectra panel, figures as PNG bytes."""
from __future__ import annotations

import io
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphprune.planning.limit import CalibratedLimit

__all__ = ["figure_png", "fmt_count", "limit_png", "plot_limit", "plot_spectra", "pyplot"]


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


def plot_limit(ax: Any, limit: CalibratedLimit) -> None:
    """The measured calibration points (quality vs MACs reduction), the tolerance band and both limits."""
    pts = sorted(limit.points, key=lambda p: p.macs_reduction)
    ok = [p for p in pts if p.quality >= limit.threshold]
    bad = [p for p in pts if p.quality < limit.threshold]
    curve = limit.curve()
    ax.plot([x for x, _ in curve], [q for _, q in curve], "-", color="#636e72", lw=1, label="measured curve")
    ax.plot([p.macs_reduction for p in ok], [p.quality for p in ok], "o", color="#00b894", label="within tolerance")
    ax.plot([p.macs_reduction for p in bad], [p.quality for p in bad], "x", color="#d63031", ms=8, label="beyond tolerance")
    ax.axhline(limit.base_quality, color="k", lw=0.8, ls=":", label="original")
    ax.axhspan(limit.threshold, limit.base_quality, color="#55efc4", alpha=0.2, lw=0, label=f"tolerance {100 * limit.tolerance:g} pp")
    ax.axvline(limit.macs_reduction, color="#0984e3", lw=1.5, label=f"calibrated limit {limit.macs_reduction:.2f}x")
    ax.axvline(limit.spectral_macs_reduction, color="#e17055", lw=1.2, ls="--", label=f"spectral estimate {limit.spectral_macs_reduction:.2f}x")
    if limit.finetuned is not None:
        f = limit.finetuned
        ax.axvline(f.macs_reduction, color="#6c5ce7", lw=1.2, ls="-.",
                   label=f"after {f.epochs:g} epoch(s) fine-tuning {'>= ' if f.bounded else ''}{f.macs_reduction:.2f}x (estimate)")
    ax.set_xscale("log")
    ax.set_xlabel("MACs reduction (x)")
    ax.set_ylabel(f"{limit.metric}, held-out calibration samples")
    ax.set_title(f"calibrated limit ({limit.holdout} held-out samples, no fine-tuning)")
    ax.legend(fontsize=7)


def limit_png(limit: CalibratedLimit) -> bytes:
    """:func:`plot_limit` alone, as PNG bytes."""
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    plot_limit(ax, limit)
    return figure_png(fig)
