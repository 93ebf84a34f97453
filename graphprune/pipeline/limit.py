"""The limit pass: measure a few points of quality vs MACs reduction and calibrate the network's limit.

Each point is one budget's plan (every group at its effective filters under
that predicted-loss budget), compensated, rewritten, repaired and evaluated on
held-out calibration samples (the data's samples past those the analysis and
compensation use), with no fine-tuning: the meaning the limit states
(:mod:`graphprune.planning.limit`). The result's per-group counts become the
hierarchical plan's floors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from graphprune.analysis.cost import cost_with_keep
from graphprune.analysis.effective import budget_removals, removal_envelope
from graphprune.errors import BadInputError
from graphprune.frontends.data import Calibration
from graphprune.ir.model import PrunableModel
from graphprune.ir.plan import Plan, plan_from_keep
from graphprune.pipeline.passes import CompensateOptions, CompensatePass, RepairPass, RewriteOptions, RewritePass
from graphprune.pipeline.workspace import Pass, PassResult, Workspace, register_pass
from graphprune.planning.limit import (
    EXTRA_FINETUNE_POINTS,
    MIN_LOG_DROP,
    REACH_OVERSHOOT,
    SPECTRAL_NATS_PER_TOLERANCE,
    CalibratedLimit,
    CalibrationPoint,
    FineTunedLimit,
    LimitOptions,
    Strata,
    default_confidence,
    factor_to_drop,
    finetuned_limit,
    full_standard_error,
    measured_curve,
    paired_drop,
    paired_margin,
    remaining_after,
    search,
    stratified_order,
)
from graphprune.planning.selection import DropOrder, greedy_drop_order

if TYPE_CHECKING:
    from graphprune.recovery.reconstruct import OriginalActivations

__all__ = ["BudgetFamily", "LimitPass", "LimitPassOptions", "confident", "decided", "held_out", "plan_correct", "predictions", "scoring_samples", "top1"]

log = logging.getLogger(__name__)

MIN_HOLDOUT = 256
"""Fewer unused samples than this (and than ``holdout``): no calibration, said in a status line."""
SCORING_STEP = 1024
"""A limit point scores its held-out samples this many at a time (:func:`decided` says when to stop)."""
DECISIVE_Z = 2.0
"""A point's drop this many standard errors from the pass line decides it before every held-out sample is scored."""
PRECISE = 1.1
"""A point stops once its drop's standard error is within this factor of the one every held-out sample would give."""


@dataclasses.dataclass(frozen=True)
class LimitPassOptions(LimitOptions):
    """The limit's meaning and cost, plus the recovery each point gets (the pipeline's compensate and repair).

    Attributes:
        compensate, repair: Recovery applied at each point (match the pipeline's passes).
        budget: The spectral budget; 0: ``SPECTRAL_NATS_PER_TOLERANCE * tolerance``.
        samples, batch_size, seed, memory_bytes: As the compensate pass's.
    """

    compensate: bool = True
    repair: bool = True
    budget: float = 0.0
    samples: int = 1024
    batch_size: int = 64
    seed: int = 0
    memory_bytes: int = 0

    def check(self) -> None:
        super().check()
        self.recovery().check()
        if self.budget < 0:
            raise BadInputError(f"limit budget must be >= 0 (0: from the tolerance), got {self.budget}")

    def recovery(self) -> CompensateOptions:
        return CompensateOptions(samples=self.samples, batch_size=self.batch_size, seed=self.seed, memory_bytes=self.memory_bytes)


def held_out(data: Calibration, used: int, n: int, seed: int) -> Calibration:
    """Up to ``n`` samples past the first ``used`` of the seeded permutation the analysis and compensation subsets take."""
    perm = np.random.default_rng(seed).permutation(len(data))
    return dataclasses.replace(_taken(data, np.sort(perm[used:used + n])), source=f"{data.source} (held out)")


def predictions(model: PrunableModel, data: Calibration, batch_size: int) -> np.ndarray:
    """Top-1 class over the last axis of the model's first output on every sample: (samples,) for a classifier,
    (samples, tokens) for a language model's (batch, tokens, vocabulary) logits (see :func:`top1`).

    Raises:
        BadInputError: When the first output has no class axis beside the batch.
    """
    with top1(model, batch_size) as predict:
        return predict(data)


def confident(model: PrunableModel, data: Calibration, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predictions`, and how sure the model is of each sample: its top-1 minus top-2 softmax probability
    (averaged over tokens), in one run."""
    with _first_outputs(model, batch_size) as run:
        classes, margin = run(data, lambda y: (_classes(y), _margin(y)))
        return classes, margin


@contextlib.contextmanager
def top1(model: PrunableModel, batch_size: int) -> Iterator[Callable[[Calibration], np.ndarray]]:
    """A function giving :func:`predictions` of ``model``: on one onnxruntime session for an ONNX model (as many
    intra-op threads as torch has; 1.5x the torch interpreter's speed on one thread, ResNet-20 and ``vgg16s``), else
    through the torch interpreter, which also takes over when the session cannot run the data's batches."""
    with _first_outputs(model, batch_size) as run:
        yield lambda data: run(data, lambda y: (_classes(y),))[0]


Reduce = Callable[[np.ndarray], tuple[np.ndarray, ...]]


@contextlib.contextmanager
def _first_outputs(model: PrunableModel, batch_size: int) -> Iterator[Callable[[Calibration, Reduce], tuple[np.ndarray, ...]]]:
    """A function running ``model`` on data batch by batch and concatenating what ``reduce`` makes of each batch's
    first output (see :func:`top1` for where it runs)."""
    from graphprune.execution.interpreter import GraphInterpreter

    interp: GraphInterpreter | None = None

    def by_interpreter(data: Calibration, reduce: Reduce) -> tuple[np.ndarray, ...]:
        nonlocal interp
        interp = interp or GraphInterpreter(model.graph).eval()
        with torch.no_grad():
            return _joined([reduce(interp(*(torch.from_numpy(a) for a in inputs))[0].numpy())
                            for _, inputs, _ in data.batches(batch_size)])

    if model.kind != "onnx":
        yield by_interpreter
        return
    from graphprune.ir.onnx import model_session

    with model_session(model.om.model, threads=torch.get_num_threads()) as session:  # type: ignore[attr-defined]
        names = [i.name for i in session.get_inputs()]
        broken = False

        def by_session(data: Calibration, reduce: Reduce) -> tuple[np.ndarray, ...]:
            nonlocal broken
            if not broken:
                try:
                    return _joined([reduce(session.run(None, dict(zip(names, inputs)))[0])
                                    for _, inputs, _ in data.batches(batch_size)])
                except BadInputError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the interpreter computes the same outputs
                    log.info("limit: onnxruntime cannot score batches of %d (%s): the torch interpreter does", batch_size, exc)
                    broken = True
            return by_interpreter(data, reduce)

        yield by_session


def _joined(parts: Sequence[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate(column) for column in zip(*parts))


def _classes(y: np.ndarray) -> np.ndarray:
    if y.ndim < 2:
        raise BadInputError(f"output agreement needs a (batch, ..., classes) first output, got shape "
                            f"{tuple(y.shape)}: give labelled data or --no-calibrate")
    return y.argmax(-1)


def _margin(y: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 softmax probability over the last axis, averaged over the axes between batch and classes."""
    z = np.exp(y - y.max(-1, keepdims=True))
    top = np.sort(z / z.sum(-1, keepdims=True), -1)
    gap = top[..., -1] - (top[..., -2] if y.shape[-1] > 1 else 0.0)
    return gap.reshape(gap.shape[0], -1).mean(1)


def _plan(ws: Workspace, orders: Mapping[int, DropOrder], counts: Mapping[int, int], budget: float,
          target: str = "limit point") -> Plan:
    keep = {g: orders[g].keep(k) for g, k in counts.items()}
    return plan_from_keep(ws.groups(), keep, {"method": "hierarchical", "criterion": "effective", "target": target,
                                              "budget": budget})


@dataclasses.dataclass(frozen=True)
class BudgetFamily:
    """The plans the limit is measured on: every group at its counts under one network-wide predicted-loss budget,
    its channels in the greedy second-order drop order of its F matrix."""

    orders: Mapping[int, DropOrder]
    full: Mapping[int, int]

    @classmethod
    def of(cls, ws: Workspace) -> BudgetFamily | None:
        """The family of the workspace's analysis (None without its F matrices)."""
        if ws.analysis is None:
            return None
        fisher = ws.analysis.fisher
        orders = {g.group: greedy_drop_order(fisher[g.group].f) for g in ws.analysis.groups if g.group in fisher}
        coupling = ws.groups()
        return cls(orders, {g: coupling.by_id(g).channels for g in orders}) if orders else None

    def counts(self, budget: float) -> dict[int, int]:
        removed = budget_removals(self.orders, budget) if budget > 0 else {}
        return {g: c - removed.get(g, 0) for g, c in self.full.items()}

    def max_budget(self) -> float:
        """A budget at which every group keeps one channel."""
        return float(sum(float(removal_envelope(d)[-1]) for d in self.orders.values())) * 1.01 + 1e-12

    def budget_keeping(self, ws: Workspace, kind: str, kept: float, within: float) -> float | None:
        """The smallest budget up to ``within`` whose counts keep at most ``kept`` of the original's ``kind``
        (``macs`` or ``params``), by bisection in log budget; None when even ``within`` keeps more."""
        graph, coupling = ws.original.graph, ws.groups()
        whole = cost_with_keep(graph, coupling, dict(self.full))

        def fraction(budget: float) -> float:
            cost = cost_with_keep(graph, coupling, self.counts(budget))
            return getattr(cost, kind) / max(1, getattr(whole, kind))

        if fraction(within) > kept:
            return None
        lo, hi = 1e-12, within
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if fraction(mid) <= kept else (mid, hi)
        return hi

    def reaching(self, ws: Workspace, kind: str, kept: float, within: float) -> Plan | None:
        """The family's plan at :meth:`budget_keeping`; None when even ``within`` keeps more."""
        budget = self.budget_keeping(ws, kind, kept, within)
        if budget is None:
            return None
        return _plan(ws, self.orders, self.counts(budget), budget, target=f"{kind} {kept:g} (budget family)")


def _shared_original(ws: Workspace, options: LimitPassOptions) -> tuple[OriginalActivations | None, int]:
    """The original's reads on the compensation samples, computed once for every point, when they fit in a quarter
    of the memory bound (else each point runs the original again, said in a status line), and the bound left to
    each point's refit (the whole bound when nothing is shared; 0: the default)."""
    from graphprune.recovery.gram_budget import default_memory_bytes, format_bytes
    from graphprune.recovery.reconstruct import original_activation_bytes, original_activations, refit_samples

    assert ws.data is not None
    recovery = options.recovery()
    if not options.compensate or recovery.method != "sequential":
        return None, recovery.memory_bytes
    bound = recovery.memory_bytes or default_memory_bytes()
    data = ws.data.subset(recovery.samples, recovery.seed)
    n = max(2, refit_samples(ws.original.graph, bound, len(data)))
    need = original_activation_bytes(ws.original.graph, n)
    if need > bound // 4:
        ws.status(f"limit: the original's activations on {n} samples ({format_bytes(need)}) exceed a quarter of the "
                  f"{format_bytes(bound)} bound: every point runs the original again")
        return None, recovery.memory_bytes
    data = Calibration(tuple(a[:n] for a in data.inputs), None, data.source)
    return original_activations(ws.original.graph, data, recovery.batch_size), bound - need


def plan_correct(ws: Workspace, plan: Plan, options: LimitPassOptions, held: Calibration,
                 original: OriginalActivations | None = None, memory_bytes: int = 0,
                 enough: Callable[[np.ndarray], bool] | None = None) -> np.ndarray:
    """Compensate, rewrite, repair (as the pipeline would) and score each held-out sample (True: the top-1 class is
    its label); ``memory_bytes`` bounds the refit (0: the options' bound).

    ``enough``: score ``SCORING_STEP`` samples at a time and stop once it says the first ones (the scores so far) decide;
    the result then covers a prefix of ``held``."""
    assert ws.data is not None
    w = Workspace(original=ws.original, model=ws.original, data=ws.data, coupling=ws.groups(), plan=plan)
    recovery = options.recovery()
    if memory_bytes:
        recovery = dataclasses.replace(recovery, memory_bytes=memory_bytes)
    if options.compensate:
        w = CompensatePass(recovery, original)(w).workspace
    w = RewritePass(RewriteOptions(verify=False))(w).workspace
    if options.repair:
        w = RepairPass(recovery)(w).workspace
    assert held.labels is not None
    with top1(w.model, options.batch_size) as predict:
        if enough is None:
            return predict(held) == held.labels
        scores: list[np.ndarray] = []
        for start in range(0, len(held), SCORING_STEP):
            part = _taken(held, slice(start, start + SCORING_STEP))
            scores.append(predict(part) == part.labels)
            if enough(np.concatenate(scores)):
                break
        return np.concatenate(scores)


def _taken(data: Calibration, index: slice | np.ndarray) -> Calibration:
    """The samples ``index`` picks (a slice, or indices in the order wanted), labels alike."""
    labels = None if data.labels is None else data.labels[index]
    return Calibration(tuple(a[index] for a in data.inputs), labels, data.source)


def decided(base_correct: np.ndarray, tolerance: float, confidence: float,
            strata: Strata | None = None) -> Callable[[np.ndarray], bool]:
    """Whether the scores so far (a prefix of the held-out samples in scoring order) settle the point: the paired
    drop more than ``DECISIVE_Z`` standard errors from the pass line (``tolerance`` less the confidence margin), or
    its standard error within ``PRECISE`` of what scoring every sample would give (stratified: the robust stratum
    showing too few flips to matter), or every sample scored."""
    strata = strata or Strata.single(base_correct.shape[0])

    def enough(correct: np.ndarray) -> bool:
        n = correct.shape[0]
        if n >= base_correct.shape[0]:
            return True
        drop, se = paired_drop(base_correct[:n], correct, strata)
        line = tolerance - paired_margin(base_correct[:n], correct, confidence, strata)
        if abs(drop - line) > DECISIVE_Z * max(se, 1.0 / n):
            return True
        return len(strata.sizes) > 1 and se <= PRECISE * full_standard_error(base_correct[:n], correct, strata)

    return enough


def scoring_samples(ws: Workspace, options: LimitPassOptions) -> Calibration | None:
    """The held-out samples the limit pass scores on: up to ``holdout`` of the workspace's held-out data when it has
    some, else the calibration samples the analysis and compensation leave; labelled with the original's predictions
    when they have no labels; None when fewer than ``MIN_HOLDOUT`` are left.

    Raises:
        BadInputError: Unlabelled data and a first output with no class axis.
    """
    held = _held(ws, options)
    if held is not None and held.labels is None:
        held = dataclasses.replace(held, labels=predictions(ws.original, held, options.batch_size))
    return held


def _held(ws: Workspace, options: LimitPassOptions) -> Calibration | None:
    """:func:`scoring_samples` before they are labelled."""
    assert ws.data is not None
    if ws.held_out is not None:
        held = held_out(ws.held_out, 0, options.holdout, options.seed)
    else:
        used = max(ws.analysis.samples if ws.analysis is not None else 0, options.samples)
        held = held_out(ws.data, used, options.holdout, options.seed)
    return None if len(held) < min(options.holdout, MIN_HOLDOUT) else held


def _scored(ws: Workspace, options: LimitPassOptions) -> tuple[Calibration, np.ndarray, np.ndarray] | None:
    """:func:`scoring_samples`, the original's predictions on them and its margins, in one run (:func:`confident`)."""
    held = _held(ws, options)
    if held is None:
        return None
    classes, margin = confident(ws.original, held, options.batch_size)
    return (held if held.labels is not None else dataclasses.replace(held, labels=classes)), classes, margin


def _finetuned(o: LimitPassOptions, measured: list[CalibrationPoint], base_q: float,
               evaluate: Callable[[float], CalibrationPoint], max_budget: float) -> tuple[FineTunedLimit, list[CalibrationPoint]]:
    """The fine-tuned estimate; measures up to ``EXTRA_FINETUNE_POINTS`` larger budgets while the curve has not dropped
    far enough, each aimed past the drop the estimate needs (:func:`~graphprune.planning.limit.factor_to_drop`)."""
    ft = finetuned_limit(measured_curve(base_q, measured), base_q, o.tolerance, o.finetune_epochs)
    for _ in range(EXTRA_FINETUNE_POINTS):
        if not ft.bounded or not measured:
            break
        last = max(measured, key=lambda p: p.budget)
        if last.budget >= max_budget:
            break
        need = REACH_OVERSHOOT * o.tolerance / ft.remaining
        budget = min(last.budget * factor_to_drop(last, need, base_q, MIN_LOG_DROP * o.tolerance), max_budget)
        measured = [*measured, evaluate(budget)]
        ft = finetuned_limit(measured_curve(base_q, measured), base_q, o.tolerance, o.finetune_epochs)
    return ft, measured


@register_pass
class LimitPass(Pass):
    """Calibrate the limit on held-out calibration data (a few measured points); its floors become the plan's."""

    name = "limit"
    Options = LimitPassOptions
    requires = frozenset({"data", "analysis"})
    ensures = frozenset({"limit"})
    forbids = frozenset({"plan"})

    def run(self, ws: Workspace) -> PassResult:
        assert ws.data is not None and ws.analysis is not None
        o: LimitPassOptions = self.options
        t0 = time.perf_counter()
        analysis, coupling, graph = ws.analysis, ws.groups(), ws.original.graph
        family = BudgetFamily.of(ws)
        if family is None:
            raise BadInputError("the limit pass needs the analysis's F matrices (an analysis saved without its .fisher.npz?)")
        orders, full = family.orders, family.full
        original = cost_with_keep(graph, coupling, full)
        metric = "accuracy" if (ws.held_out if ws.held_out is not None else ws.data).labels is not None else "agreement"
        scored = _scored(ws, o)
        if scored is None:
            used = max(analysis.samples, o.samples)
            where = ("in the held-out data" if ws.held_out is not None
                     else f"calibration samples are left after the {used} the analysis and compensation use")
            ws.status(f"limit: not calibrated: fewer than {min(o.holdout, MIN_HOLDOUT)} {where}; the plan's floors are "
                      "the analysis's")
            return PassResult(ws, False)
        held, classes, margin = scored
        ws.status(f"limit: scoring points on up to {len(held)} held-out samples of {held.source}")
        if 2.0 / len(held) > o.tolerance:
            ws.status(f"limit: {len(held)} held-out samples measure quality in steps of {100 / len(held):.2g} pp, "
                      f"too coarse for a {100 * o.tolerance:g} pp tolerance: give more data")
        assert held.labels is not None
        base_correct = classes == held.labels  # unlabelled: the labels are the original's own predictions
        order, strata = stratified_order(margin, o.seed)
        held, base_correct = _taken(held, order), base_correct[order]
        base_q = float(base_correct.mean())

        o = dataclasses.replace(o, confidence=default_confidence(o.confidence, ws.held_out is not None))
        cache: dict[float, dict[int, int]] = {}
        shared, point_bytes = _shared_original(ws, o)

        def counts(budget: float) -> dict[int, int]:
            if budget not in cache:
                cache[budget] = family.counts(budget)
            return cache[budget]

        def evaluate(budget: float) -> CalibrationPoint:
            start = time.perf_counter()
            c = counts(budget)
            cost = cost_with_keep(graph, coupling, c)
            loss = float(sum(orders[g].cost[full[g] - k] for g, k in c.items()))
            ws.status(f"limit: measuring budget {budget:.3g} ({original.macs / max(1, cost.macs):.2f}x fewer MACs)")
            correct = plan_correct(ws, _plan(ws, orders, c, budget), o, held, shared, point_bytes,
                                   decided(base_correct, o.tolerance, o.confidence, strata))
            n = correct.shape[0]  # a prefix of the scoring order: the quality is the base's less the stratified drop
            drop = paired_drop(base_correct[:n], correct, strata)[0]
            point = CalibrationPoint(budget, original.macs / max(1, cost.macs), original.params / max(1, cost.params), loss,
                                     base_q - drop, time.perf_counter() - start,
                                     paired_margin(base_correct[:n], correct, o.confidence, strata), n)
            log.info("limit point: %s", point)
            return point

        spectral = o.budget or SPECTRAL_NATS_PER_TOLERANCE * o.tolerance
        spectral_cost = cost_with_keep(graph, coupling, counts(spectral))
        max_budget = family.max_budget()
        threshold = base_q - o.tolerance
        base = CalibrationPoint(0.0, 1.0, 1.0, 0.0, base_q)

        def reduction(budget: float) -> float:
            return original.macs / max(1, cost_with_keep(graph, coupling, counts(budget)).macs)

        reach = o.tolerance / remaining_after(o.finetune_epochs) if o.finetune_epochs > 0 else 0.0
        lo, _hi, measured = search(evaluate, counts, spectral, max_budget, threshold, base, o.points, reduction, reach)
        finetuned = None
        if o.finetune_epochs > 0:
            finetuned, measured = _finetuned(o, measured, base_q, evaluate, max_budget)
        limit = CalibratedLimit(
            metric=metric, tolerance=o.tolerance, base_quality=base_q, holdout=len(held), spectral_budget=spectral,
            spectral_macs_reduction=original.macs / max(1, spectral_cost.macs), budget=lo.budget,
            macs_reduction=lo.macs_reduction, params_reduction=lo.params_reduction, quality=lo.quality,
            effective=counts(lo.budget), points=tuple(measured), finetuned=finetuned, seconds=time.perf_counter() - t0,
            analysis_seconds=float(analysis.meta.get("seconds", 0.0)), confidence=o.confidence, margin=lo.margin,
        )
        ws.limit = limit
        for line in limit.lines():
            ws.status(line)
        return PassResult(ws, False)
