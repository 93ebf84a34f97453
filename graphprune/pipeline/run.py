"""Run a pipeline on a model file or object: load, run the passes, save and validate atomically.

One route for every format and every command: ``graphprune prune`` and
``graphprune run`` build a :class:`~graphprune.pipeline.config.Pipeline` and
call :func:`run_file`; Python callers with an ``nn.Module`` call
:func:`run_model`.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError
from graphprune.execution.measure import Figures
from graphprune.execution.validate import ValidationReport
from graphprune.frontends.data import Calibration
from graphprune.io import check_output_path, staged_files
from graphprune.ir.model import PrunableModel
from graphprune.ir.plan import Plan
from graphprune.pipeline.config import Pipeline, parse_pipeline, run_passes
from graphprune.pipeline.workspace import Workspace

__all__ = ["RunResult", "prune_file", "prune_passes", "run_file", "run_model", "stage_printer"]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a run wrote and found (the workspace holds every typed result)."""

    output: Path
    reports: tuple[Path, ...]
    workspace: Workspace

    @property
    def plan(self) -> Plan:
        assert self.workspace.plan is not None
        return self.workspace.plan

    @property
    def coupling(self) -> Coupling:
        return self.workspace.groups()

    @property
    def before(self) -> Figures:
        assert self.workspace.validation is not None
        return self.workspace.validation.before

    @property
    def after(self) -> Figures:
        assert self.workspace.validation is not None
        return self.workspace.validation.after

    @property
    def validation(self) -> ValidationReport:
        ws = self.workspace
        runtime = ws.validation.runtime if ws.validation else ws.model.runtime
        exact = None if ws.exact_max_abs_error is None else True
        return ValidationReport(runtime, exact, ws.exact_max_abs_error)

    @property
    def report_json(self) -> Path | None:
        return next((p for p in self.reports if p.name.endswith(".json")), None)

    @property
    def report_html(self) -> Path | None:
        return next((p for p in self.reports if p.name.endswith(".html")), None)


def stage_printer(console: Console) -> Any:
    """A status sink: a progress bar on a terminal, plain stage lines otherwise (logs, CI)."""
    if console.is_terminal:
        return None
    return lambda message: console.print(f"stage: {message}", highlight=False)


def _execute(pipeline: Pipeline, ws: Workspace, console: Console) -> Workspace:
    """Run the passes with a progress display (stage lines when the console is not a terminal)."""
    from graphprune.execution.distributed import is_main

    ws.pipeline_name, ws.pass_names, ws.console = pipeline.name, pipeline.names, console
    plain = stage_printer(console)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=console, transient=True, disable=not is_main() or plain is not None) as bar:
        task = bar.add_task(pipeline.name, total=None, info="")

        def status(message: str) -> None:
            if plain is not None:
                plain(message)
            bar.update(task, description=message, total=None, completed=0, info="")

        def progress(step: int, total: int, loss: float = math.nan) -> None:
            bar.update(task, total=total, completed=step, info=f"loss {loss:.4f}" if math.isfinite(loss) else f"{step}/{total}")

        ws.status, ws.progress = status, progress
        return run_passes(pipeline, ws, lambda p, r: console.print(f"pass {p.name}: done{' (model changed)' if r.modified else ''}"))


def run_file(
    pipeline: Pipeline,
    model: Path,
    output: Path,
    data: str | None = None,
    eval_data: str | None = None,
    force: bool = False,
    console: Console | None = None,
    seq_len: int | None = None,
    held_out: str | None = None,
) -> RunResult | None:
    """Run ``pipeline`` on a model file (ONNX or ``.pt2``) and write ``output`` only when every pass and check succeeded.

    Reports are staged with the model: all are moved in place together, or none.
    MACs count symbolic sequence dims as ``seq_len``, else as the calibration data's length. ``held_out``: data
    the model was not trained on, for the limit to score on (see :attr:`Workspace.held_out`).
    Under ``torchrun`` every rank runs the passes (analysis and fine-tuning
    are data parallel) and only rank 0 validates, writes and reports; the
    other ranks return None.

    Raises:
        BadInputError, OverLimitError, ValidationError, UnsupportedOpError.
    """
    from graphprune.analysis.cost import resolve_dims
    from graphprune.backends import load_model
    from graphprune.execution.distributed import is_main
    from graphprune.frontends.data import load_data

    console = console or Console()
    if not is_main():
        console = Console(quiet=True)
    check_output_path(model, output, force)
    source = load_model(model)
    train = load_data(data, source.graph) if data else None
    test = load_data(eval_data, source.graph, flag="--eval-data") if eval_data else None
    held = load_data(held_out, source.graph, flag="--held-out") if held_out else None
    resolve_dims(source.graph, seq_len, train.inputs if train is not None else None)
    with staged_files() as staged:
        ws = Workspace(original=source, model=source, data=train, eval_data=test, held_out=held, source=model, output=output,
                       staged=staged)
        ws = _execute(pipeline, ws, console)
        if not is_main():
            staged.discard()
            return None
        ws.status("saving and validating the written file")
        ws.model.save(staged.path(output), source)
    return RunResult(output, ws.reports, ws)


def run_model(pipeline: Pipeline, model: PrunableModel, data: Calibration | None = None,
              eval_data: Calibration | None = None, console: Console | None = None, source: Path | None = None,
              held_out: Calibration | None = None) -> Workspace:
    """Run ``pipeline`` on a model object (e.g. :func:`graphprune.backends.torch_model.module_model`); nothing is written
    unless the pipeline's report pass is given paths. ``source``: the file it came from, for reports; ``held_out``: see
    :attr:`Workspace.held_out`."""
    ws = Workspace(original=model, model=model, data=data, eval_data=eval_data, source=source, held_out=held_out)
    return _execute(pipeline, ws, console or Console(quiet=True))


def prune_file(source: Path, output: Path, *, ratio: float = 0.5, criterion: str = "l1", round_to: int = 1, seed: int = 0,
               plan: Path | None = None, verify: bool = False, force: bool = False, latency_runs: int = 20,
               console: Console | None = None) -> RunResult:
    """Remove ``ratio`` of every prunable group by magnitude (or apply a saved plan): the ``prune`` command without data.

    Raises:
        BadInputError: Bad file, option or plan.
        ValidationError: The pruned model failed validation (nothing written).
    """
    passes = prune_passes(ratio=ratio, criterion=criterion, round_to=round_to, seed=seed, plan=plan, verify=verify,
                          latency_runs=latency_runs, reports=False)
    result = run_file(parse_pipeline({"pipeline": {"name": "prune"}, "pass": passes}), source, output, force=force,
                      console=console or Console(quiet=True))
    assert result is not None  # a single process is always the main rank
    return result


def prune_passes(*, ratio: float, criterion: str, round_to: int, seed: int, plan: Path | None, verify: bool,
                 latency_runs: int, reports: bool) -> list[dict[str, Any]]:
    """The passes of a magnitude (or saved-plan) prune: plan, rewrite, validate, report."""
    if plan is not None:
        first: dict[str, Any] = {"name": "plan", "method": "uniform", "criterion": "l1", "plan_file": str(plan)}
    else:
        first = {"name": "plan", "method": "uniform", "criterion": criterion, "ratio": ratio, "round_to": round_to, "seed": seed}
    if latency_runs < 0:
        raise BadInputError(f"latency_runs must be >= 0, got {latency_runs}")
    return [first, {"name": "rewrite", "verify": verify},
            {"name": "validate", "latency_runs": latency_runs, "run_check": False},
            {"name": "report", "json": reports, "html": reports}]

