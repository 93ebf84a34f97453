"""Reports of a pruning run: before/after table in the terminal and a self-contained HTML page."""
from __future__ import annotations

import base64
import dataclasses
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from graphprune.analysis.cost import cost_label, sequence_dims
from graphprune.errors import BadInputError
from graphprune.report.plots import figure_png, fmt_count, plot_spectra, pyplot

if TYPE_CHECKING:
    from graphprune.execution.measure import Figures
    from graphprune.pipeline.workspace import Validation, Workspace

__all__ = [
    "DEPLOY_COLUMNS",
    "ReportOptions",
    "before_after_rows",
    "deploy_json",
    "deploy_rows",
    "figures_json",
    "group_rows",
    "prediction_change",
    "prune_figures_table",
    "report_json",
    "speed_change",
    "write_prune_html",
    "write_reports",
]


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """Report files beside the output model (``<out>.report.json`` / ``.html``), or at the paths given."""

    html: bool = True
    json: bool = True
    json_path: str = ""
    html_path: str = ""
    table: bool = True


def speed_change(before_ms: float, after_ms: float) -> str:
    """'1.30x faster' or '1.15x slower' (never '0.87x faster')."""
    ratio = before_ms / after_ms
    return f"{ratio:.2f}x faster" if ratio >= 1.0 else f"{1.0 / ratio:.2f}x slower"


def prediction_change(v: Validation) -> str:
    """'+15.1% error (+3.2% as a fraction of the original)': in ms, then with the machine's change of speed since
    profiling cancelled (the original timed beside the pruned model against the latency model's own timing)."""
    assert v.prediction_error is not None
    out = f"{100 * v.prediction_error:+.1f}% error"
    rel = v.relative_prediction_error
    return out if rel is None else f"{out} ({100 * rel:+.1f}% as a fraction of the original)"


def before_after_rows(ws: Workspace) -> list[tuple[str, str, str, str]]:
    """(label, before, after, change) rows from a workspace's results."""
    rows: list[tuple[str, str, str, str]] = []
    v = ws.validation
    if v is not None:
        b, a = v.before, v.after
        if b.accuracy is not None and a.accuracy is not None:
            rows.append(("accuracy", f"{b.accuracy:.4f}", f"{a.accuracy:.4f}", f"{100 * (a.accuracy - b.accuracy):+.2f} pp"))
        rows.append(("parameters", fmt_count(b.params), fmt_count(a.params), f"{b.params / max(1, a.params):.2f}x smaller"))
        rows.append((cost_label(ws.original.graph), fmt_count(b.macs), fmt_count(a.macs), f"{b.macs / max(1, a.macs):.2f}x fewer"))
        if b.latency_ms and a.latency_ms:
            rows.append((f"latency, batch 1 ({v.runtime})", f"{b.latency_ms:.3f} ms", f"{a.latency_ms:.3f} ms",
                         speed_change(b.latency_ms, a.latency_ms)))
        if b.latency_batch_ms and a.latency_batch_ms:
            rows.append((f"latency, batch {v.batch} ({v.runtime})", f"{b.latency_batch_ms:.3f} ms", f"{a.latency_batch_ms:.3f} ms",
                         speed_change(b.latency_batch_ms, a.latency_batch_ms)))
        if v.prediction_error is not None and v.predicted_ms is not None:
            rows.append((f"latency predicted / measured, batch {v.batch}", f"{v.predicted_ms:.3f} ms",
                         f"{v.predicted_ms / (1 + v.prediction_error):.3f} ms", prediction_change(v)))
    if ws.latency is not None:
        st = ws.latency.stats
        rows.append(("latency model build", "", f"{st.measurements} measured, {st.cache_hits} cached", f"{st.seconds:.1f} s"))
    if ws.analysis is not None:
        limit = ws.analysis.limit
        rows.append(("estimated maximum compression", "", f"{limit.macs_reduction:.2f}x MACs", f"{limit.params_reduction:.2f}x params"))
    if ws.limit is not None:
        lim = ws.limit
        rows.append(("spectral estimate (loss budget)", "", f"{lim.spectral_macs_reduction:.2f}x MACs", f"budget {lim.spectral_budget:.3g}"))
        rows.append((f"calibrated limit ({lim.metric} within {100 * lim.tolerance:g} pp)", "", f"{lim.macs_reduction:.2f}x MACs",
                     f"{len(lim.points)} points, {lim.seconds:.1f} s"))
        if lim.finetuned is not None:
            f = lim.finetuned
            rows.append((f"estimated limit after {f.epochs:g} epoch(s) fine-tuning", "",
                         f"{'>= ' if f.bounded else ''}{f.macs_reduction:.2f}x MACs", ""))
    if ws.exact_max_abs_error is not None:
        rows.append(("exact after rewrite (max abs error)", "", f"{ws.exact_max_abs_error:.2g}", ""))
    if ws.plan is not None and ws.coupling is not None:
        groups = ws.coupling.groups
        frozen = sum(not g.prunable for g in groups)
        rows.append(("groups pruned / frozen / total", "", f"{len(ws.plan.groups)} / {frozen} / {len(groups)}", ""))
    if ws.target is not None:
        rows.append(("target", "", ws.target, ""))
    rows += _hidden_rows(ws)
    return rows


def _hidden_rows(ws: Workspace) -> list[tuple[str, str, str, str]]:
    """The hidden pass's rows: width kept, discarded energy, measured output error (or why the stream froze)."""
    h = ws.hidden
    if h is None:
        return []
    if h.frozen:
        return [("hidden size (rotation)", str(h.width), "frozen", h.frozen)]
    rows = [("hidden size (rotation)", str(h.width), str(h.kept), f"{h.discarded_energy:.4f} energy discarded")]
    if h.relative_error is not None:
        agree = f", top-1 agreement {h.agreement:.4f}" if h.agreement is not None else ""
        rows.append(("hidden slicing output error", "", f"{h.relative_error:.3g} relative", f"max abs {h.max_abs_error:.3g}{agree}"))
    return rows


DEPLOY_COLUMNS = ("fp32 original", "fp32 pruned", "int8 original", "int8 pruned")
"""The four models a quantize pass leaves to compare, in the order the report shows them."""


def _deploy_figures(ws: Workspace) -> tuple[Figures, ...] | None:
    v = ws.validation
    if v is None or v.fp32_pruned is None or v.int8_original is None:
        return None
    return (v.before, v.fp32_pruned, v.int8_original, v.after)


def _bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def deploy_rows(ws: Workspace) -> list[tuple[str, ...]]:
    """After a quantize pass: (label, fp32 original, fp32 pruned, int8 original, int8 pruned) rows, and the check."""
    figures = _deploy_figures(ws)
    if figures is None:
        return []
    v = ws.validation
    assert v is not None

    def ms(x: float | None) -> str:
        return "-" if not x else f"{x:.3f} ms"

    rows: list[tuple[str, ...]] = []
    if all(f.accuracy is not None for f in figures):
        rows.append(("accuracy", *(f"{f.accuracy:.4f}" for f in figures)))
    rows.append(("size (constants)", *(_bytes(f.size_bytes) for f in figures)))
    rows.append(("MACs / sample", *(fmt_count(f.macs) for f in figures)))
    rows.append((f"latency, batch 1 ({v.runtime})", *(ms(f.latency_ms) for f in figures)))
    if v.batch > 1:
        rows.append((f"latency, batch {v.batch} ({v.runtime})", *(ms(f.latency_batch_ms) for f in figures)))
    q = ws.quantized
    if q is not None and q.check is not None:
        c = q.check
        rows.append(("int8 pruned vs masked int8 original (QDQ semantics)", "", "", f"tolerance {c.tolerance_steps:g} steps",
                     f"{c.max_steps:.2f} steps ({c.max_abs_error:.3g})"))
        rows.append(("the same with onnxruntime's fused int8 kernels", "", "", "not checked", f"{c.fused_steps:.2f} steps"))
    return rows


def deploy_json(ws: Workspace) -> dict[str, Any] | None:
    """The four columns and the quantization check, for the JSON report (None without a quantize pass)."""
    figures = _deploy_figures(ws)
    if figures is None:
        return None
    out: dict[str, Any] = {name.replace(" ", "_"): dataclasses.asdict(f) for name, f in zip(DEPLOY_COLUMNS, figures)}
    q = ws.quantized
    if q is not None:
        out["quantization"] = dict(q.settings)
        if q.check is not None:
            out["check"] = {"max_steps": q.check.max_steps, "tolerance_steps": q.check.tolerance_steps,
                            "max_abs_error": q.check.max_abs_error, "output_scales": dict(q.check.output_scales),
                            "samples": q.check.samples, "fused_steps": q.check.fused_steps}
    return out


def prune_figures_table(ws: Workspace, console: Console) -> None:
    table = Table(title="graphprune: before / after")
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="right")
    for row in before_after_rows(ws):
        table.add_row(*row)
    console.print(table)
    four_rows = deploy_rows(ws)
    if four_rows:
        four = Table(title="graphprune: fp32 and int8, original and pruned (measured in one process)")
        for col in ("", *DEPLOY_COLUMNS):
            four.add_column(col, justify="right")
        for four_row in four_rows:
            four.add_row(*four_row)
        console.print(four)


def figures_json(ws: Workspace) -> dict[str, Any]:
    """The report's ``figures``: the typed results under their documented JSON names."""
    out: dict[str, Any] = {}
    if ws.validation is not None:
        out.update(provider=ws.validation.runtime, before=dataclasses.asdict(ws.validation.before),
                   after=dataclasses.asdict(ws.validation.after))
    if ws.validation is not None:
        v = ws.validation
        out["latency_batch"] = v.batch
        for batch, (b, a) in ((1, (v.before.latency_ms, v.after.latency_ms)), (v.batch, (v.before.latency_batch_ms, v.after.latency_batch_ms))):
            if b and a:
                out[f"speedup_batch_{batch}"] = b / a
        if v.predicted_ms is not None:
            out.update(predicted_ms=v.predicted_ms, prediction_error=v.prediction_error,
                       relative_prediction_error=v.relative_prediction_error)
    if ws.latency is not None:
        out["latency_model"] = {"setting": dict(ws.latency.setting), "stats": dataclasses.asdict(ws.latency.stats),
                                "tables": len(ws.latency.tables), "left_out": len(ws.latency.left_out),
                                "coverage": ws.latency.coverage}
    if ws.analysis is not None:
        out.update(max_macs_reduction=ws.analysis.limit.macs_reduction, max_params_reduction=ws.analysis.limit.params_reduction)
    if ws.limit is not None:
        out["limit"] = ws.limit.to_dict()
    if ws.target is not None:
        out["target"] = ws.target
    if sequence_dims(ws.original.graph):
        out["macs_counted"] = cost_label(ws.original.graph)
        out["sequence_dims"] = dict(ws.original.graph.dims)
    if ws.exact_max_abs_error is not None:
        out["exact_max_abs_error"] = ws.exact_max_abs_error
    if ws.compensation is not None:
        out.update(compensated_edges=ws.compensation.edges, compensation_skipped=list(ws.compensation.skipped),
                   compensation_memory_bound=ws.compensation.memory_bound, compensation_memory_peak=ws.compensation.memory_peak)
    if ws.repair is not None:
        out["repair"] = ws.repair
    if ws.finetune is not None:
        out["finetune"] = ws.finetune
    deploy = deploy_json(ws)
    if deploy is not None:
        out["deploy"] = deploy
    if ws.hidden is not None:
        out["hidden"] = ws.hidden.to_dict()
    return out


def report_json(ws: Workspace) -> str:
    figures = figures_json(ws)
    doc: dict[str, Any] = {"pipeline": ws.pipeline_name, "passes": list(ws.pass_names), "model": str(ws.source),
                           "output": str(ws.output), "format": ws.original.kind, "figures": figures,
                           "plan_meta": dict(ws.plan.meta) if ws.plan else None,
                           "analysis": ws.analysis.to_dict() if ws.analysis else None}
    if "before" in figures:  # the summary keys `prune --json` has always written
        doc.update(before=figures["before"], after=figures["after"])
    if ws.plan is not None and ws.coupling is not None:
        groups = ws.coupling.groups
        doc["groups"] = {"total": len(groups), "pruned": len(ws.plan.groups), "frozen": sum(not g.prunable for g in groups)}
    doc["validation"] = {"provider": ws.validation.runtime if ws.validation else ws.model.runtime,
                         "exact": None if ws.exact_max_abs_error is None else True, "max_abs_error": ws.exact_max_abs_error}
    return json.dumps(doc, indent=1, default=str)


def _report_path(ws: Workspace, given: str, suffix: str) -> Path | None:
    if given:
        return Path(given)
    if ws.output is None:
        return None
    stem = ws.output.with_suffix("")
    return stem.with_name(stem.name + suffix)


def write_reports(ws: Workspace, options: ReportOptions) -> None:
    """Print the table and write the JSON / HTML reports (staged with the output model when there is one)."""
    from graphprune.execution.distributed import is_main

    if not is_main():
        return
    if options.table and ws.console is not None:
        prune_figures_table(ws, ws.console)
    written = []
    for wanted, given, suffix, write in ((options.json, options.json_path, ".report.json", _write_json),
                                         (options.html, options.html_path, ".report.html", _write_html)):
        final = _report_path(ws, given, suffix) if wanted or given else None
        if final is None:
            continue
        if not final.parent.resolve().is_dir():
            raise BadInputError(f"report folder {final.parent} does not exist")
        write(ws, ws.staged.path(final) if ws.staged is not None else final)
        written.append(final)
        if suffix == ".report.json" and ws.latency is not None:  # the planner's input, beside the report
            tables = final.with_name(final.name.removesuffix(".report.json").removesuffix(".json") + ".latency.json")
            ws.latency.save(ws.staged.path(tables) if ws.staged is not None else tables)
            written.append(tables)
    ws.reports = (*ws.reports, *written)


def _write_json(ws: Workspace, path: Path) -> None:
    path.write_text(report_json(ws))


def _write_html(ws: Workspace, path: Path) -> None:
    title = f"graphprune: {ws.source.name if ws.source else ws.original.kind} -> {ws.output.name if ws.output else 'pruned'}"
    write_prune_html(ws, path, title)


def group_rows(ws: Workspace) -> list[dict[str, Any]]:
    """Per prunable group: channels, effective filters (when analysed) and kept channels."""
    coupling = ws.groups()
    kept = {g.group: len(g.keep) for g in ws.plan.groups} if ws.plan else {}
    effective = {g.group: g.effective for g in ws.analysis.groups} if ws.analysis else {}
    return [
        {"group": g.id, "anchor": g.anchor, "channels": g.channels, "effective": effective.get(g.id),
         "kept": kept.get(g.id, g.channels)}
        for g in coupling.prunable
    ]


def _plot(ws: Workspace) -> str:
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


def write_prune_html(ws: Workspace, path: Path, title: str) -> None:
    """One self-contained page: before/after table, per-group chart and spectra, the calibrated limit's curve, per-group table."""
    from graphprune.report.analysis import limit_html

    esc = html.escape
    table = "".join(f"<tr><th>{esc(a)}</th><td>{esc(b)}</td><td>{esc(c)}</td><td>{esc(d)}</td></tr>" for a, b, c, d in before_after_rows(ws))
    groups = "".join(
        "<tr>" + "".join(f"<td>{esc('' if v is None else str(v))}</td>" for v in (r["group"], r["anchor"], r["channels"], r["effective"], r["kept"])) + "</tr>"
        for r in group_rows(ws)
    )
    meta = esc(", ".join(f"{k}={v}" for k, v in (ws.plan.meta.items() if ws.plan else [])))
    rows = deploy_rows(ws)
    deploy = ""
    if rows:
        head = "".join(f"<th>{esc(c)}</th>" for c in ("", *DEPLOY_COLUMNS))
        body = "".join("<tr><th>" + esc(r[0]) + "</th>" + "".join(f"<td>{esc(c)}</td>" for c in r[1:]) + "</tr>" for r in rows)
        deploy = f"<h2>fp32 and int8, original and pruned</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head>
<body><h1>{esc(title)}</h1><p>plan: {meta}</p>
<table><thead><tr><th></th><th>before</th><th>after</th><th>change</th></tr></thead><tbody>{table}</tbody></table>
{deploy}
<img alt="channels per group and spectra" src="data:image/png;base64,{_plot(ws)}" style="max-width:100%">
{limit_html(ws.limit)}
<table><thead><tr><th>group</th><th>anchor</th><th>channels</th><th>effective</th><th>kept</th></tr></thead><tbody>{groups}</tbody></table>
</body></html>
"""
    path.write_text(page)
