"""Reports of a pruning run: before/after table in the terminal and a self-contained HTML page."""
from __future__ import annotations

import base64
import html
from typing import Any

from rich.console import Console
from rich.table import Table

from graphprune.execution.measure import Figures
from graphprune.io import write_text_atomic
from graphprune.report.plots import figure_png, fmt_count, plot_spectra, pyplot

__all__ = ["before_after_rows", "group_rows", "prune_figures_table", "write_prune_html"]


def before_after_rows(figures: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, before, after, change) rows from a workspace's figures."""
    b, a = figures.get("before"), figures.get("after")
    rows: list[tuple[str, str, str, str]] = []
    if isinstance(b, Figures) and isinstance(a, Figures):
        if b.accuracy is not None and a.accuracy is not None:
            rows.append(("accuracy", f"{b.accuracy:.4f}", f"{a.accuracy:.4f}", f"{100 * (a.accuracy - b.accuracy):+.2f} pp"))
        rows.append(("parameters", fmt_count(b.params), fmt_count(a.params), f"{b.params / max(1, a.params):.2f}x smaller"))
        rows.append(("MACs / sample", fmt_count(b.macs), fmt_count(a.macs), f"{b.macs / max(1, a.macs):.2f}x fewer"))
        if b.latency_ms and a.latency_ms:
            rows.append((f"latency, batch 1 ({figures.get('provider', 'onnxruntime')})", f"{b.latency_ms:.3f} ms",
                         f"{a.latency_ms:.3f} ms", f"{b.latency_ms / a.latency_ms:.2f}x faster"))
    if "max_macs_reduction" in figures:
        rows.append(("estimated maximum compression", "", f"{figures['max_macs_reduction']:.2f}x MACs",
                     f"{figures['max_params_reduction']:.2f}x params"))
    if figures.get("exact_max_abs_error") is not None:
        rows.append(("exact after rewrite (max abs error)", "", f"{figures['exact_max_abs_error']:.2g}", ""))
    if "target" in figures:
        rows.append(("target", "", str(figures["target"]), ""))
    return rows


def prune_figures_table(ws: Any, console: Console) -> None:
    table = Table(title="graphprune: before / after")
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="right")
    for row in before_after_rows(ws.figures):
        table.add_row(*row)
    console.print(table)


def group_rows(ws: Any) -> list[dict[str, Any]]:
    """Per prunable group: channels, effective filters (when analysed) and kept channels."""
    coupling = ws.groups()
    kept = {g.group: len(g.keep) for g in ws.plan.groups} if ws.plan else {}
    effective = {g.group: g.effective for g in ws.analysis.groups} if ws.analysis else {}
    return [
        {"group": g.id, "anchor": g.anchor, "channels": g.channels, "effective": effective.get(g.id),
         "kept": kept.get(g.id, g.channels)}
        for g in coupling.prunable
    ]


def _plot(ws: Any) -> str:
    plt = pyplot()
    rows = group_rows(ws)
    spectra = ws.analysis.groups if ws.analysis else ()
    fig, axes = plt.subplots(1, 2 if spectra else 1, figsize=(max(8.0, 0.35 * len(rows) + 6), 4.2), squeeze=False)
    ax = axes[0][0]
    xs = list(range(len(rows)))
    ax.bar(xs, [r["channels"] for r in rows], color="#dfe6e9", label="channels")
    if ws.analysis:
        ax.plot(xs, [r["effective"] if r["effective"] is not None else float("nan") for r in rows], "k_", ms=14, mew=2, label="effective filters")
    ax.bar(xs, [r["kept"] for r in rows], width=0.5, color="#0984e3", label="kept")
    ax.set_xticks(xs, [str(r["group"]) for r in rows], fontsize=7, rotation=90 if len(rows) > 30 else 0)
    ax.set_xlabel("group")
    ax.set_ylabel("channels")
    ax.set_title("channels: total, effective, kept")
    ax.legend(fontsize=8)
    if spectra:
        plot_spectra(axes[0][1], spectra)
    return base64.b64encode(figure_png(fig)).decode()


def write_prune_html(ws: Any, path: Any, title: str) -> None:
    """One self-contained page: before/after table, per-group chart and spectra, per-group table."""
    esc = html.escape
    table = "".join(f"<tr><th>{esc(a)}</th><td>{esc(b)}</td><td>{esc(c)}</td><td>{esc(d)}</td></tr>" for a, b, c, d in before_after_rows(ws.figures))
    groups = "".join(
        "<tr>" + "".join(f"<td>{esc('' if v is None else str(v))}</td>" for v in (r["group"], r["anchor"], r["channels"], r["effective"], r["kept"])) + "</tr>"
        for r in group_rows(ws)
    )
    meta = esc(", ".join(f"{k}={v}" for k, v in (ws.plan.meta.items() if ws.plan else [])))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head>
<body><h1>{esc(title)}</h1><p>plan: {meta}</p>
<table><thead><tr><th></th><th>before</th><th>after</th><th>change</th></tr></thead><tbody>{table}</tbody></table>
<img alt="channels per group and spectra" src="data:image/png;base64,{_plot(ws)}" style="max-width:100%">
<table><thead><tr><th>group</th><th>anchor</th><th>channels</th><th>effective</th><th>kept</th></tr></thead><tbody>{groups}</tbody></table>
</body></html>
"""
    write_text_atomic(path, page)
