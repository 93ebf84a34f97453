"""Turn a plan pass's options into a plan: fixed targets, the estimated limit, or a measured latency."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from graphprune.analysis.effective import Analysis
from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError, OverLimitError
from graphprune.frontends.onnx import OnnxModel
from graphprune.ir.graph import ChannelGraph
from graphprune.ir.plan import Plan, plan_from_keep
from graphprune.planning.hierarchical import PlanOptions, Target, keep_sets, make_plan, removal_orders, round_counts

__all__ = ["latency_plan", "limit_plan", "plan_for"]

log = logging.getLogger(__name__)

LATENCY_STEPS = 6


def _target(options: Any) -> Target | None:
    given = [(k, getattr(options, k)) for k in ("ratio", "macs", "params", "latency") if getattr(options, k) is not None]
    if len(given) > 1:
        raise BadInputError(f"give one target, not {' and '.join(k for k, _ in given)}")
    return Target(*given[0]) if given else None


def limit_plan(graph: ChannelGraph, coupling: Coupling, analysis: Analysis, criterion: str, round_to: int) -> Plan:
    """Every analysed group keeps exactly its effective filters (the estimated maximum rate)."""
    options = PlanOptions(method="hierarchical", criterion=criterion, round_to=round_to)
    orders = removal_orders(coupling, graph, options, analysis)
    counts = round_counts({gid: o.floor for gid, o in orders.items()}, orders, round_to)
    return plan_from_keep(coupling, keep_sets(orders, counts), {"method": "hierarchical", "criterion": criterion, "target": "limit", "round_to": round_to})


def latency_plan(om: OnnxModel, coupling: Coupling, analysis: Analysis | None, base: PlanOptions, value: float, runs: int) -> Plan:
    """Reach ``value`` x the original's onnxruntime latency by adjusting a MACs target (measured)."""
    from graphprune.backends.onnx import apply_plan, model_session
    from graphprune.execution.sessions import measure_latency, sample_inputs

    feeds = sample_inputs(om.graph, batch=1)

    def latency(model: Any) -> float:
        with model_session(model) as session:
            return measure_latency(session, feeds, runs=runs)

    original = latency(om.model)
    frac, best, fallback = value, None, None
    for step in range(LATENCY_STEPS):
        options = PlanOptions(**{**base.__dict__, "target": Target("macs", frac)})
        try:
            plan = make_plan(om.graph, coupling, options, analysis)
        except OverLimitError:
            if analysis is None or frac <= analysis.limit.at_limit.macs / analysis.limit.original.macs:
                raise
            frac = analysis.limit.at_limit.macs / analysis.limit.original.macs * (1 + 1e-9)
            continue
        ratio = latency(apply_plan(om, coupling, plan)) / original
        log.info("latency step %d: MACs target %.3f -> latency %.3f of the original", step, frac, ratio)
        fallback = plan
        if ratio <= value:
            best = plan
            if ratio >= 0.95 * value:
                break
        frac = float(np.clip(frac * value / max(ratio, 1e-6), 0.01, 0.99))
    if best is None and not base.allow_over_limit and analysis is not None:
        raise OverLimitError(
            f"latency {value:g} of the original was not reached without pruning past the effective filters "
            "(latency is measured: a busy machine makes it noisy); lower the target or pass --allow-over-limit"
        )
    plan = best or fallback
    assert plan is not None
    return plan


def plan_for(graph: ChannelGraph, coupling: Coupling, analysis: Analysis | None, options: Any, figures: dict[str, Any],
             om: OnnxModel | None = None) -> Plan:
    """The plan a plan pass asks for; records the target in ``figures``.

    A latency target is measured on onnxruntime, so it needs ``om`` (the ONNX model of ``graph``).
    """
    target = _target(options)
    base = PlanOptions(options.method, options.criterion, Target("macs", 0.5), options.round_to, options.allow_over_limit, options.seed)
    if target is None:
        if analysis is None or options.method != "hierarchical":
            raise BadInputError("give a target (ratio, macs, params or latency); only hierarchical pruning with an analysis defaults to the estimated limit")
        figures["target"] = "estimated maximum rate"
        return limit_plan(graph, coupling, analysis, options.criterion, options.round_to)
    figures["target"] = f"{target.kind} {target.value:g}"
    if target.kind == "latency":
        if om is None:
            raise BadInputError("a latency target is measured on onnxruntime: prune the ONNX model")
        if not 0.0 < target.value < 1.0:
            raise BadInputError(f"--latency must be in (0, 1), got {target.value}")
        return latency_plan(om, coupling, analysis, base, target.value, options.latency_runs)
    return make_plan(graph, coupling, PlanOptions(**{**base.__dict__, "target": target}), analysis)
