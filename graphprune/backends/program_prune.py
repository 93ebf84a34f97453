"""Prune a saved ExportedProgram (``.pt2``) end to end: groups, plan, rewrite, verify, save as .pt2 or .onnx."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from graphprune.analysis.cost import model_cost
from graphprune.analysis.fisher import Progress
from graphprune.backends.exported_program import example_inputs, prune_program, verify_program
from graphprune.backends.onnx_prune import ModelStats, PruneOptions, PruneResult
from graphprune.coupling.groups import build_groups
from graphprune.errors import BadInputError, ValidationError
from graphprune.execution.validate import ValidationReport, compare_outputs
from graphprune.frontends.torch.trace import load_exported_program, to_channel_graph
from graphprune.io import check_output_path, staged_output
from graphprune.ir.plan import Plan, uniform_plan

__all__ = ["plan_program", "prune_program_file"]

log = logging.getLogger(__name__)


def _write_onnx(program: torch.export.ExportedProgram, path: Path) -> None:
    """Export with the dynamo exporter and check onnxruntime gives the program's outputs."""
    from graphprune.execution.sessions import make_session

    inputs = example_inputs(program)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # the exporter warns about optional packages (torchvision ops)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(program, args=inputs, f=str(path), dynamo=True, verbose=False)
    finally:
        exporter_log.setLevel(level)
    session = make_session(str(path))
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    with torch.no_grad():
        want = program.module()(*inputs)
    want_t = [t.numpy() for t in (want if isinstance(want, (tuple, list)) else (want,))]
    compare_outputs(want_t, session.run(None, feeds), [o.name for o in session.get_outputs()])


def plan_program(source: Path, data: str | None, analysis_options: Any, plan_options: Any,
                 progress: Progress | None = None) -> tuple[Plan, dict[str, Any]]:
    """An analysis- or target-based plan for a ``.pt2`` (the passes' plan step, on the program's graph).

    Args:
        data: Calibration data spec; the effective filter analysis runs when the method or criterion needs it.
        analysis_options: ``AnalyzePassOptions`` (``samples`` included).
        plan_options: ``PlanPassOptions`` (no latency target: that is measured on onnxruntime).

    Returns:
        The plan and its figures (target, estimated maximum reductions).
    """
    from graphprune.frontends.data import load_data
    from graphprune.pipeline.passes import limit_figures, run_analysis
    from graphprune.planning.hierarchical import NEEDS_ANALYSIS
    from graphprune.planning.targets import plan_for

    tm = load_exported_program(source)
    coupling = build_groups(tm.graph)
    figures: dict[str, Any] = {}
    analysis = None
    if plan_options.method == "hierarchical" or plan_options.criterion in NEEDS_ANALYSIS:
        if data is None:
            raise BadInputError(f"--method {plan_options.method} --criterion {plan_options.criterion} needs calibration data (--data)")
        calibration = load_data(data, tm.graph, analysis_options.samples, analysis_options.seed)
        analysis = run_analysis(tm.graph, coupling, calibration, analysis_options, progress,
                                meta={"model": str(source), "data": data})
        figures.update(limit_figures(analysis))
    return plan_for(tm.graph, coupling, analysis, plan_options, figures), figures


def prune_program_file(source: Path, output: Path, options: PruneOptions) -> PruneResult:
    """Prune ``source`` (.pt2) into ``output`` (.pt2, or .onnx); nothing is written unless the result is exact.

    Raises:
        BadInputError: Bad file, option or plan.
        ValidationError: The pruned program is not exact or cannot be saved (nothing written).
    """
    if output.suffix not in (".pt2", ".onnx"):
        raise BadInputError(f"output {output}: a .pt2 input is written as .pt2 or .onnx")
    check_output_path(source, output, options.force)
    tm = load_exported_program(source)
    coupling = build_groups(tm.graph)
    plan = options.plan or uniform_plan(tm.graph, coupling, options.ratio, options.criterion, options.round_to, options.seed)
    pruned = prune_program(tm, coupling, plan)
    err = verify_program(tm, coupling, plan, pruned)
    new_graph, _ = to_channel_graph(pruned)
    before, after = model_cost(tm.graph), model_cost(new_graph)
    with staged_output(output) as staged:
        if output.suffix == ".pt2":
            torch.export.save(pruned, str(staged))
        else:
            try:
                _write_onnx(pruned, staged)
            except ValidationError:
                raise
            except Exception as exc:  # noqa: BLE001 - exporter failures
                raise ValidationError(f"the pruned program does not export to ONNX ({str(exc).splitlines()[0][:200]})") from None
        size = staged.stat().st_size + sum(p.stat().st_size for p in staged.parent.iterdir() if p != staged)
    return PruneResult(
        plan, coupling,
        ModelStats(before.params, before.macs, source.stat().st_size, None),
        ModelStats(after.params, after.macs, int(size), None),
        ValidationReport("torch (masked original vs pruned program)", True, float(err)),
        output,
    )
