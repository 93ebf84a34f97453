"""Passes over an ONNX model and the plain-data workspace they share.

Each pass is a small class with a frozen options dataclass; calling it on a
:class:`Workspace` returns a :class:`PassResult` (the new workspace and
whether the model changed), like onnx-ir's passes. Analysis, planning,
validation and reporting change no weights (``modified=False``).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from graphprune.analysis.effective import Analysis, AnalysisOptions, analyze
from graphprune.analysis.fisher import Progress
from graphprune.coupling.groups import Coupling, build_groups
from graphprune.errors import BadInputError
from graphprune.execution.training import FitOptions
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import OnnxModel, prepare
from graphprune.ir.graph import ChannelGraph
from graphprune.ir.plan import Plan, kept_elements

__all__ = [
    "PASSES",
    "AnalyzePass",
    "AnalyzePassOptions",
    "CompensateOptions",
    "CompensatePass",
    "FineTunePass",
    "Pass",
    "PassResult",
    "PlanPass",
    "PlanPassOptions",
    "RepairPass",
    "ReportOptions",
    "ReportPass",
    "RewriteOptions",
    "RewritePass",
    "ValidateOptions",
    "ValidatePass",
    "Workspace",
    "check_model",
    "register_pass",
]

log = logging.getLogger(__name__)

Status = Callable[[str], None]


@dataclasses.dataclass
class Workspace:
    """Everything passes read and write: plain data, no hidden state.

    Attributes:
        original: The model as loaded (never modified).
        model: The current model.
        data: Calibration / training data (may be None).
        eval_data: Labelled data for accuracy figures (may be None).
        coupling: Groups of ``original``.
        analysis: Effective filter analysis of ``original``.
        plan: The plan applied (or to apply).
        kept: Kept elements of the applied plan (for exactness checks).
        figures: Named results for the report (accuracy, latency...).
        status: Progress message sink.
    """

    original: OnnxModel
    model: OnnxModel
    data: Calibration | None = None
    eval_data: Calibration | None = None
    coupling: Coupling | None = None
    analysis: Analysis | None = None
    plan: Plan | None = None
    kept: Mapping[Any, Any] | None = None
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    status: Status = lambda message: None
    progress: Callable[[int, int, float], None] | None = None

    def groups(self) -> Coupling:
        if self.coupling is None:
            self.coupling = build_groups(self.original.graph)
        return self.coupling


@dataclasses.dataclass(frozen=True)
class PassResult:
    workspace: Workspace
    modified: bool


class Pass:
    """Base: subclasses set ``name``, ``Options`` and implement ``run``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = type(None)

    def __init__(self, options: Any | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def __call__(self, ws: Workspace) -> PassResult:
        return self.run(ws)

    def run(self, ws: Workspace) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if cls.name in PASSES:
        raise ValueError(f"pass '{cls.name}' registered twice")
    PASSES[cls.name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class AnalyzePassOptions(AnalysisOptions):
    """Analysis options plus ``samples``: how many of the data's samples to use."""

    samples: int = 2048

    def check(self) -> None:
        super().check()
        if self.samples < 2:
            raise BadInputError(f"samples must be at least 2, got {self.samples}")


@register_pass
class AnalyzePass(Pass):
    """Effective filter analysis of the original model on (a seeded subset of) the workspace's data."""

    name = "analyze"
    Options = AnalyzePassOptions

    def run(self, ws: Workspace) -> PassResult:
        if ws.data is None:
            raise BadInputError("the analyze pass needs calibration data (--data)")
        ws.status("effective filter analysis")
        ws.analysis = run_analysis(ws.original.graph, ws.groups(), ws.data, self.options)
        ws.figures.update(limit_figures(ws.analysis))
        return PassResult(ws, False)


def run_analysis(graph: ChannelGraph, coupling: Coupling, data: Calibration, o: AnalyzePassOptions,
                 progress: Progress | None = None, meta: dict[str, Any] | None = None) -> Analysis:
    """The analyze pass's work on any channel graph: a seeded subset of ``data``, sampled labels when it has none."""
    subset = data.subset(o.samples, o.seed)
    loss = "fisher" if o.loss == "labels" and subset.labels is None else o.loss
    options = AnalysisOptions(eps=o.eps, floor=o.floor, loss=loss, batch_size=o.batch_size, seed=o.seed, budget=o.budget)
    return analyze(graph, coupling, subset, options, progress, meta=meta)


def limit_figures(analysis: Analysis) -> dict[str, float]:
    """The estimated maximum reductions, as the reports name them."""
    return {"max_macs_reduction": analysis.limit.macs_reduction, "max_params_reduction": analysis.limit.params_reduction}


@dataclasses.dataclass(frozen=True)
class RewriteOptions:
    """``verify``: check the pruned model equals the original with removed channels zeroed."""

    verify: bool = True


@register_pass
class RewritePass(Pass):
    """Apply the workspace's plan to the model."""

    name = "rewrite"
    Options = RewriteOptions

    def run(self, ws: Workspace) -> PassResult:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        from graphprune.backends.onnx import apply_kept

        if ws.plan is None:
            raise BadInputError("the rewrite pass needs a plan: put a plan pass before it")
        ws.status("rewriting the model")
        source = ws.model  # the original, or its compensated copy (same graph, other weights)
        ws.kept = kept_elements(ws.plan, ws.groups(), source.graph)
        pruned = apply_kept(source, ws.kept)
        RemoveUnusedNodesPass()(pruned)
        ws.model = prepare(pruned, ws.original.path)
        if self.options.verify:
            ws.status("checking exactness on onnxruntime")
            report = check_model(source, ws.model, ws.kept)
            ws.figures["exact_max_abs_error"] = report.max_abs_error
        return PassResult(ws, bool(ws.plan.groups))


def check_model(original: OnnxModel, model: OnnxModel, kept: Mapping[Any, Any] | None = None) -> Any:
    """Validate ``model`` against ``original`` (and exactness with ``kept``) from a temporary file."""
    import tempfile

    from graphprune.execution.sessions import sample_inputs
    from graphprune.execution.validate import validate_pruned
    from graphprune.io import save_onnx, uses_external_data

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.onnx"
        save_onnx(model.model, path, external=uses_external_data(original.model))
        return validate_pruned(original, path, sample_inputs(original.graph, batch=2), kept)


@dataclasses.dataclass(frozen=True)
class PlanPassOptions:
    """Method, criterion and one target (none: every group keeps its effective filters)."""

    method: str = "hierarchical"
    criterion: str = "effective"
    ratio: float | None = None
    macs: float | None = None
    params: float | None = None
    latency: float | None = None
    round_to: int = 1
    allow_over_limit: bool = False
    seed: int = 0
    latency_runs: int = 30

    def check(self) -> None:
        from graphprune.planning.hierarchical import ALL_CRITERIA, METHODS

        if self.method not in METHODS:
            raise BadInputError(f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        if self.criterion not in ALL_CRITERIA:
            raise BadInputError(f"unknown criterion '{self.criterion}' (choose from {', '.join(ALL_CRITERIA)})")
        given = [k for k in ("ratio", "macs", "params", "latency") if getattr(self, k) is not None]
        if len(given) > 1:
            raise BadInputError(f"give one target, not {' and '.join(given)}")
        for k in given:
            if not 0.0 < getattr(self, k) < 1.0:
                raise BadInputError(f"{k} must be in (0, 1), got {getattr(self, k)}")
        if self.round_to < 1:
            raise BadInputError(f"round_to must be at least 1, got {self.round_to}")

    @property
    def needs_analysis(self) -> bool:
        from graphprune.planning.hierarchical import NEEDS_ANALYSIS

        return self.method == "hierarchical" or self.criterion in NEEDS_ANALYSIS


@register_pass
class PlanPass(Pass):
    """Level 1 and level 2: how many channels each group keeps, and which."""

    name = "plan"
    Options = PlanPassOptions

    def run(self, ws: Workspace) -> PassResult:
        from graphprune.planning.targets import plan_for

        ws.status("planning")
        ws.plan = plan_for(ws.original.graph, ws.groups(), ws.analysis, self.options, ws.figures, ws.original)
        return PassResult(ws, False)


@register_pass
class FineTunePass(Pass):
    """Train the current model: labels when the data has them, else distillation from the original."""

    name = "finetune"
    Options = FitOptions

    def run(self, ws: Workspace) -> PassResult:
        from graphprune.execution.onnx_finetune import finetune_onnx

        if ws.data is None:
            raise BadInputError("the finetune pass needs data (--data)")
        ws.status(f"fine-tuning ({self.options.epochs:g} epochs)")
        from graphprune.analysis.fisher import default_device

        ws.model = finetune_onnx(ws.model, ws.data, self.options, teacher=ws.original, progress=ws.progress, device=default_device())
        return PassResult(ws, True)


@dataclasses.dataclass(frozen=True)
class CompensateOptions:
    """Least-squares compensation on ``samples`` calibration samples."""

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

    def run(self, ws: Workspace) -> PassResult:
        from graphprune.execution.onnx_finetune import with_constants
        from graphprune.recovery.compensation import compensate

        if ws.data is None or ws.plan is None:
            raise BadInputError("the compensate pass needs data (--data) and a plan pass before it")
        ws.status("compensating dropped channels")
        data = ws.data.subset(self.options.samples, self.options.seed)
        result = compensate(ws.model.graph, ws.groups(), ws.plan, data, self.options.batch_size)
        ws.figures["compensated_edges"] = result.edges
        ws.figures["compensation_skipped"] = list(result.skipped)
        if result.values:
            ws.model = with_constants(ws.model, result.values)
        return PassResult(ws, bool(result.values))


@register_pass
class RepairPass(Pass):
    """Statistics repair after rewrite: BN re-estimation, else bias correction of the pruned groups' consumers."""

    name = "repair"
    Options = CompensateOptions

    def run(self, ws: Workspace) -> PassResult:
        from graphprune.analysis.gates import plan_gates
        from graphprune.execution.onnx_finetune import with_constants
        from graphprune.recovery.repair import correct_biases, has_batch_norm, reestimate_batch_norm

        if ws.data is None or ws.plan is None or ws.kept is None:
            raise BadInputError("the repair pass needs data (--data) and a rewrite pass before it")
        ws.status("repairing statistics")
        data = ws.data.subset(self.options.samples, self.options.seed)
        if has_batch_norm(ws.model.graph):
            values = reestimate_batch_norm(ws.model.graph, data, self.options.batch_size)
            ws.figures["repair"] = "batchnorm re-estimation"
        else:
            gates = plan_gates(ws.groups(), ws.original.graph)
            consumers = sorted({e.node for g in ws.plan.groups for e in gates.edges.get(g.group, ())})
            values = correct_biases(ws.original.graph, ws.model.graph, consumers, ws.kept, data, self.options.batch_size)
            ws.figures["repair"] = f"bias correction of {len(values)} consumers"
        if values:
            ws.model = with_constants(ws.model, values)
        return PassResult(ws, bool(values))


@dataclasses.dataclass(frozen=True)
class ValidateOptions:
    """``latency_runs``: onnxruntime runs per latency figure (0 skips latency)."""

    latency_runs: int = 30

    def check(self) -> None:
        if self.latency_runs < 0:
            raise BadInputError(f"latency_runs must be >= 0, got {self.latency_runs}")


@register_pass
class ValidatePass(Pass):
    """Check the current model on onnxruntime and measure it next to the original."""

    name = "validate"
    Options = ValidateOptions

    def run(self, ws: Workspace) -> PassResult:
        from graphprune.execution.measure import measure_model

        ws.status("validating on onnxruntime")
        report = check_model(ws.original, ws.model)
        ws.figures["provider"] = report.provider
        ws.figures["before"] = measure_model(ws.original, ws.eval_data, self.options.latency_runs)
        ws.figures["after"] = measure_model(ws.model, ws.eval_data, self.options.latency_runs)
        return PassResult(ws, False)


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """Which report files to write beside the output model."""

    html: bool = True
    json: bool = True


@register_pass
class ReportPass(Pass):
    """Terminal table, JSON and a self-contained HTML page (written when the output is saved)."""

    name = "report"
    Options = ReportOptions

    def run(self, ws: Workspace) -> PassResult:
        ws.figures["report"] = {"html": self.options.html, "json": self.options.json}
        return PassResult(ws, False)
