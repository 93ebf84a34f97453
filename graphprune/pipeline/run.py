"""Run a pipeline on an ONNX file: load, run passes, validate, save atomically, report."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from graphprune.execution.measure import Figures
from graphprune.execution.sessions import sample_inputs
from graphprune.execution.validate import validate_pruned
from graphprune.frontends.data import load_data
from graphprune.frontends.onnx import load_onnx
from graphprune.io import check_output_path, save_onnx, staged_output, uses_external_data, write_text_atomic
from graphprune.ir.plan import Plan
from graphprune.pipeline.config import Pipeline, run_passes
from graphprune.pipeline.passes import Workspace
from graphprune.report.prune import prune_figures_table, write_prune_html

__all__ = ["RunResult", "run_file"]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Where things were written and the workspace's figures."""

    output: Path
    report_json: Path | None
    report_html: Path | None
    figures: dict[str, Any]
    plan: Plan | None = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Figures):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def run_file(
    pipeline: Pipeline,
    model: Path,
    output: Path,
    data: str | None = None,
    eval_data: str | None = None,
    force: bool = False,
    console: Console | None = None,
) -> RunResult | None:
    """Run ``pipeline`` on ``model`` and write ``output`` only when every pass and validation succeeded.

    Under ``torchrun`` every rank runs the passes (analysis and fine-tuning
    are data parallel) and only rank 0 validates, writes and reports; the
    other ranks return None.

    Raises:
        BadInputError, OverLimitError, ValidationError, UnsupportedOpError.
    """
    from graphprune.execution.distributed import is_main

    console = console or Console()
    if not is_main():
        console = Console(quiet=True)
    check_output_path(model, output, force)
    om = load_onnx(model)
    train = load_data(data, om.graph) if data else None
    test = load_data(eval_data, om.graph) if eval_data else None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=console, transient=True, disable=not is_main()) as bar:
        task = bar.add_task(pipeline.name, total=None, info="")

        def status(message: str) -> None:
            bar.update(task, description=message, total=None, completed=0, info="")

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, total=total, completed=step, info=f"loss {loss:.4f}")

        ws = Workspace(original=om, model=om, data=train, eval_data=test, status=status, progress=progress)
        ws = run_passes(pipeline, ws, lambda p, r: console.print(f"pass {p.name}: done{' (model changed)' if r.modified else ''}"))
        if not is_main():
            return None
        status("validating and saving")
        with staged_output(output) as staged:
            save_onnx(ws.model.model, staged, external=uses_external_data(om.model))
            validate_pruned(om, staged, sample_inputs(om.graph, batch=2))  # the file itself, before it is moved in place
    figures = _jsonable(ws.figures)
    report = ws.figures.get("report", {"html": False, "json": False})
    stem = output.with_suffix("")
    html_path = stem.with_name(stem.name + ".report.html") if report.get("html") else None
    json_path = stem.with_name(stem.name + ".report.json") if report.get("json") else None
    prune_figures_table(ws, console)
    if json_path is not None:
        doc = {"pipeline": pipeline.name, "passes": list(pipeline.names), "model": str(model), "output": str(output),
               "figures": figures, "plan_meta": dict(ws.plan.meta) if ws.plan else None,
               "analysis": ws.analysis.to_dict() if ws.analysis else None}
        write_text_atomic(json_path, json.dumps(doc, indent=1, default=str))
    if html_path is not None:
        write_prune_html(ws, html_path, f"graphprune: {model.name} -> {output.name}")
    return RunResult(output, json_path, html_path, figures, ws.plan)
