"""Turn plan options into a plan: fixed targets, the estimated limit, or a measured latency."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from graphprune.analysis.effective import Analysis
from graphprune.analysis.latency import LatencyModel
from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError, OverLimitError
from graphprune.execution import timing
from graphprune.ir.graph import ChannelGraph
from graphprune.ir.model import Int8Form, PrunableModel
from graphprune.ir.plan import Plan, plan_from_keep
from graphprune.planning.hierarchical import keep_sets, make_plan, removal_orders, round_counts, value_of
from graphprune.planning.latency import fast_candidates
from graphprune.planning.options import MAGNITUDE_CRITERIA, PlanOptions, Target

__all__ = ["LIMIT_TARGET", "OVERSHOOT", "REPAIR_MULTIPLES", "at_operating_point", "latency_plan", "limit_plan", "never_slower", "plan_for"]

log = logging.getLogger(__name__)

LATENCY_STEPS = 6
REPAIR_MULTIPLES = (8, 16)
"""Re-plans with counts multiples of these are measured against the plan (see :func:`never_slower`)."""
OVERSHOOT = 0.05
"""A re-plan keeping less than (1 - this) of what the plan keeps of its target (MACs, params, predicted ms) only
repairs a plan measured slower: when the plan is already faster, removing more than asked is not kept for speed."""
LIMIT_TARGET = "estimated maximum rate"
"""How a plan without a target (every group at its effective filters) names its target."""


def limit_plan(graph: ChannelGraph, coupling: Coupling, analysis: Analysis, criterion: str, round_to: int,
               latency: LatencyModel | None = None) -> Plan:
    """Every analysed group keeps its effective filters (the estimated maximum rate).

    With a latency model and no ``round_to``, each count rises to the group's next fast count (never
    below r_g) when the tables predict that faster than the bare r_g counts.
    """
    options = PlanOptions(method="hierarchical", criterion=criterion, round_to=round_to)
    orders = removal_orders(coupling, graph, options, analysis)
    floors = {gid: o.floor for gid, o in orders.items()}
    counts = round_counts(floors, orders, round_to)
    meta: dict[str, object] = {"method": "hierarchical", "criterion": criterion, "target": "limit", "round_to": round_to}
    if latency is not None:
        priced = {g: k for g, k in counts.items() if g in latency.channels}
        bare = latency.predict(priced)
        if round_to <= 1:
            snapped = {g: min(fast_candidates(latency, g, k)) for g, k in priced.items()}
            if latency.predict(snapped) < bare:
                counts = {**counts, **snapped}
                meta["fast_counts"] = True
        meta.update(predicted_ms=latency.predict({g: counts[g] for g in priced}), original_predicted_ms=latency.original_ms)
    return plan_from_keep(coupling, keep_sets(orders, counts), meta)


def latency_plan(model: PrunableModel, coupling: Coupling, analysis: Analysis | None, options: PlanOptions) -> Plan:
    """Reach ``options.latency`` x the model's latency on its own runtime by adjusting a MACs target (measured).

    Raises:
        OverLimitError: When the latency is not reached within the effective filters (and over-limit is not allowed).
    """
    value, runs = options.latency, options.latency_runs
    if value is None:
        raise BadInputError("latency_plan needs a latency target")
    frac, best, fallback = value, None, None
    for step in range(LATENCY_STEPS):
        try:
            plan = make_plan(model.graph, coupling, options.with_target(Target("macs", frac)), analysis)
        except OverLimitError:
            limit = analysis.limit.at_limit.macs / analysis.limit.original.macs if analysis is not None else 1.0
            if analysis is None or frac <= limit * (1 + 1e-6):
                if best is not None or fallback is not None:
                    break
                raise OverLimitError(
                    f"latency {value:g} of the original was not reached without pruning past the effective filters "
                    f"(at most {limit:.3f} of the MACs; latency is measured: a busy machine makes it noisy); "
                    "lower the target or pass --allow-over-limit"
                ) from None
            frac = limit * (1 + 1e-9)
            continue
        original, pruned = timing.side_by_side_ms([model, model.pruned(coupling, plan)], 1, runs)
        ratio = pruned / original
        log.info("latency step %d: MACs target %.3f -> latency %.3f of the original", step, frac, ratio)
        fallback = plan
        if ratio <= value:
            best = plan
            if ratio >= 0.95 * value:
                break
        frac = float(np.clip(frac * value / max(ratio, 1e-6), 0.01, 0.99))
    if best is None and not options.allow_over_limit and analysis is not None:
        raise OverLimitError(
            f"latency {value:g} of the original was not reached without pruning past the effective filters "
            "(latency is measured: a busy machine makes it noisy); lower the target or pass --allow-over-limit"
        )
    chosen = best or fallback
    if chosen is None:
        raise BadInputError(f"latency {value:g} of the original could not be planned")
    return chosen


Replan = Callable[[int], Plan]
"""``replan(round_to)``: the same plan request with counts multiples of ``round_to``."""


def _counts(plan: Plan) -> dict[int, int]:
    return {g.group: len(g.keep) for g in plan.groups}


def never_slower(model: PrunableModel, coupling: Coupling, plan: Plan, latency: LatencyModel, replan: Replan, runs: int,
                 round_to: int = 1, within: Replan | None = None) -> Plan:
    """Measure ``plan`` against the original at batch 1 and the latency model's batch; keep the best measured re-plan.

    Latency depends on the pruned graph's shapes, not its weights, so the plain pruned model measured here runs
    as fast as the compensated, repaired or fine-tuned one written later (quantized first when the latency model
    was built on int8 QDQ, its setting ``quantized``). The re-plan with counts multiples of the first of
    :data:`REPAIR_MULTIPLES` above ``round_to`` is always measured too (isolated probes can favour counts that break
    onnxruntime's channel blocking in the whole model), unless the plan is measured faster and the re-plan removes
    more than :data:`OVERSHOOT` beyond it of the target; the next ones only while the best measured is still slower
    than the original at one of the batches. Kept: the fastest against the original at the latency model's batch among those no
    slower at any batch, else the one whose worst ratio to the original is lowest. Each plan is timed once a batch, side by
    side with the original in interleaved rounds (:func:`graphprune.execution.timing.side_by_side_ms`).

    ``within(multiple)``: the plan with counts multiples of ``multiple`` that stays within the effective filters
    whatever the target (the limit's floors rounded up). When the plan is still slower and a re-plan failed
    because the target lies beyond such counts, it is measured and, if no slower at any batch, reported as
    ``faster_within`` (the share of the target it keeps, its multiple and its ``measured_at``), not kept: it
    misses the target.

    Returns:
        The plan kept; its meta holds ``measured_ms``, ``measured_original_ms`` and ``measured_latency`` (their
        ratio) at the latency model's batch, ``measured_at`` (``{batch: [ms, original ms]}``), ``measurements``,
        ``repaired`` (which re-plan was kept and why) and ``measured_slower`` (slower at some batch, whatever was tried).
    """
    batch, threads = int(latency.setting["batch"]), int(latency.setting.get("threads", 0))
    quantized = Int8Form.of_setting(latency.setting)
    batches = sorted({1, batch})

    def timed(m: PrunableModel) -> Timed:
        return _side_by_side(model, m, batches, runs, threads, quantized)

    def better(ms: Timed, than: Timed) -> bool:
        if (_worst(ms) <= 1.0) != (_worst(than) <= 1.0):
            return _worst(ms) <= 1.0
        return _ratio(ms, batch) < _ratio(than, batch) if _worst(ms) <= 1.0 else _worst(ms) < _worst(than)

    best, best_ms = plan, timed(model.pruned(coupling, plan))
    first_ms, measurements, how, seen = best_ms, 2 * len(batches), "", [_counts(plan)]
    over_limit: list[int] = []
    for i, multiple in enumerate(m for m in REPAIR_MULTIPLES if m > round_to):
        if i > 0 and _worst(best_ms) <= 1.0:
            break
        other, past_limit = _unseen(replan, multiple, seen)
        if past_limit:
            over_limit.append(multiple)
        if other is None:
            continue
        if _worst(first_ms) <= 1.0 and _overshoots(other, plan):
            log.info("re-plan with multiples of %d not measured: it keeps %.3f of the target against the plan's %.3f",
                     multiple, other.meta["target_kept"], plan.meta["target_kept"])
            continue
        seen.append(_counts(other))
        ms = timed(model.pruned(coupling, other))
        measurements += 2 * len(batches)
        log.info("re-plan with counts multiples of %d: %s (plan %s)", multiple, _ms_line(ms), _ms_line(first_ms))
        if better(ms, best_ms):
            best, best_ms = other, ms
            how = (f"re-planned with counts multiples of {multiple}" if _worst(first_ms) > 1.0
                   else f"kept with counts multiples of {multiple}, measured faster than the planned counts")
    pruned_ms, original_ms = best_ms[batch]
    meta: dict[str, object] = {**best.meta, "measured_ms": pruned_ms, "measured_original_ms": original_ms,
                               "measured_latency": pruned_ms / original_ms, "measurements": measurements,
                               "measured_at": {str(b): list(best_ms[b]) for b in batches}}
    if how:
        meta["repaired"] = how
    if _worst(best_ms) > 1.0:
        meta["measured_slower"] = True
        if within is not None and over_limit:
            found, spent = _faster_within(within, over_limit, lambda p: timed(model.pruned(coupling, p)), seen)
            meta["measurements"] = measurements + spent
            if found is not None:
                meta["faster_within"] = found
    log.info("plan measured: %s (predicted %s at batch %d)", _ms_line(best_ms), best.meta.get("predicted_ms"), batch)
    return dataclasses.replace(best, meta=meta)


Timed = dict[int, tuple[float, float]]
"""``{batch: (ms, original ms)}``: a pruned model and its original timed side by side at each batch."""


def _side_by_side(original: PrunableModel, pruned: PrunableModel, batches: list[int], runs: int, threads: int,
                  quantized: Int8Form | None) -> Timed:
    """``pruned`` and ``original`` timed side by side at each batch (:func:`graphprune.execution.timing.side_by_side_ms`):
    their ratio is not skewed by the machine's load changing between two lone timings."""
    out: Timed = {}
    for b in batches:
        original_ms, pruned_ms = timing.side_by_side_ms([original, pruned], b, runs, threads, quantized)
        out[b] = (pruned_ms, original_ms)
    return out


def _ratio(ms: Timed, batch: int) -> float:
    return ms[batch][0] / ms[batch][1]


def _worst(ms: Timed) -> float:
    """The largest ratio to the original over the batches (above 1: slower at one of them)."""
    return max(_ratio(ms, b) for b in ms)


def _unseen(replan: Replan, multiple: int, seen: list[dict[int, int]]) -> tuple[Plan | None, bool]:
    """``replan(multiple)`` unless it fails or its counts were measured already (None); and whether it failed because
    the target lies past the effective filters."""
    try:
        other = replan(multiple)
    except (OverLimitError, BadInputError) as exc:
        log.info("re-plan with multiples of %d failed: %s", multiple, exc)
        return None, isinstance(exc, OverLimitError)
    return (None if _counts(other) in seen else other), False


def _faster_within(within: Replan, multiples: list[int], timed: Callable[[Plan], Timed],
                   seen: list[dict[int, int]]) -> tuple[dict[str, object] | None, int]:
    """The first plan ``within(m)`` (counts multiples of m, within the effective filters) measured no slower than
    the original at any batch, as meta (``target_kept``, ``multiple``, ``measured_at``: ``{batch: [ms, original
    ms]}``); and the measurements spent."""
    spent = 0
    for multiple in multiples:
        other, _ = _unseen(within, multiple, seen)
        if other is None:
            continue
        seen.append(_counts(other))
        ms = timed(other)
        spent += 2 * len(ms)
        log.info("within the effective filters, counts multiples of %d: %s", multiple, _ms_line(ms))
        if _worst(ms) <= 1.0:
            return {"target_kept": other.meta.get("target_kept"), "multiple": multiple,
                    "measured_at": {str(b): list(ms[b]) for b in sorted(ms)}}, spent
    return None, spent


def _overshoots(other: Plan, plan: Plan) -> bool:
    """``other`` removes more than :data:`OVERSHOOT` beyond ``plan`` of their target (False when either does not say)."""
    mine, theirs = plan.meta.get("target_kept"), other.meta.get("target_kept")
    if not isinstance(mine, float) or not isinstance(theirs, float):
        return False
    return theirs < mine * (1.0 - OVERSHOOT)


def _ms_line(ms: Timed) -> str:
    return ", ".join(f"{v:.3f} ms against {o:.3f} ms at batch {b}" for b, (v, o) in sorted(ms.items()))


def plan_for(coupling: Coupling, analysis: Analysis | None, options: PlanOptions, model: PrunableModel,
             latency: LatencyModel | None = None) -> tuple[Plan, str]:
    """The plan ``options`` ask for on ``model``, and a description of its target.

    With a latency model, level 1 prices by predicted ms, counts snap to fast ones, a latency target is
    planned in one pass, and the plan is measured once against the original and repaired when it is slower
    (:func:`never_slower`). When measuring is allowed (``latency_runs``), the first plan is measured first and
    anchors the latency model at its depth (:func:`at_operating_point`), and so does its re-plan with counts
    multiples of 8 when the first plan's counts break the channel blocking (:func:`_blocked_first`: the blocked plans'
    curve, :meth:`LatencyModel.corrected`); the plan kept is made again with them. Its meta says the first plan's
    predicted and measured ratios (``anchor_predicted``, ``anchor_measured``; ``blocked_anchor_*`` for the re-plan).

    Raises:
        BadInputError: No target without a hierarchical analysis, or bad options.
        OverLimitError: A target beyond the estimated maximum (unless allowed).
    """
    options.check()
    if options.plan_file:
        return Plan.load(options.plan_file), f"saved plan {Path(options.plan_file).name}"
    target = options.target
    replan: Replan
    within: Replan | None = None
    if target is not None and target.kind == "ratio" and options.method == "uniform" and options.criterion in MAGNITUDE_CRITERIA:
        from graphprune.planning.uniform import uniform_plan

        value = target.value

        def replan(round_to: int) -> Plan:
            return uniform_plan(model.graph, coupling, value, options.criterion, round_to, options.seed)

        described = f"ratio {value:g} of every group"
    elif target is None:
        if analysis is None or options.method != "hierarchical":
            raise BadInputError("give a target (ratio, macs, params or latency); only hierarchical pruning with an analysis defaults to the estimated limit")
        found = analysis

        def replan(round_to: int) -> Plan:
            return limit_plan(model.graph, coupling, found, options.criterion, round_to, latency)

        described = LIMIT_TARGET
    elif target.kind == "latency" and latency is None:
        return latency_plan(model, coupling, analysis, options), f"{target.kind} {target.value:g}"
    else:
        def replan(round_to: int) -> Plan:
            return make_plan(model.graph, coupling, dataclasses.replace(options, round_to=round_to), analysis, latency)

        described = f"{target.kind} {target.value:g}"
        if analysis is not None and options.method == "hierarchical" and not options.allow_over_limit and target.kind in ("macs", "params"):
            within = _within_limit(model.graph, coupling, analysis, options.criterion, target.kind)
    plan = replan(options.round_to)
    if latency is not None and options.latency_runs > 0:
        first, anchored = plan, at_operating_point(model, coupling, plan, latency, options.latency_runs)
        anchor: dict[str, object] = {}
        anchor_timings = 2
        if anchored is not latency:
            latency = anchored  # the re-plans read the anchored model (the closures above see this name)
            anchor = _first_plan_meta(first, latency, "anchor")
            blocked = _blocked_first(replan, first, latency, options.round_to)
            if blocked is not None:  # the check measures this re-plan too: it anchors the blocked plans' curve
                twice = at_operating_point(model, coupling, blocked, latency, options.latency_runs)
                if twice is not latency:
                    latency, anchor_timings = twice, 4
                    anchor.update(_first_plan_meta(blocked, latency, "blocked_anchor"))
            plan = replan(options.round_to)
        plan = never_slower(model, coupling, plan, latency, replan, options.latency_runs, options.round_to, within)
        if anchor:
            measurements = int(str(plan.meta["measurements"])) + anchor_timings
            plan = dataclasses.replace(plan, meta={**plan.meta, **anchor, "measurements": measurements})
    return plan, described


def _blocked_first(replan: Replan, first: Plan, latency: LatencyModel, round_to: int) -> Plan | None:
    """The first plan's re-plan with counts multiples of the first of :data:`REPAIR_MULTIPLES` above ``round_to``,
    when the latency model tells blocked plans apart (:meth:`LatencyModel.is_blocked`), the first plan's counts break
    the blocking and the re-plan's keep it, and :func:`never_slower` would measure it (it does not overshoot the
    target while the first plan measured faster). None otherwise."""
    multiple = next((m for m in REPAIR_MULTIPLES if m > round_to), 0)
    if not multiple or latency.block <= 0 or latency.is_blocked(_counts(first)):
        return None
    other, _ = _unseen(replan, multiple, [_counts(first)])
    if other is None or not latency.is_blocked(_counts(other)):
        return None
    if latency.anchors and latency.anchors[-1][1] <= 1.0 and _overshoots(other, first):
        return None
    return other


def _within_limit(graph: ChannelGraph, coupling: Coupling, analysis: Analysis, criterion: str, kind: str) -> Replan:
    """``within(m)``: every group at its effective filters rounded up to a multiple of m, with the share of the
    target's quantity (``macs``, ``params``) it keeps (``target_kept``): the fast plan the limit allows, whatever the target."""
    value = value_of(graph, coupling, kind, None)
    full = {g.id: g.channels for g in coupling.prunable}

    def within(multiple: int) -> Plan:
        plan = limit_plan(graph, coupling, analysis, criterion, multiple)
        keep = {**full, **{g: k for g, k in _counts(plan).items() if g in full}}
        return dataclasses.replace(plan, meta={**plan.meta, "target_kept": value(keep) / value(full)})

    return within


def at_operating_point(model: PrunableModel, coupling: Coupling, plan: Plan, latency: LatencyModel, runs: int) -> LatencyModel:
    """``latency`` anchored at ``plan`` (a first plan at the target): the plan and the original timed side by side at
    the latency model's batch (:meth:`LatencyModel.anchored`). Unchanged when the plan has no prediction or keeps all."""
    keep = {g: k for g, k in _counts(plan).items() if g in latency.channels}
    if "predicted_ms" not in plan.meta or all(k == latency.channels[g] for g, k in keep.items()):
        return latency
    batch, threads = int(latency.setting["batch"]), int(latency.setting.get("threads", 0))
    quantized = Int8Form.of_setting(latency.setting)
    original, pruned = timing.side_by_side_ms([model, model.pruned(coupling, plan)], batch, runs, threads, quantized)
    log.info("latency model anchored at the first plan: measured %.3f of the original, predicted %.3f",
             pruned / original, float(plan.meta["predicted_ms"]) / latency.original_ms)
    return latency.anchored(keep, pruned / original)


def _first_plan_meta(first: Plan, latency: LatencyModel, name: str) -> dict[str, object]:
    """What the plan's meta says about an anchor (``name``: ``anchor`` for the first plan, ``blocked_anchor`` for
    its blocked re-plan): the plan's prediction before it and its measurement, as ratios to the original."""
    _, ratio = latency.anchors[-1]
    return {f"{name}_predicted": float(first.meta["predicted_ms"]) / latency.original_ms, f"{name}_measured": ratio}
