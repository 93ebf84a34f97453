"""The passes: analyze, profile, plan, compensate, rewrite, repair, finetune, validate, report.

Each is a small class with a frozen options dataclass; calling it on a
:class:`~graphprune.pipeline.workspace.Workspace` returns a
:class:`~graphprune.pipeline.workspace.PassResult` (the new workspace and
whether the model changed), like onnx-ir's passes. Every pass works on any
:class:`~graphprune.ir.model.PrunableModel` (ONNX, ``nn.Module``, ``.pt2``).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from graphprune.analysis.effective import Analysis, AnalysisOptions, analyze
from graphprune.analysis.latency import LatencyModel
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
    "ProfileOptions",
    "ProfilePass",
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


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
    """The runtime setting of the latency tables and what building them may cost.

    Attributes:
        batch: Batch size the model will run at (the tables and the validation's second latency figure use it).
        threads: onnxruntime intra-op threads (0: its default).
        runs: Timed runs per table point.
        model_runs: Timed runs of the whole model.
        max_measurements: Most new measurements in one build (the bound on its cost).
        cache_dir: Table cache; empty: ``$GRAPHPRUNE_CACHE/latency`` or ``~/.cache/graphprune/latency``.
    """

    batch: int = 1
    threads: int = 0
    runs: int = 10
    model_runs: int = 30
    max_measurements: int = 2000
    cache_dir: str = ""

    def latency_options(self) -> Any:
        """The :class:`~graphprune.execution.latency_tables.LatencyOptions` of this setting (checked)."""
        from graphprune.execution.latency_tables import LatencyOptions

        return LatencyOptions(batch=self.batch, threads=self.threads, runs=self.runs, model_runs=self.model_runs,
                              max_measurements=self.max_measurements, cache_dir=self.cache_dir or None)

    def check(self) -> None:
        self.latency_options()


def build_cost(latency: LatencyModel) -> str:
    """'12 tables (12 from the cache), 0 measurements, 140 cache hits, 0.2 s on CPUExecutionProvider at batch 1, 2 threads'."""
    st, s = latency.stats, latency.setting
    threads = f"{s['threads']} threads" if s.get("threads") else "default threads"
    return (f"{st.tables} tables ({st.tables_cached} from the cache), {st.measurements} measurements, {st.cache_hits} cache hits, "
            f"{st.seconds:.1f} s on {s['provider']} at batch {s['batch']}, {threads}")


@register_pass
class ProfilePass(Pass):
    """Latency tables of the original model on its runtime (ONNX on onnxruntime): an input to planning."""

    name = "profile"
    Options = ProfileOptions
    ensures = frozenset({"latency"})
    forbids = frozenset({"plan"})

    def run(self, ws: Workspace) -> PassResult:
        floors = {g.group: g.effective for g in ws.analysis.groups} if ws.analysis is not None else {}
        coupling = ws.groups()
        prunable = {g.id: g.channels for g in coupling.prunable}
        floors = {g: max(1, min(f, prunable[g])) for g, f in floors.items() if g in prunable}
        ws.status(f"measuring latency tables on {ws.original.runtime} at batch {self.options.batch}")
        ws.latency = ws.original.latency_model(coupling, self.options.latency_options(), floors)
        if ws.latency is None:
            ws.status(f"profile: skipped, latency tables are measured on onnxruntime and this is a {ws.original.kind} model (planned by MACs)")
        else:
            ws.status(f"latency model: {build_cost(ws.latency)}")
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
        ws.plan, ws.target = plan_for(ws.groups(), ws.analysis, self.options, ws.original, ws.latency)
        meta = ws.plan.meta
        if "predicted_ms" in meta and ws.latency is not None:
            ws.status(f"planned by {meta.get('objective')}: predicted {meta['predicted_ms']:.3f} ms "
                      f"against {ws.latency.original_ms:.3f} ms at batch {ws.latency.setting['batch']}")
        if "measured_ms" in meta:
            ws.status(f"latency target confirmed once: measured {meta['measured_latency']:.3f} of the original "
                      f"({meta['measured_ms']:.3f} ms, predicted {meta['predicted_ms']:.3f} ms)")
        if meta.get("predicted_slower"):
            ws.status("the plan is predicted slower than the original even re-planned with counts multiples of 8; it is kept")
        return PassResult(ws, False)


@dataclasses.dataclass(frozen=True)
class CompensateOptions:
    """Least-squares compensation (and statistics repair) on ``samples`` calibration samples.

    ``memory_bytes``: most bytes compensation's Gram matrices, solve and streamed chunk may hold at once
    (0: a quarter of the machine's physical memory); repair ignores it.
    """

    samples: int = 1024
    batch_size: int = 64
    seed: int = 0
    memory_bytes: int = 0

    def check(self) -> None:
        if self.samples < 2 or self.batch_size < 1:
            raise BadInputError("compensate needs samples >= 2 and batch_size >= 1")
        if self.memory_bytes < 0:
            raise BadInputError(f"compensate memory_bytes must be >= 0 (0: a quarter of the memory), got {self.memory_bytes}")


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
        from graphprune.recovery.compensation import compensate, compensation_memory

        assert ws.data is not None and ws.plan is not None
        memory = compensation_memory(ws.model.graph, ws.groups(), ws.plan, self.options.memory_bytes or None)
        ws.status(memory.line())
        ws.status("compensating dropped channels")
        data = ws.data.subset(self.options.samples, self.options.seed)
        result = compensate(ws.model.graph, ws.groups(), ws.plan, data, self.options.batch_size, memory)
        ws.compensation = CompensationSummary(result.edges, tuple(result.skipped), memory.bound, memory.peak)
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
    """How the current model is checked and measured against the original.

    Attributes:
        latency_runs: Runs per latency figure (0 skips latency).
        run_check: Run the model against the original's signature.
        batch: Second latency batch (0: the latency model's batch when there is one, else only batch 1).
        threads: Intra-op threads of the latency figures (0: the latency model's, else the runtime's default).
    """

    latency_runs: int = 30
    run_check: bool = True
    batch: int = 0
    threads: int = 0

    def check(self) -> None:
        if self.latency_runs < 0:
            raise BadInputError(f"latency_runs must be >= 0, got {self.latency_runs}")
        if self.batch < 0 or self.threads < 0:
            raise BadInputError(f"batch and threads must be >= 0, got {self.batch} and {self.threads}")


def measure(model: PrunableModel, eval_data: Calibration | None, latency_runs: int, batch: int = 1, threads: int = 0) -> Figures:
    """Parameters and MACs (cost model), latency at batch 1 (and at ``batch``) and accuracy on the model's own runtime."""
    from graphprune.analysis.cost import model_cost

    cost = model_cost(model.graph)
    latency = model.latency_ms(1, latency_runs, threads) if latency_runs > 0 else None
    at_batch = model.latency_ms(batch, latency_runs, threads) if latency_runs > 0 and batch > 1 else None
    acc = model.accuracy(eval_data) if eval_data is not None and eval_data.labels is not None else None
    return Figures(cost.params, cost.macs, latency, acc, at_batch)


def slower_line(v: Validation, plan_meta: Mapping[str, Any], profiled: bool = False) -> str | None:
    """One line when the pruned model measured slower than the original at batch 1, else None."""
    from graphprune.report.prune import speed_change

    b, a = v.before.latency_ms, v.after.latency_ms
    if not b or not a or a <= b:
        return None
    if plan_meta.get("repaired"):
        why = f"it was {plan_meta['repaired']} and still is"
    elif "predicted_ms" in plan_meta:
        why = f"the latency model predicted {plan_meta['predicted_ms']:.3f} ms against {plan_meta['original_predicted_ms']:.3f} ms"
    elif profiled:
        why = "the plan was not priced by the latency model (a saved plan, or a uniform or ratio plan)"
    else:
        why = "no latency model was built (add a profile pass) to plan for speed"
    return (f"the pruned model is {speed_change(b, a)} than the original on {v.runtime} at batch 1: {why}; "
            "the output is written anyway")


@register_pass
class ValidatePass(Pass):
    """Check the current model runs like the original, and measure both side by side (batch 1 and the latency batch)."""

    name = "validate"
    Options = ValidateOptions
    ensures = frozenset({"validated"})

    def run(self, ws: Workspace) -> PassResult:
        ws.status(f"validating on {ws.model.runtime}")
        if self.options.run_check:
            ws.model.run_check(ws.original)
        runs, lm = self.options.latency_runs, ws.latency
        batch = self.options.batch or (int(lm.setting["batch"]) if lm is not None else 1)
        threads = self.options.threads or (int(lm.setting.get("threads", 0)) if lm is not None else 0)
        predicted = None
        if lm is not None and ws.plan is not None and runs > 0 and batch == int(lm.setting["batch"]):
            predicted = lm.predict({g.group: len(g.keep) for g in ws.plan.groups if g.group in lm.channels})
        before = measure(ws.original, ws.eval_data, runs, batch, threads)
        after = measure(ws.model, ws.eval_data, runs, batch, threads)
        ws.validation = Validation(ws.model.runtime, before, after, batch, predicted)
        line = slower_line(ws.validation, ws.plan.meta if ws.plan is not None else {}, lm is not None)
        if line is not None:
            log.warning("%s", line)
            if ws.console is not None:
                ws.console.print(line, markup=False, highlight=False)
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

