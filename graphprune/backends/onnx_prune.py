"""Prune an ONNX file end to end: groups, plan, rewrite, validate, save."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from onnx_ir.passes.common import RemoveUnusedNodesPass

from graphprune.analysis.cost import Cost, model_cost
from graphprune.backends.onnx import apply_kept
from graphprune.coupling.groups import Coupling, build_groups
from graphprune.execution.sessions import make_session, measure_latency, sample_inputs
from graphprune.execution.validate import ValidationReport, validate_pruned
from graphprune.frontends.onnx import OnnxModel, load_onnx, prepare
from graphprune.io import check_output_path, save_onnx, staged_output, uses_external_data
from graphprune.ir.plan import Plan, kept_elements, uniform_plan

__all__ = ["ModelStats", "PruneOptions", "PruneResult", "prune_file"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    """Options of ``graphprune prune``."""

    ratio: float = 0.5
    criterion: str = "l1"
    round_to: int = 1
    seed: int = 0
    verify: bool = False
    plan: Plan | None = None
    force: bool = False
    latency_runs: int = 20


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """Size and speed of one model."""

    params: int
    macs: int
    file_bytes: int
    latency_ms: float | None


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """Everything a caller may report about one pruning run."""

    plan: Plan
    coupling: Coupling
    before: ModelStats
    after: ModelStats
    validation: ValidationReport
    output: Path


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _stats(om: OnnxModel, path: Path, cost: Cost, runs: int) -> ModelStats:
    latency = None
    if runs:
        session = make_session(str(path))
        latency = measure_latency(session, sample_inputs(om.graph, batch=1), runs=runs)
    return ModelStats(cost.params, cost.macs, _file_bytes(path), latency)


def prune_file(source: Path, output: Path, options: PruneOptions) -> PruneResult:
    """Prune ``source`` into ``output``; nothing is written unless validation passes.

    Raises:
        BadInputError: Bad file, option or plan.
        ValidationError: The pruned model failed validation (nothing written).
    """
    check_output_path(source, output, options.force)
    om = load_onnx(source)
    coupling = build_groups(om.graph)
    plan = options.plan or uniform_plan(
        om.graph, coupling, options.ratio, options.criterion, options.round_to, options.seed
    )
    kept = kept_elements(plan, coupling, om.graph)
    pruned = apply_kept(om, kept)
    RemoveUnusedNodesPass()(pruned)
    feeds = sample_inputs(om.graph, batch=2)
    before = _stats(om, source, model_cost(om.graph), options.latency_runs)
    with staged_output(output) as staged:
        save_onnx(pruned, staged, external=uses_external_data(om.model))
        report = validate_pruned(om, staged, feeds, kept if options.verify else None)
        pruned_om = prepare(pruned)
        after = _stats(pruned_om, staged, model_cost(pruned_om.graph), options.latency_runs)
    return PruneResult(plan, coupling, before, after, report, output)
