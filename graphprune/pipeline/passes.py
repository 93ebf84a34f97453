"""The passes: analyze, plan, compensate, rewrite, repair, finetune, validate, report.

Each is a small class with a frozen options dataclass; calling it on a
:class:`~graphprune.pipeline.workspace.Workspace` returns a
:class:`~graphprune.pipeline.workspace.PassResult` (the new workspace and
whether the model changed), like onnx-ir's passes. Every pass works on any
:class:`~graphprune.ir.model.PrunableModel` (ONNX, ``nn.Module``, ``.pt2``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from graphprune.analysis.effective import Analysis, AnalysisOptions, analyze
from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError
from graphprune.execution.measure import Figures
from graphprune.execution.progress import Progress as AnalysisProgress
from graphprune.execution.training import FitOptions
from graphprune.frontends.data import Calibration
from graphprune.ir.graph import ChannelGraph
from graphprune.ir.model import PrunableModel
from graphprune.ir.plan import kept_elements
from graphprune.pipeline.workspace import (
    PASSES,
    CompensationSummary,
    Pass,
    PassResult,
    Validation,
    Workspace,
    register_pass,
)
from graphprune.planning.options import PlanOptions
from graphprune.report.prune import ReportOptions, write_reports

__all__ = [
    "PASSES",
    "AnalyzePass",
    "AnalyzePassOptions",
    "CompensateOptions",
    "CompensatePass",
    "FineTunePass",
    "PlanPass",
    "RepairPass",
    "ReportOptions",
    "ReportPass",
    "RewriteOptions",
    "RewritePass",
    "ValidateOptions",
    "ValidatePass",
    "Workspace",
    "measure",
    "run_analysis",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AnalyzePassOptions(AnalysisOptions):
    """Analysis options plus ``samples``: how many of the data's samples to use."""

    samples: int = 2048

    def check(self) -> None:
        super().check()
        if self.samples < 2:
            raise BadInputError(f"samples must be at least 2, got {self.samples}")


def run_analysis(graph: ChannelGraph, coupling: Coupling, data: Calibration, o: AnalyzePassOptions,
                 progress: AnalysisProgress | None = None, meta: dict[str, Any] | None = None) -> Analysis:
    """The analyze pass's work on any channel graph: a seeded subset of ``data``, sampled labels when it has none."""
    subset = data.subset(o.samples, o.seed)
    loss = "fisher" if o.loss == "labels" and subset.labels is None else o.loss
    options = AnalysisOptions(eps=o.eps, floor=o.floor, loss=loss, batch_size=o.batch_size, seed=o.seed, budget=o.budget)
    return analyze(graph, coupling, subset, options, progress, meta=meta)


@register_pass
class AnalyzePass(Pass):
    """Effective filter analysis of the original model on (a seeded subset of) the workspace's data."""

    name = "analyze"
    Options = AnalyzePassOptions
    requires = frozenset({"data"})
    ensures = frozenset({"analysis"})

    def run(self, ws: Workspace) -> PassResult:
        assert ws.data is not None
        ws.status("effective filter analysis")
        meta = {"model": str(ws.source) if ws.source else ws.original.kind, "data": ws.data.source}
        ws.analysis = run_analysis(ws.original.graph, ws.groups(), ws.data, self.options, ws.progress, meta)
        return PassResult(ws, False)


@register_pass
class PlanPass(Pass):
    """Level 1 and level 2: how many channels each group keeps, and which."""

    name = "plan"
    Options = PlanOptions
    ensures = frozenset({"plan"})
    forbids = frozenset({"rewritten"})

    def required(self) -> frozenset[str]:
        return frozenset({"analysis"}) if self.options.needs_analysis else frozenset()

    def run(self, ws: Workspace) -> PassResult:
        from graphprune.planning.targets import plan_for

        ws.status("planning")
        ws.plan, ws.target = plan_for(ws.groups(), ws.analysis, self.options, ws.original)
        return PassResult(ws, False)


@dataclasses.dataclass(frozen=True)
class CompensateOptions:
    """Least-squares compensation (and statistics repair) on ``samples`` calibration samples."""

    samples: int = 1024
    batch_size: int = 64
    seed: int = 0

    def check(self) -> None:
        if self.samples < 2 or self.batch_size < 1:
            raise BadInputError("compensate needs samples >= 2 and batch_size >= 1")


@register_pass
class CompensatePass(Pass):
    """Fold least-squares reconstructions of the plan's dropped channels into their consumers (before rewrite)."""

    name = "compensate"
    Options = CompensateOptions
    requires = frozenset({"data", "plan"})
    ensures = frozenset({"compensated"})
    forbids = frozenset({"rewritten"})
    mutates = True

    def run(self, ws: Workspace) -> PassResult:
        from graphprune.recovery.compensation import compensate

        assert ws.data is not None and ws.plan is not None
        ws.status("compensating dropped channels")
        data = ws.data.subset(self.options.samples, self.options.seed)
        result = compensate(ws.model.graph, ws.groups(), ws.plan, data, self.options.batch_size)
        ws.compensation = CompensationSummary(result.edges, tuple(result.skipped))
        ws.model = ws.model.with_values(result.values)
        return PassResult(ws, bool(result.values))


@dataclasses.dataclass(frozen=True)
class RewriteOptions:
    """``verify``: check the pruned model equals the original with removed channels zeroed."""

    verify: bool = True


@register_pass
class RewritePass(Pass):
    """Apply the workspace's plan to the model, in the model's own format."""

    name = "rewrite"
    Options = RewriteOptions
    requires = frozenset({"plan"})
    ensures = frozenset({"rewritten"})
    forbids = frozenset({"rewritten"})
    mutates = True

    def run(self, ws: Workspace) -> PassResult:
        assert ws.plan is not None
        ws.status("rewriting the model")
        source = ws.model  # the original, or its compensated copy (same graph, other weights)
        coupling = ws.groups()
        ws.kept = kept_elements(ws.plan, coupling, source.graph)
        ws.model = source.pruned(coupling, ws.plan)
        if self.options.verify:
            ws.status(f"checking exactness on {source.runtime}")
            ws.exact_max_abs_error = ws.model.exactness(source, coupling, ws.plan)
        return PassResult(ws, bool(ws.plan.groups))


@register_pass
class RepairPass(Pass):
    """Statistics repair after rewrite: BN re-estimation, else bias correction of the pruned groups' consumers."""

    name = "repair"
    Options = CompensateOptions
    requires = frozenset({"data", "rewritten"})
    ensures = frozenset({"repaired"})
    mutates = True

    def run(self, ws: Workspace) -> PassResult:
        from graphprune.analysis.gates import plan_gates
        from graphprune.recovery.repair import correct_biases, has_batch_norm, reestimate_batch_norm

        assert ws.data is not None and ws.plan is not None and ws.kept is not None
        ws.status("repairing statistics")
        data = ws.data.subset(self.options.samples, self.options.seed)
        if has_batch_norm(ws.model.graph):
            values = reestimate_batch_norm(ws.model.graph, data, self.options.batch_size)
            ws.repair = "batchnorm re-estimation"
        else:
            gates = plan_gates(ws.groups(), ws.original.graph)
            consumers = sorted({e.node for g in ws.plan.groups for e in gates.edges.get(g.group, ())})
            values = correct_biases(ws.original.graph, ws.model.graph, consumers, ws.kept, data, self.options.batch_size)
            ws.repair = f"bias correction of {len(values)} consumers"
        ws.model = ws.model.with_values(values)
        return PassResult(ws, bool(values))


@register_pass
class FineTunePass(Pass):
    """Train the current model: labels when the data has them, else distillation from the original."""

    name = "finetune"
    Options = FitOptions
    requires = frozenset({"data"})
    ensures = frozenset({"finetuned"})
    mutates = True

    def run(self, ws: Workspace) -> PassResult:
        assert ws.data is not None
        ws.status(f"fine-tuning ({self.options.epochs:g} epochs)")
        ws.model = ws.model.finetuned(ws.data, self.options, ws.original, ws.progress)
        return PassResult(ws, True)


@dataclasses.dataclass(frozen=True)
class ValidateOptions:
    """``latency_runs``: runs per latency figure (0 skips latency); ``run_check``: run the model against the original's signature."""

    latency_runs: int = 30
    run_check: bool = True

    def check(self) -> None:
        if self.latency_runs < 0:
            raise BadInputError(f"latency_runs must be >= 0, got {self.latency_runs}")


def measure(model: PrunableModel, eval_data: Calibration | None, latency_runs: int) -> Figures:
    """Parameters and MACs (cost model), batch-1 latency and accuracy on the model's own runtime."""
    from graphprune.analysis.cost import model_cost

    cost = model_cost(model.graph)
    latency = model.latency_ms(1, latency_runs) if latency_runs > 0 else None
    acc = model.accuracy(eval_data) if eval_data is not None and eval_data.labels is not None else None
    return Figures(cost.params, cost.macs, latency, acc)


@register_pass
class ValidatePass(Pass):
    """Check the current model runs like the original, and measure both side by side."""

    name = "validate"
    Options = ValidateOptions
    ensures = frozenset({"validated"})

    def run(self, ws: Workspace) -> PassResult:
        ws.status(f"validating on {ws.model.runtime}")
        if self.options.run_check:
            ws.model.run_check(ws.original)
        runs = self.options.latency_runs
        ws.validation = Validation(ws.model.runtime, measure(ws.original, ws.eval_data, runs), measure(ws.model, ws.eval_data, runs))
        return PassResult(ws, False)


@register_pass
class ReportPass(Pass):
    """Terminal table, JSON and a self-contained HTML page; files are staged with the output model."""

    name = "report"
    Options = ReportOptions
    ensures = frozenset({"reported"})

    def run(self, ws: Workspace) -> PassResult:
        write_reports(ws, self.options)
        return PassResult(ws, False)

