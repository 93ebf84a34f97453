"""Analysis results for people: terminal table, PNG plot, self-contained HTML page."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from rich.console import Console
from rich.table import Table

from graphprune.analysis.effective import Analysis
from graphprune.io import write_bytes_atomic, write_text_atomic
from graphprune.planning.limit import CalibratedLimit
from graphprune.report.plots import figure_png, fmt_count, limit_png, plot_spectra, pyplot

__all__ = ["analysis_plot_png", "analysis_table", "limit_html", "write_html", "write_plot"]


def analysis_table(analysis: Analysis, console: Console, limit: CalibratedLimit | None = None) -> None:
    """One row per analysed group (with its effective filters at the calibrated budget), then the network's limits."""
    o = analysis.options
    table = Table(title=f"Effective filters ({analysis.samples} samples, loss={o.loss}, eps={o.eps:g})")
    cols: tuple[str, ...] = ("group", "anchor", "channels", "effective", "redundancy", "elim.", "overlap", "lin. dep.", "halves",
                             "pred. loss")
    if limit is not None:
        cols = (*cols, "calibrated")
    for col in cols:
        table.add_column(col, justify="left" if col == "anchor" else "right")
    for g in analysis.groups:
        s = g.singular
        halves = f"{g.half_ranks[0]}/{g.half_ranks[1]}" + (" !" if g.stability > max(1, 0.1 * g.effective) else "")
        table.add_row(
            str(g.group), g.anchor[:48], str(g.channels), str(g.effective), f"{g.redundancy:.0%}",
            str(s.elimination), str(s.overlap), str(s.linear_dependence), halves, f"{g.predicted_loss:.2e}",
            *((str(limit.effective.get(g.group, g.channels)),) if limit is not None else ()),
        )
    console.print(table)
    for gid, reason in sorted(analysis.skipped.items()):
        console.print(f"group {gid} not analysed: {reason}")
    warned = [g for g in analysis.groups if g.warning]
    if warned:
        console.print(f"[yellow]warning:[/] {warned[0].warning} (and {len(warned) - 1} more group(s))" if len(warned) > 1 else f"[yellow]warning:[/] {warned[0].warning}")
    lim = analysis.limit
    console.print(
        f"maximum compression by the per-group energy rank (every group at its eps effective filters): MACs {fmt_count(lim.original.macs)} -> "
        f"{fmt_count(lim.at_limit.macs)} ({lim.macs_reduction:.2f}x), parameters {fmt_count(lim.original.params)} -> "
        f"{fmt_count(lim.at_limit.params)} ({lim.params_reduction:.2f}x)"
    )
    for line in limit.lines() if limit is not None else ():
        console.print(line, markup=False, highlight=False)


def analysis_plot_png(analysis: Analysis) -> bytes:
    """Per-group bars (channels vs effective filters) and normalised spectra, as PNG bytes."""
    plt = pyplot()
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
    plot_spectra(ax2, groups)
    return figure_png(fig)


def write_plot(analysis: Analysis, path: Path, limit: CalibratedLimit | None = None) -> None:
    """The analysis plot; with a calibrated limit, its curve beside (``<stem>.limit.png``)."""
    write_bytes_atomic(path, analysis_plot_png(analysis))
    if limit is not None:
        write_bytes_atomic(path.with_name(path.stem + ".limit.png"), limit_png(limit))


def limit_html(limit: CalibratedLimit | None) -> str:
    """The calibrated limit's lines and its measured curve, as an HTML fragment ('' without one)."""
    if limit is None:
        return ""
    png = base64.b64encode(limit_png(limit)).decode()
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in limit.lines())
    return (f"<h2>Calibrated limit</h2><ul>{lines}</ul>"
            f'<img alt="measured calibration points and the limit" src="data:image/png;base64,{png}" style="max-width:100%">')


def write_html(analysis: Analysis, path: Path, title: str = "graphprune analysis", limit: CalibratedLimit | None = None) -> None:
    """One self-contained page: summary, embedded plot, the calibrated limit's curve, per-group table."""
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
Maximum compression by the per-group energy rank (eps): MACs {fmt_count(lim.original.macs)} &rarr; {fmt_count(lim.at_limit.macs)}
(<b>{lim.macs_reduction:.2f}x</b>), parameters {fmt_count(lim.original.params)} &rarr; {fmt_count(lim.at_limit.params)}
(<b>{lim.params_reduction:.2f}x</b>).</p>
<img alt="channels, effective filters and spectra per group" src="data:image/png;base64,{png}" style="max-width:100%">
{limit_html(limit)}
<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
{"<h2>Not analysed</h2><ul>" + skipped + "</ul>" if skipped else ""}
</body></html>
"""
    write_text_atomic(path, page)

