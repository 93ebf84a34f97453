"""Analysis results for people: terminal table, PNG plot, self-contained HTML page."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from graphprune.analysis import Analysis
from graphprune.io import write_bytes_atomic, write_text_atomic

__all__ = ["analysis_table", "analysis_plot_png", "write_plot", "write_html"]


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def analysis_table(analysis: Analysis, console: Console) -> None:
    """One row per analysed group, then the network's maximum compression."""
    o = analysis.options
    table = Table(title=f"Effective filters ({analysis.samples} samples, loss={o.loss}, eps={o.eps:g})")
    cols = ("group", "anchor", "channels", "effective", "redundancy", "elim.", "overlap", "lin. dep.", "halves", "pred. loss")
    for col in cols:
        table.add_column(col, justify="left" if col == "anchor" else "right")
    for g in analysis.groups:
        s = g.singular
        halves = f"{g.half_ranks[0]}/{g.half_ranks[1]}" + (" !" if g.stability > max(1, 0.1 * g.effective) else "")
        table.add_row(
            str(g.group), g.anchor[:48], str(g.channels), str(g.effective), f"{g.redundancy:.0%}",
            str(s.elimination), str(s.overlap), str(s.linear_dependence), halves, f"{g.predicted_loss:.2e}",
        )
    console.print(table)
    for gid, reason in sorted(analysis.skipped.items()):
        console.print(f"group {gid} not analysed: {reason}")
    warned = [g for g in analysis.groups if g.warning]
    if warned:
        console.print(f"[yellow]warning:[/] {warned[0].warning} (and {len(warned) - 1} more group(s))" if len(warned) > 1 else f"[yellow]warning:[/] {warned[0].warning}")
    lim = analysis.limit
    console.print(
        f"maximum compression (every group at its effective filters): MACs {_fmt(lim.original.macs)} -> "
        f"{_fmt(lim.at_limit.macs)} ({lim.macs_reduction:.2f}x), parameters {_fmt(lim.original.params)} -> "
        f"{_fmt(lim.at_limit.params)} ({lim.params_reduction:.2f}x)"
    )


def analysis_plot_png(analysis: Analysis) -> bytes:
    """Per-group bars (channels vs effective filters) and normalised spectra, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = analysis.groups
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8.0, 0.35 * len(groups) + 6), 4.2))
    xs = range(len(groups))
    ax1.bar(xs, [g.channels for g in groups], color="#c8d6e5", label="channels")
    ax1.bar(xs, [g.effective for g in groups], color="#2e86de", label="effective filters")
    ax1.set_xticks(list(xs), [str(g.group) for g in groups], fontsize=7, rotation=90 if len(groups) > 30 else 0)
    ax1.set_xlabel("group")
    ax1.set_ylabel("channels")
    ax1.legend(fontsize=8)
    ax1.set_title("channels and effective filters per group")
    for g in groups:
        eig = [v for v in g.eigenvalues]
        top = eig[0] if eig and eig[0] > 0 else 1.0
        ys = [max(v / top, 1e-16) for v in eig]
        ax2.plot([(i + 1) / len(eig) for i in range(len(eig))], ys, lw=0.8, alpha=0.7)
    ax2.set_yscale("log")
    ax2.set_ylim(bottom=1e-12)
    ax2.set_xlabel("eigenvalue index / channels")
    ax2.set_ylabel("eigenvalue / largest")
    ax2.set_title("spectra of F_g")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_plot(analysis: Analysis, path: Path) -> None:
    write_bytes_atomic(path, analysis_plot_png(analysis))


def write_html(analysis: Analysis, path: Path, title: str = "graphprune analysis") -> None:
    """One self-contained page: summary, embedded plot, per-group table."""
    png = base64.b64encode(analysis_plot_png(analysis)).decode()
    lim = analysis.limit
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            g.group, g.anchor, g.channels, g.effective, f"{g.redundancy:.0%}", g.singular.elimination,
            g.singular.overlap, g.singular.linear_dependence, f"{g.half_ranks[0]}/{g.half_ranks[1]}",
            f"{g.predicted_loss:.2e}", g.warning or "",
        )) + "</tr>"
        for g in analysis.groups
    )
    head = "".join(f"<th>{h}</th>" for h in ("group", "anchor", "channels", "effective", "redundancy", "elimination",
                                             "overlap", "linear dep.", "halves", "predicted loss", "warning"))
    skipped = "".join(f"<li>group {k}: {html.escape(v)}</li>" for k, v in sorted(analysis.skipped.items()))
    o = analysis.options
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}td:nth-child(2){{text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{analysis.samples} samples, loss <b>{html.escape(o.loss)}</b>, eps {o.eps:g}.
Estimated maximum compression: MACs {_fmt(lim.original.macs)} &rarr; {_fmt(lim.at_limit.macs)}
(<b>{lim.macs_reduction:.2f}x</b>), parameters {_fmt(lim.original.params)} &rarr; {_fmt(lim.at_limit.params)}
(<b>{lim.params_reduction:.2f}x</b>).</p>
<img alt="channels, effective filters and spectra per group" src="data:image/png;base64,{png}" style="max-width:100%">
<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
{"<h2>Not analysed</h2><ul>" + skipped + "</ul>" if skipped else ""}
</body></html>
"""
    write_text_atomic(path, page)

