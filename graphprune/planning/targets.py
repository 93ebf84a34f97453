"""Turn plan options into a plan: fixed targets, the estimated limit, or a measured latency."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from graphprune.analysis.effective import Analysis
from graphprune.analysis.latency import LatencyModel
from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError, OverLimitError
from graphprune.ir.graph import ChannelGraph
from graphprune.ir.model import PrunableModel
from graphprune.ir.plan import Plan, plan_from_keep
from graphprune.planning.hierarchical import keep_sets, make_plan, removal_orders, round_counts
from graphprune.planning.latency import fast_candidates
from graphprune.planning.options import MAGNITUDE_CRITERIA, PlanOptions, Target

__all__ = ["LIMIT_TARGET", "confirmed_latency_plan", "latency_plan", "limit_plan", "never_slower", "plan_for"]

log = logging.getLogger(__name__)

LATENCY_STEPS = 6
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
    original = model.latency_ms(1, runs)
    frac, best, fallback = value, None, None
    for step in range(LATENCY_STEPS):
        try:
            plan = make_plan(model.graph, coupling, options.with_target(Target("macs", frac)), analysis)
        except OverLimitError:
            if analysis is None or frac <= analysis.limit.at_limit.macs / analysis.limit.original.macs:
                raise
            frac = analysis.limit.at_limit.macs / analysis.limit.original.macs * (1 + 1e-9)
            continue
        ratio = model.pruned(coupling, plan).latency_ms(1, runs) / original
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


def confirmed_latency_plan(model: PrunableModel, coupling: Coupling, analysis: Analysis | None, options: PlanOptions,
                           latency: LatencyModel) -> Plan:
    """Plan to ``options.latency`` x the original against the latency model in one pass, then measure once to confirm.

    The plan's meta holds both: ``predicted_ms`` (the model's) and ``measured_ms`` / ``measured_original_ms`` (one
    measurement of the pruned and original model at the latency model's batch and threads).
    """
    plan = make_plan(model.graph, coupling, options, analysis, latency)
    batch, threads = int(latency.setting["batch"]), int(latency.setting.get("threads", 0))
    before = model.latency_ms(batch, options.latency_runs, threads)
    after = model.pruned(coupling, plan).latency_ms(batch, options.latency_runs, threads)
    log.info("latency plan: predicted %.3f ms, measured %.3f ms (original %.3f ms)", plan.meta["predicted_ms"], after, before)
    return dataclasses.replace(plan, meta={**plan.meta, "measured_ms": after, "measured_original_ms": before,
                                           "measured_latency": after / before})


def never_slower(graph: ChannelGraph, coupling: Coupling, analysis: Analysis | None, options: PlanOptions, plan: Plan,
                 latency: LatencyModel) -> Plan:
    """When the latency model predicts ``plan`` slower than the original, re-plan once with counts multiples of 8 and keep the faster.

    The plan kept says so in its meta (``repaired``: how; ``predicted_slower``: when it still is).
    """
    predicted = float(plan.meta.get("predicted_ms", latency.original_ms))
    if predicted <= latency.original_ms or options.target is None or options.method == "uniform":
        return plan
    try:
        other = make_plan(graph, coupling, dataclasses.replace(options, round_to=8), analysis, latency)
    except (OverLimitError, BadInputError) as exc:
        log.info("never-slower re-plan failed: %s", exc)
        other = plan
    if float(other.meta.get("predicted_ms", predicted)) < predicted:
        plan = dataclasses.replace(other, meta={**other.meta, "repaired": "re-planned with counts multiples of 8"})
    if float(plan.meta.get("predicted_ms", predicted)) > latency.original_ms:
        plan = dataclasses.replace(plan, meta={**plan.meta, "predicted_slower": True})
    return plan


def plan_for(coupling: Coupling, analysis: Analysis | None, options: PlanOptions, model: PrunableModel,
             latency: LatencyModel | None = None) -> tuple[Plan, str]:
    """The plan ``options`` ask for on ``model``, and a description of its target.

    With a latency model, level 1 prices by predicted ms, counts snap to fast ones, a latency target is
    planned in one pass (then measured once), and a plan predicted slower than the original is re-planned once.

    Raises:
        BadInputError: No target without a hierarchical analysis, or bad options.
        OverLimitError: A target beyond the estimated maximum (unless allowed).
    """
    options.check()
    if options.plan_file:
        return Plan.load(options.plan_file), f"saved plan {Path(options.plan_file).name}"
    target = options.target
    if target is not None and target.kind == "ratio" and options.method == "uniform" and options.criterion in MAGNITUDE_CRITERIA:
        from graphprune.planning.uniform import uniform_plan

        plan = uniform_plan(model.graph, coupling, target.value, options.criterion, options.round_to, options.seed)
        return plan, f"ratio {target.value:g} of every group"
    if target is None:
        if analysis is None or options.method != "hierarchical":
            raise BadInputError("give a target (ratio, macs, params or latency); only hierarchical pruning with an analysis defaults to the estimated limit")
        return limit_plan(model.graph, coupling, analysis, options.criterion, options.round_to, latency), LIMIT_TARGET
    described = f"{target.kind} {target.value:g}"
    if target.kind == "latency" and latency is None:
        return latency_plan(model, coupling, analysis, options), described
    if target.kind == "latency" and latency is not None:
        plan = confirmed_latency_plan(model, coupling, analysis, options, latency)
    else:
        plan = make_plan(model.graph, coupling, options, analysis, latency)
    if latency is not None:
        plan = never_slower(model.graph, coupling, analysis, options, plan, latency)
    return plan, described
