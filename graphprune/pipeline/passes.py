"""The passes: analyze, profile, plan, compensate, rewrite, repair, hidden, finetune, quantize, validate, report.

Each is a small class with a frozen options dataclass; calling it on a
:class:`~graphprune.pipeline.workspace.Workspace` returns a
:class:`~graphprune.pipeline.workspace.PassResult` (the new workspace and
whether the model changed), like onnx-ir's passes. Every pass works on any
:class:`~graphprune.ir.model.PrunableModel` (ONNX, ``nn.Module``, ``.pt2``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from graphprune.analysis.cost import cost_with_keep, model_cost, param_bytes
from graphprune.analysis.effective import Analysis, AnalysisOptions, analyze
from graphprune.analysis.latency import LatencyModel, fraction_error
from graphprune.backends.quantize import QuantizeOptions
from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError, GraphpruneError, OverLimitError
from graphprune.execution.measure import Figures
from graphprune.execution.progress import Progress as AnalysisProgress
from graphprune.execution.timing import side_by_side_ms
from graphprune.execution.training import FitOptions
from graphprune.frontends.data import Calibration
from graphprune.ir.graph import ChannelGraph
from graphprune.ir.model import PrunableModel
from graphprune.ir.plan import Plan, kept_elements
from graphprune.pipeline.workspace import (
    PASSES,
    CompensationSummary,
    Pass,
    PassResult,
    Quantized,
    Validation,
    Workspace,
    register_pass,
)
from graphprune.planning.options import PlanOptions
from graphprune.recovery.rotation import HiddenOptions
from graphprune.report.prune import ReportOptions, write_reports

if TYPE_CHECKING:
    from graphprune.recovery.reconstruct import OriginalActivations

__all__ = [
    "PASSES",
    "AnalyzePass",
    "AnalyzePassOptions",
    "CompensateOptions",
    "CompensatePass",
    "FineTuneOptions",
    "FineTunePass",
    "HiddenPass",
    "PlanPass",
    "ProfileOptions",
    "ProfilePass",
    "QuantizePass",
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


def analysis_loss(graph: ChannelGraph, requested: str, labelled: bool) -> str:
    """The loss the analysis runs: ``labels`` falls back to the true Fisher (labels sampled from the model) when the
    data has none, and the Fisher to the output projection loss when the first output is not (batch, classes) (a
    language model's (batch, tokens, vocabulary) logits, a detector's boxes: no class axis is guessed)."""
    loss = "fisher" if requested == "labels" and not labelled else requested
    shape = graph.shape(graph.outputs[0]) if graph.outputs else None
    if loss == "fisher" and shape is not None and len(shape) != 2:
        return "projection"
    return loss


def run_analysis(graph: ChannelGraph, coupling: Coupling, data: Calibration, o: AnalyzePassOptions,
                 progress: AnalysisProgress | None = None, meta: dict[str, Any] | None = None) -> Analysis:
    """The analyze pass's work on any channel graph: a seeded subset of ``data``, the loss :func:`analysis_loss` picks."""
    subset = data.subset(o.samples, o.seed)
    loss = analysis_loss(graph, o.loss, subset.labels is not None)
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
        loss = analysis_loss(ws.original.graph, self.options.loss, ws.data.labels is not None)
        if loss == "projection" and self.options.loss != "projection":
            shape = ws.original.graph.shape(ws.original.graph.outputs[0])
            ws.status(f"analysis: the first output has shape {shape}, not (batch, classes): the output projection loss "
                      f"replaces the {self.options.loss} loss")
        meta = {"model": str(ws.source) if ws.source else ws.original.kind, "data": ws.data.source}
        start = time.perf_counter()
        analysis = run_analysis(ws.original.graph, ws.groups(), ws.data, self.options, ws.progress, meta)
        ws.analysis = dataclasses.replace(analysis, meta={**analysis.meta, "seconds": time.perf_counter() - start})
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
        below_floors: Tabulate every group from one channel up, not from its effective filters (for plans
            allowed past the limit: ``--allow-over-limit``).
        quantized: Time the probes, the whole models and the never-slower check quantized to int8 QDQ (for a
            pipeline that quantizes after pruning: the plan is then fast as the int8 model that ships).
        activations: With ``quantized``: the activation type timed; unset, the pipeline's quantize pass's.
        reduce_range: With ``quantized``: 7-bit weights timed; unset, the pipeline's quantize pass's.
        cache_check: Relative difference above which a cached table, its full-size point timed again, is
            measured again (0: trust the cache).
    """

    batch: int = 1
    threads: int = 0
    runs: int = 10
    model_runs: int = 30
    max_measurements: int = 2000
    cache_dir: str = ""
    below_floors: bool = False
    quantized: bool = False
    activations: str = "uint8"
    reduce_range: bool = True
    cache_check: float = 0.25

    def latency_options(self) -> Any:
        """The :class:`~graphprune.execution.latency_tables.LatencyOptions` of this setting (checked)."""
        from graphprune.execution.latency_tables import LatencyOptions

        return LatencyOptions(batch=self.batch, threads=self.threads, runs=self.runs, model_runs=self.model_runs,
                              max_measurements=self.max_measurements, quantized=self.quantized, activations=self.activations,
                              reduce_range=self.reduce_range, cache_dir=self.cache_dir or None,
                              cache_check=self.cache_check)

    def check(self) -> None:
        self.latency_options()


def build_cost(latency: LatencyModel) -> str:
    """'12 tables (12 from the cache), 0 measurements, 140 cache hits, 2 whole-model timings, 0.2 s on CPUExecutionProvider
    at batch 1, 2 threads'."""
    st, s = latency.stats, latency.setting
    threads = f"{s['threads']} threads" if s.get("threads") else "default threads"
    checks = f" ({st.spot_checks} cached tables spot-checked, {st.stale_tables} stale and measured again)" if st.spot_checks else ""
    return (f"{st.tables} tables ({st.tables_cached} from the cache), {st.measurements} measurements, {st.cache_hits} cache hits"
            f"{checks}, {st.model_timings} whole-model timings, {st.seconds:.1f} s on {s['provider']} at batch {s['batch']}, {threads}"
            + (f", {s['quantized']}" if s.get("quantized") else ""))


@register_pass
class ProfilePass(Pass):
    """Latency tables of the original model on its runtime (ONNX on onnxruntime): an input to planning."""

    name = "profile"
    Options = ProfileOptions
    ensures = frozenset({"latency"})
    forbids = frozenset({"plan"})

    def run(self, ws: Workspace) -> PassResult:
        floors = {g.group: g.effective for g in ws.analysis.groups} if ws.analysis is not None else {}
        if ws.limit is not None:
            floors.update(ws.limit.effective)
        if self.options.below_floors:
            floors = {}
        coupling = ws.groups()
        prunable = {g.id: g.channels for g in coupling.prunable}
        floors = {g: max(1, min(f, prunable[g])) for g, f in floors.items() if g in prunable}
        options = self.options.latency_options()
        int8 = f", int8 QDQ ({options.int8.describe()})" if options.int8 is not None else ""
        ws.status(f"measuring latency tables on {ws.original.runtime} at batch {self.options.batch}{int8}")
        ws.latency = ws.original.latency_model(coupling, options, floors)
        if ws.latency is None:
            ws.status(f"profile: skipped, latency tables are measured on onnxruntime and this is a {ws.original.kind} model (planned by MACs)")
        else:
            ws.status(f"latency model: {build_cost(ws.latency)}")
        return PassResult(ws, False)


def planned(ws: Workspace, options: PlanOptions) -> tuple[Plan, str]:
    """``plan_for`` with the calibrated limit's floors when the workspace has one; a target beyond it says the
    quality its measured curve expects there.

    Raises:
        OverLimitError: A target beyond the limit (unless allowed).
    """
    from graphprune.planning.limit import expected_line, floored
    from graphprune.planning.targets import plan_for

    coupling, limit, analysis = ws.groups(), ws.limit, ws.analysis
    if limit is not None and analysis is not None:
        analysis = floored(analysis, limit.effective, ws.original.graph, coupling)
    try:
        return plan_for(coupling, analysis, options, ws.original, ws.latency)
    except OverLimitError as exc:
        target = options.target
        if limit is None or target is None or target.kind == "latency":
            raise
        try:
            over = plan_for(coupling, analysis, dataclasses.replace(options, allow_over_limit=True), ws.original)[0]
        except GraphpruneError:
            raise exc from None
        keep = {g.group: len(g.keep) for g in over.groups}
        reduction = model_cost(ws.original.graph).macs / max(1, cost_with_keep(ws.original.graph, coupling, keep).macs)
        raise OverLimitError(
            f"the target is beyond the estimated maximum compression (the calibrated limit: {limit.macs_reduction:.2f}x fewer MACs "
            f"with {limit.metric} within {100 * limit.tolerance:g} pp and no fine-tuning): {expected_line(limit, reduction)}; "
            "lower the target, raise --tolerance, or pass --allow-over-limit"
        ) from None


Candidate = tuple[str, str, Plan, str]
"""(key, words, plan, target) of a plan a measured choice weighs."""


def _measured_choice(ws: Workspace, what: str, key: str, candidates: Sequence[Candidate]) -> tuple[Plan, str]:
    """The candidate that scores best after compensation, rewrite and repair on the limit pass's held-out samples (the
    first one when they tie, when every other keeps the same channels, when too few samples are left, or when the output
    has no class axis to score), its key and the scores in its meta under ``key``; ``what`` opens the status lines."""
    from graphprune.pipeline.limit import LimitPassOptions, plan_correct, scoring_samples

    _, words, plan, target = candidates[0]
    if all(_keeps(c[2]) == _keeps(plan) for c in candidates[1:]):
        return plan, target
    scoring = LimitPassOptions(holdout=ws.limit.holdout) if ws.limit is not None else LimitPassOptions()
    try:
        held = scoring_samples(ws, scoring)
    except BadInputError as exc:
        ws.status(f"{what}: {words} (the output cannot be scored: {exc})")
        return plan, target
    if held is None:
        ws.status(f"{what}: {words} (too few held-out calibration samples to measure the other plan against it)")
        return plan, target
    ws.status(f"{what}: scoring {' and '.join(c[1] for c in candidates)} on {len(held)} held-out samples")
    scores = {k: float(plan_correct(ws, p, scoring, held).mean()) for k, _, p, _ in candidates}
    best = max(candidates, key=lambda c: scores[c[0]])  # the first of equals: the default
    ws.status(f"{what}: " + ", ".join(f"{c[1]} {scores[c[0]]:.4f}" for c in candidates) + f" on held-out samples: {best[1]}")
    meta = {**best[2].meta, key: best[0], f"{key}_scores": scores, f"{key}_samples": len(held)}
    return dataclasses.replace(best[2], meta=meta), best[3]


def _keeps(plan: Plan) -> dict[int, tuple[int, ...]]:
    return {g.group: g.keep for g in plan.groups}


def _measured_excess(ws: Workspace, options: PlanOptions, plan: Plan, target: str) -> tuple[Plan, str]:
    """Past the floors, the excess removed per unit saved as well as by predicted loss, the better on held-out samples
    kept (:func:`_measured_choice`)."""
    other, other_target = planned(ws, dataclasses.replace(options, excess="per_unit"))
    return _measured_choice(ws, "past the limit", "excess", [("loss", "the excess by predicted loss", plan, target),
                                                            ("per_unit", "the excess per unit saved", other, other_target)])


def _measured_allocation(ws: Workspace, options: PlanOptions, plan: Plan, target: str) -> tuple[Plan, str]:
    """Within the calibrated floors, a MACs or parameter target planned hierarchically (level 1 per unit saved) and by
    the limit's own budget family at the same target (every group at its counts under one predicted-loss budget),
    the better on held-out samples kept (:func:`_measured_choice`): neither allocation was the better one on all
    four benchmark models (benchmarks/README.md, "the calibrated limit")."""
    from graphprune.pipeline.limit import BudgetFamily

    aim = options.target
    family = BudgetFamily.of(ws)
    if aim is None or ws.limit is None or family is None:
        return plan, target
    other = family.reaching(ws, aim.kind, aim.value, ws.limit.budget)
    if other is None:
        return plan, target
    return _measured_choice(ws, "within the limit", "allocation",
                            [("hierarchical", "the hierarchical allocation", plan, target),
                             ("budget", "the budget family", other, target)])


def _allocation_measurable(ws: Workspace, options: PlanOptions) -> bool:
    """A MACs or parameter target within a calibrated limit, planned by the paper's criterion in that unit, with data
    to score on: not from a saved plan, not rounded, and with no latency model (its plans are priced in predicted ms
    and measured never slower, which the budget family is not)."""
    aim = options.target
    return (aim is not None and aim.kind in ("macs", "params") and ws.limit is not None and ws.data is not None
            and ws.latency is None and options.method == "hierarchical" and options.criterion == "effective"
            and options.round_to == 1 and not options.plan_file and options.excess == "measured")


@register_pass
class PlanPass(Pass):
    """Level 1 and level 2: how many channels each group keeps, and which."""

    name = "plan"
    Options = PlanOptions
    ensures = frozenset({"plan"})
    forbids = frozenset({"rewritten", "rotated"})

    def required(self) -> frozenset[str]:
        return frozenset({"analysis"}) if self.options.needs_analysis else frozenset()

    def run(self, ws: Workspace) -> PassResult:
        ws.status("planning")
        ws.plan, ws.target = planned(ws, self.options)
        if ws.plan.meta.get("over_limit") and self.options.excess == "measured" and ws.data is not None \
                and not self.options.plan_file:
            ws.plan, ws.target = _measured_excess(ws, self.options, ws.plan, ws.target)
        elif not ws.plan.meta.get("over_limit") and _allocation_measurable(ws, self.options):
            ws.plan, ws.target = _measured_allocation(ws, self.options, ws.plan, ws.target)
        meta = ws.plan.meta
        if "predicted_ms" in meta and ws.latency is not None:
            how = f"planned by {meta['objective']}" if meta.get("objective") else f"planned at the {meta.get('target', 'target')}"
            ws.status(f"{how}: predicted {meta['predicted_ms']:.3f} ms "
                      f"against {ws.latency.original_ms:.3f} ms at batch {ws.latency.setting['batch']}")
        if "measured_ms" in meta and ws.latency is not None:
            ws.status(measured_line(meta, int(ws.latency.setting["batch"])))
        return PassResult(ws, False)


def measured_line(meta: Mapping[str, Any], batch: int) -> str:
    """What the plan measured against the original (and its prediction error), its repair, or that it is still slower."""
    from graphprune.planning.targets import REPAIR_MULTIPLES
    from graphprune.report.prune import speed_change

    ms, before = float(meta["measured_ms"]), float(meta["measured_original_ms"])
    line = f"plan measured at batch {batch}: {ms:.3f} ms against {before:.3f} ms ({speed_change(before, ms)})"
    for b, (at, orig) in sorted((int(b), v) for b, v in dict(meta.get("measured_at", {})).items()):
        if b != batch:
            line += f", at batch {b}: {at:.3f} ms against {orig:.3f} ms ({speed_change(orig, at)})"
    if "predicted_ms" in meta:
        predicted = float(meta["predicted_ms"])
        line += f", predicted {predicted:.3f} ms ({100 * (predicted - ms) / ms:+.1f}% error"
        if meta.get("original_predicted_ms"):  # the same as fractions of each one's original: a load change cancels
            rel = fraction_error(predicted, float(meta["original_predicted_ms"]), ms, before)
            line += f"; {100 * rel:+.1f}% as a fraction of the original"
        line += ")"
    if meta.get("repaired"):
        line += f"; {meta['repaired']}"
    if meta.get("measured_slower"):
        multiples = " and ".join(str(m) for m in REPAIR_MULTIPLES)
        line += f"; still slower at one batch after re-planning with counts multiples of {multiples}: it is kept"
        if meta.get("faster_within"):
            line += f" ({faster_within_line(meta['faster_within'], meta)})"
    return line


def faster_within_line(found: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """'counts multiples of 8 within the effective filters keep 0.597 of the macs and measured 1.04x faster at
    batch 1, 1.32x faster at batch 32: ask for --macs 0.597, or pass --allow-over-limit'."""
    from graphprune.report.prune import speed_change

    target = meta.get("target")
    kind = target.get("kind", "target") if isinstance(target, Mapping) else "target"
    kept = float(found["target_kept"])
    speeds = ", ".join(f"{speed_change(orig, ms)} at batch {b}" for b, (ms, orig) in sorted((int(b), v) for b, v in found["measured_at"].items()))
    return (f"counts multiples of {found['multiple']} within the effective filters keep {kept:.3f} of the {kind} and "
            f"measured {speeds}: ask for --{kind} {kept:.3f}, or pass --allow-over-limit")


COMPENSATION_METHODS = ("sequential", "edges")


@dataclasses.dataclass(frozen=True)
class CompensateOptions:
    """Least-squares compensation (and statistics repair) on ``samples`` calibration samples.

    ``memory_bytes``: most bytes compensation's Gram matrices, solve and streamed chunk may hold at once
    (0: a quarter of the machine's physical memory); repair ignores it. ``method``: ``edges`` fits each
    dropped channel from the original network's kept ones at every exit edge; ``sequential`` refits every
    consumer the plan changes, in graph order, on the pruned network's own inputs
    (:mod:`graphprune.recovery.reconstruct`).
    """

    samples: int = 1024
    batch_size: int = 64
    seed: int = 0
    memory_bytes: int = 0
    method: str = "sequential"

    def check(self) -> None:
        if self.samples < 2 or self.batch_size < 1:
            raise BadInputError("compensate needs samples >= 2 and batch_size >= 1")
        if self.method not in COMPENSATION_METHODS:
            raise BadInputError(f"compensate method must be one of {', '.join(COMPENSATION_METHODS)}, got '{self.method}'")
        if self.memory_bytes < 0:
            raise BadInputError(f"compensate memory_bytes must be >= 0 (0: a quarter of the memory), got {self.memory_bytes}")


@register_pass
class CompensatePass(Pass):
    """Fold least-squares reconstructions of the plan's dropped channels into their consumers (before rewrite)."""

    name = "compensate"
    Options = CompensateOptions
    requires = frozenset({"data", "plan"})
    ensures = frozenset({"compensated"})
    forbids = frozenset({"rewritten", "rotated"})
    mutates = True

    def __init__(self, options: CompensateOptions | None = None, original: OriginalActivations | None = None) -> None:
        """``original``: the original model's reads on this pass's samples, shared by repeated refits (the limit's
        points), so that only the pruned model runs."""
        super().__init__(options)
        self.original = original

    def run(self, ws: Workspace) -> PassResult:
        from graphprune.recovery.compensation import compensate, compensation_memory
        from graphprune.recovery.reconstruct import reconstruct, reconstruction_memory

        assert ws.data is not None and ws.plan is not None
        graph, bound = ws.model.graph, self.options.memory_bytes or None
        data = ws.data.subset(self.options.samples, self.options.seed)
        if self.options.method == "sequential":
            memory = reconstruction_memory(graph, ws.groups(), ws.plan, bound, len(data))
            ws.status(memory.line())
            ws.status("refitting the consumers in graph order")
            result = reconstruct(graph, ws.groups(), ws.plan, data, self.options.batch_size, memory, original=self.original)
        else:
            memory = compensation_memory(graph, ws.groups(), ws.plan, bound)
            ws.status(memory.line())
            ws.status("compensating dropped channels")
            result = compensate(graph, ws.groups(), ws.plan, data, self.options.batch_size, memory)
        ws.compensation = CompensationSummary(result.edges, tuple(result.skipped), memory.bound, memory.peak,
                                              self.options.method, result.batch_norms)
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
    forbids = frozenset({"rewritten", "rotated"})
    mutates = True

    def run(self, ws: Workspace) -> PassResult:
        assert ws.plan is not None
        ws.status("rewriting the model")
        source = ws.model  # the original, or its compensated copy (same graph, other weights)
        coupling = ws.groups()
        ws.kept = kept_elements(ws.plan, coupling, source.graph)
        ws.model = source.pruned(coupling, ws.plan)
        ws.rewrite_pair = (source, ws.model)
        if self.options.verify:
            ws.status(f"checking exactness on {source.runtime}")
            ws.exact_max_abs_error = ws.model.exactness(source, coupling, ws.plan)
        return PassResult(ws, bool(ws.plan.groups))


def _repaired_by_refit(ws: Workspace) -> str | None:
    """Why the sequential refit already did the repair's work (None: it did not).

    The refit matches every changed consumer's output to the original's, constant term included (bias
    correction's job), and corrects the BatchNormalization statistics no refit feeds; repairing again afterwards
    shifts what the refits downstream were fitted to (benchmarks/README.md).
    """
    c = ws.compensation
    if c is None or c.method != "sequential" or not c.edges:
        return None
    norms = f", and corrected {c.batch_norms} BatchNormalization nodes no refit feeds" if c.batch_norms else ""
    return f"the sequential refit matched {c.edges} consumers' outputs to the original's{norms}"


@register_pass
class RepairPass(Pass):
    """Statistics repair after rewrite: BN re-estimation, else bias correction of the pruned groups' consumers."""

    name = "repair"
    Options = CompensateOptions
    requires = frozenset({"data", "rewritten"})
    ensures = frozenset({"repaired"})
    forbids = frozenset({"quantized", "rotated"})
    mutates = True

    def run(self, ws: Workspace) -> PassResult:
        from graphprune.analysis.gates import plan_gates
        from graphprune.recovery.repair import correct_biases, has_batch_norm, reestimate_batch_norm
        from graphprune.recovery.stored import constant_names

        assert ws.data is not None and ws.plan is not None and ws.kept is not None
        if (done := _repaired_by_refit(ws)) is not None:
            ws.status(f"repair: not needed: {done}")
            ws.repair = f"none ({done})"
            return PassResult(ws, False)
        ws.status("repairing statistics")
        data = ws.data.subset(self.options.samples, self.options.seed)
        if has_batch_norm(ws.model.graph):
            values = reestimate_batch_norm(ws.model.graph, data, self.options.batch_size)
            ws.repair = "batchnorm re-estimation"
        else:
            gates = plan_gates(ws.groups(), ws.original.graph)
            consumers = sorted({e.node for g in ws.plan.groups for e in gates.edges.get(g.group, ())})
            values = correct_biases(ws.original.graph, ws.model.graph, consumers, ws.kept, data, self.options.batch_size)
            graph = ws.model.graph
            corrected = sum(1 for n in graph.nodes if n.name in set(consumers) and len(n.inputs) > 2
                            and constant_names(graph, n.inputs[2])[0] in values)
            ws.repair = f"bias correction of {corrected} consumers"
        ws.model = ws.model.with_values(values)
        return PassResult(ws, bool(values))


@register_pass
class HiddenPass(Pass):
    """Slice the hidden size of a transformer by rotation (SliceGPT): approximate, its error measured and reported.

    Runs on the current model (after any channel pruning, before fine-tuning): an ONNX model, an ``nn.Module``
    (:mod:`graphprune.backends.torch_rotation`) or a saved ``.pt2`` program (:mod:`graphprune.backends.program_rotation`).
    """

    name = "hidden"
    Options = HiddenOptions
    requires = frozenset({"data"})
    ensures = frozenset({"rotated"})
    forbids = frozenset({"rotated", "finetuned", "quantized", "validated"})
    mutates = True

    def run(self, ws: Workspace) -> PassResult:
        from graphprune.backends.onnx_model import OnnxPrunable
        from graphprune.backends.onnx_rotation import slice_hidden
        from graphprune.backends.program_rotation import slice_hidden_program
        from graphprune.backends.torch_model import ModulePrunable, ProgramPrunable
        from graphprune.backends.torch_rotation import slice_hidden_module

        assert ws.data is not None
        ws.status("slicing the hidden size by rotation")
        before = ws.model
        if isinstance(ws.model, OnnxPrunable):
            om, ws.hidden = slice_hidden(ws.model.om, ws.data, ws.eval_data, self.options, ws.status)
            ws.model = ws.model if om is ws.model.om else OnnxPrunable(om)
        elif isinstance(ws.model, ModulePrunable):
            ws.model, ws.hidden = slice_hidden_module(ws.model, ws.data, ws.eval_data, self.options, ws.status)
        elif isinstance(ws.model, ProgramPrunable):
            ws.model, ws.hidden = slice_hidden_program(ws.model, ws.data, ws.eval_data, self.options, ws.status)
        else:
            raise BadInputError(f"the hidden pass rotates ONNX models, nn.Modules and programs; this is a {ws.model.kind} model")
        for line in ws.hidden.lines():
            log.info("%s", line)
            if ws.console is not None:
                ws.console.print(line, markup=False, highlight=False)
        return PassResult(ws, ws.model is not before)


@dataclasses.dataclass(frozen=True)
class FineTuneOptions(FitOptions):
    """The training options, and the check after it.

    Attributes:
        keep_better: With held-out data (``--held-out``), score the model before and after fine-tuning on it and keep
            the better (a fine-tune at too high a rate can undo a near-lossless prune); without, the fine-tuned one.
        holdout: Most held-out samples the check scores.
    """

    keep_better: bool = True
    holdout: int = 4096

    def check(self) -> None:
        super().check()
        if self.holdout < 16:
            raise BadInputError(f"finetune holdout must be at least 16, got {self.holdout}")


@register_pass
class FineTunePass(Pass):
    """Train the current model: labels when the data has them, else distillation from the original; then keep the
    better of the models before and after on held-out data when there is some (:class:`FineTuneOptions`)."""

    name = "finetune"
    Options = FineTuneOptions
    requires = frozenset({"data"})
    ensures = frozenset({"finetuned"})
    forbids = frozenset({"quantized"})
    mutates = True

    def run(self, ws: Workspace) -> PassResult:
        assert ws.data is not None
        o = self.options if isinstance(self.options, FineTuneOptions) else FineTuneOptions(**dataclasses.asdict(self.options))
        ws.status(f"fine-tuning ({o.epochs:g} epochs)")
        before = ws.model
        ws.model = ws.model.finetuned(ws.data, o, ws.original, ws.progress)
        if not o.keep_better or ws.held_out is None:
            return PassResult(ws, True)
        scores = _held_out_scores(ws, (before, ws.model), o)
        if scores is None:
            return PassResult(ws, True)
        (b, a), n, metric = scores
        kept = a >= b
        ws.finetune = (f"held-out {metric} {b:.4f} before, {a:.4f} after on {n} samples: "
                       + ("kept the fine-tuned model" if kept else "kept the model from before fine-tuning "
                          "(finetune.keep_better=false keeps the fine-tuned one)"))
        ws.status(f"fine-tune: {ws.finetune}")
        if not kept:
            ws.model = before
        return PassResult(ws, kept)


def _held_out_scores(ws: Workspace, candidates: Sequence[PrunableModel], o: FineTuneOptions
                     ) -> tuple[tuple[float, ...], int, str] | None:
    """Each candidate's accuracy on up to ``o.holdout`` of the workspace's held-out samples (agreement with the
    original's top-1 when they are unlabelled), their number and the metric's name; None when the output has no class
    axis to score (said in a status line)."""
    from graphprune.pipeline.limit import held_out, predictions

    assert ws.held_out is not None
    held = held_out(ws.held_out, 0, o.holdout, o.seed)
    try:
        labels = held.labels if held.labels is not None else predictions(ws.original, held, o.batch_size)
        scores = tuple(float((predictions(m, held, o.batch_size) == labels).mean()) for m in candidates)
    except BadInputError as exc:
        ws.status(f"fine-tune: kept the fine-tuned model (its output cannot be scored on the held-out data: {exc})")
        return None
    return scores, len(held), "accuracy" if held.labels is not None else "agreement"


@register_pass
class QuantizePass(Pass):
    """Static QDQ int8 quantization of the current model and of the original, calibrated on the same data.

    After a rewrite it also checks that pruning commutes with quantization: the rewrite's result and source,
    quantized with the same activation ranges, agree within ``tolerance_steps`` steps of the output scale
    once the removed channels are masked (:func:`graphprune.backends.quantize.quantization_check`).
    """

    name = "quantize"
    Options = QuantizeOptions
    requires = frozenset({"data"})
    ensures = frozenset({"quantized"})
    forbids = frozenset({"quantized", "validated"})
    mutates = True

    def run(self, ws: Workspace) -> PassResult:
        from graphprune.backends.onnx_model import OnnxPrunable
        from graphprune.backends.quantize import quantization_check, quantize_onnx

        assert ws.data is not None
        if not isinstance(ws.model, OnnxPrunable) or not isinstance(ws.original, OnnxPrunable):
            raise BadInputError(f"the quantize pass quantizes ONNX models with onnxruntime; this is a {ws.model.kind} model "
                                "(export it to ONNX first)")
        if _is_quantized(ws.model):
            raise BadInputError("the quantize pass needs a float model: this one is quantized already (drop the quantize pass)")
        o = self.options
        data = ws.data.subset(o.samples, o.seed)
        check = None
        if o.verify and ws.rewrite_pair is not None and ws.kept is not None:
            source, pruned = ws.rewrite_pair
            ws.status("checking that quantization commutes with the rewrite")
            check = quantization_check(_onnx_of(source), _onnx_of(pruned), ws.kept, data, o)
            ws.status(check.line())
        ws.status(f"quantizing to int8 QDQ ({o.calibration} calibration on {len(data)} samples)")
        int8_original = OnnxPrunable(quantize_onnx(ws.original.om, data, o))
        int8_pruned = OnnxPrunable(quantize_onnx(ws.model.om, data, o))
        settings = {"format": "QDQ", "weights": "int8 (7-bit range)" if o.reduce_range else "int8", "activations": o.activations,
                    "per_channel": o.per_channel,
                    "calibration": o.calibration, "samples": len(data)}
        ws.quantized = Quantized(ws.model, int8_original, check, settings)
        ws.model = int8_pruned
        return PassResult(ws, True)


def _is_quantized(model: PrunableModel) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type.startswith("QLinear") for n in model.graph.nodes)


def _onnx_of(model: PrunableModel) -> Any:
    from graphprune.backends.onnx_model import OnnxPrunable

    if not isinstance(model, OnnxPrunable):
        raise BadInputError(f"an ONNX model was expected, got a {model.kind}")
    return model.om


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


def measure(models: Sequence[PrunableModel], eval_data: Calibration | None, latency_runs: int, batch: int = 1,
            threads: int = 0) -> list[Figures]:
    """Parameters and MACs (cost model), latency at batch 1 (and at ``batch``) and accuracy of each model on its own
    runtime; the latencies of all of them timed side by side (:func:`graphprune.execution.timing.side_by_side_ms`)."""
    none: list[float | None] = [None] * len(models)
    at_1: list[float | None] = list(side_by_side_ms(models, 1, latency_runs, threads)) if latency_runs > 0 else none
    at_batch: list[float | None] = (list(side_by_side_ms(models, batch, latency_runs, threads))
                                    if latency_runs > 0 and batch > 1 else none)
    figures = []
    for model, ms, ms_batch in zip(models, at_1, at_batch):
        cost = model_cost(model.graph)
        acc = model.accuracy(eval_data) if eval_data is not None and eval_data.labels is not None else None
        figures.append(Figures(cost.params, cost.macs, ms, acc, ms_batch, param_bytes(model.graph)))
    return figures


def slower_line(v: Validation, plan_meta: Mapping[str, Any], profiled: bool = False) -> str | None:
    """One line when a pruned model measured slower than its original at batch 1 or at the validation's batch, else
    None. After a quantize pass both pairs are compared: fp32 pruned against fp32 original, int8 against int8."""
    from graphprune.report.prune import speed_change

    pairs = [("pruned model", "original", v.before, v.after)]
    if v.fp32_pruned is not None and v.int8_original is not None:
        pairs = [("fp32 pruned model", "fp32 original", v.before, v.fp32_pruned), ("int8 pruned model", "int8 original", v.int8_original, v.after)]
    found = []
    for name, against, before, after in pairs:
        at = [(1, before.latency_ms, after.latency_ms)] + ([(v.batch, before.latency_batch_ms, after.latency_batch_ms)] if v.batch > 1 else [])
        slower = [f"{speed_change(b, a)} at batch {n}" for n, b, a in at if b and a and a > b]
        if slower:
            found.append(f"the {name} is {' and '.join(slower)} than the {against} on {v.runtime}")
    if not found:
        return None
    if plan_meta.get("measured_slower"):
        why = "it measured slower when planned too, and no re-plan with counts multiples of 8 or 16 measured faster"
        if plan_meta.get("faster_within"):
            why += f"; {faster_within_line(plan_meta['faster_within'], plan_meta)}"
    elif "measured_ms" in plan_meta:
        why = (f"when planned it measured {plan_meta['measured_ms']:.3f} ms against {plan_meta['measured_original_ms']:.3f} ms "
               "at the latency batch (the machine's noise, or another batch or precision)")
    elif plan_meta.get("repaired"):
        why = f"it was {plan_meta['repaired']} and still is"
    elif "predicted_ms" in plan_meta:
        why = f"the latency model predicted {plan_meta['predicted_ms']:.3f} ms against {plan_meta['original_predicted_ms']:.3f} ms"
    elif profiled:
        why = "the plan was not priced by the latency model (a saved plan, or a uniform or ratio plan)"
    else:
        why = "no latency model was built (add a profile pass) to plan for speed"
    return f"{'; '.join(found)}: {why}; the output is written anyway"


def plan_prediction(plan: Plan, latency: LatencyModel) -> float:
    """The latency ``latency`` predicts for ``plan``: the plan's own prediction when it was planned on this model
    (its meta's ``predicted_ms``, read on the model anchored at the plans measured while planning), else the
    model's prediction of its counts."""
    meta = plan.meta
    if "predicted_ms" in meta and meta.get("original_predicted_ms") == latency.original_ms:
        return float(meta["predicted_ms"])
    return latency.predict({g.group: len(g.keep) for g in plan.groups if g.group in latency.channels})


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
            predicted = plan_prediction(ws.plan, lm)
        ws.model.graph.dims.update(ws.original.graph.dims)  # the pruned model is counted at the same sequence length
        models = [ws.original, ws.model]
        if ws.quantized is not None:  # the four columns, measured in this one process, side by side
            models += [ws.quantized.fp32_pruned, ws.quantized.int8_original]
        figures = measure(models, ws.eval_data, runs, batch, threads)
        before, after = figures[:2]
        fp32_pruned, int8_original = figures[2:] if ws.quantized is not None else (None, None)
        of_fp32 = ws.quantized is not None and lm is not None and not lm.setting.get("quantized")
        ws.validation = Validation(ws.model.runtime, before, after, batch, predicted, fp32_pruned, int8_original, of_fp32,
                                   lm.original_ms if predicted is not None and lm is not None else None)
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

