"""Plans from a global target: hierarchical (paper), uniform and global baselines.

Level 1 (how many channels each group keeps) and level 2 (which ones) of
METHOD.md section 2, step 5:

- ``hierarchical``: greedy across groups by least predicted loss per unit
  saved (MACs, parameters or channels), never below a group's effective
  filters r_g; a target beyond the estimated maximum is an
  :class:`~graphprune.errors.OverLimitError` unless over-limit is allowed, and
  then the excess goes past the floors by predicted loss alone, cheapest
  first (the calibrated limit's budget family), or per unit saved
  (``PlanOptions.excess``; the pipeline's plan pass measures both on held-out
  samples by default). Past the floors the predicted losses stop adding up,
  and each rule fails somewhere: per unit it cut the groups whose channels
  save the most at any loss (MobileNetV2 at 2x fewer MACs before
  fine-tuning: 0.752 against 0.878 by loss), by loss it emptied a character
  LM's feed-forward layers (perplexity 14.3 against 9.8 per unit).
- ``uniform``: the same fraction of every group (bisection on that fraction).
- ``global``: greedy across groups by the criterion's score alone, no limit.

Within a group the removal order comes from the criterion: ``effective``
(greedy second-order with cross terms), ``cholesky`` (pivoted Cholesky on
F), ``taylor`` (Fisher diagonal, squared first-order Taylor), ``l1``, ``l2``,
``random``.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping

import numpy as np

from graphprune.analysis.cost import Cost, cost_with_keep
from graphprune.analysis.effective import Analysis
from graphprune.analysis.latency import LatencyModel
from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError, OverLimitError
from graphprune.ir.graph import ChannelGraph
from graphprune.ir.plan import Plan, plan_from_keep
from graphprune.planning.criteria import score_group
from graphprune.planning.latency import EPS_MS, Saving, higher_fast, lower_fast, ms_saving, resolve_objective, snap_to_fast
from graphprune.planning.options import NEEDS_ANALYSIS, PlanOptions, Target
from graphprune.planning.selection import greedy_drop_order, pivoted_cholesky_order
from graphprune.planning.uniform import uniform_counts

__all__ = ["GroupOrder", "keep_sets", "make_plan", "metric", "removal_orders", "round_counts", "value_of"]

REFRESH = 16
"""Steps of ``_rounded_to_goal`` between two full re-measurements of what each group saves."""


def _check(options: PlanOptions, analysis: Analysis | None, latency: LatencyModel | None) -> Target:
    """The options' target (latency only with a latency model), checked against the analysis at hand."""
    options.check()
    target = options.target
    if target is None or (target.kind == "latency" and latency is None):
        raise BadInputError("make_plan needs a ratio, macs or params target, or a latency target and a latency model "
                            "(measured latency targets: graphprune.planning.targets.plan_for)")
    if resolve_objective(options.objective, latency) == "latency" and latency is None:
        raise BadInputError("objective 'latency' needs a latency model (run the profile pass before plan)")
    if analysis is None and options.needs_analysis:
        raise BadInputError(f"--method {options.method} --criterion {options.criterion} needs an analysis (calibration data)")
    return target


@dataclasses.dataclass(frozen=True)
class GroupOrder:
    """A group's channels in removal order, the cost of each removal, and its floor."""

    group: int
    order: np.ndarray
    step_cost: np.ndarray
    floor: int


def _order_for(gid: int, coupling: Coupling, graph: ChannelGraph, criterion: str, analysis: Analysis | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    group = coupling.by_id(gid)
    if criterion in NEEDS_ANALYSIS:
        assert analysis is not None
        f = analysis.fisher[gid].f
        if criterion == "effective":
            drop = greedy_drop_order(f)
            return drop.order, np.diff(drop.cost)
        order = pivoted_cholesky_order(f) if criterion == "cholesky" else np.argsort(np.diag(f), kind="stable")
        sub = f[np.ix_(order, order)]
        # removing order[k] after order[:k] adds F_kk / 2 + sum_{d < k} F_kd to the predicted loss
        return order, 0.5 * np.diag(sub) + np.tril(sub, -1).sum(1)
    scores = score_group(group, graph, criterion, seed)
    order = np.argsort(scores, kind="stable")
    return order, scores[order] / max(float(scores.mean()), 1e-30)


def removal_orders(
    coupling: Coupling, graph: ChannelGraph, options: PlanOptions, analysis: Analysis | None
) -> dict[int, GroupOrder]:
    """Level 2 for every plannable group (analysed groups when an analysis is given)."""
    by_group = analysis.by_group() if analysis is not None else {}
    gids = [g.id for g in coupling.prunable if analysis is None or g.id in by_group]
    out: dict[int, GroupOrder] = {}
    for gid in gids:
        order, step = _order_for(gid, coupling, graph, options.criterion, analysis, options.seed)
        limit = by_group[gid].effective if (gid in by_group and options.method == "hierarchical") else 1
        out[gid] = GroupOrder(gid, order, np.maximum(step, 0.0), max(1, limit))
    return out


def metric(cost: Cost, kind: str, kept_channels: int) -> float:
    return {"macs": cost.macs, "params": cost.params, "ratio": kept_channels}[kind]


Value = Callable[[Mapping[int, int]], float]
"""What the target measures for a keep (MACs, parameters, channels or predicted ms)."""


def value_of(graph: ChannelGraph, coupling: Coupling, kind: str, latency: LatencyModel | None) -> Value:
    """The quantity a target of ``kind`` counts, as a function of the counts kept (predicted ms for latency)."""
    if kind == "latency":
        assert latency is not None
        return latency.predict
    if kind == "ratio":
        return lambda keep: float(sum(keep.values()))
    return lambda keep: metric(cost_with_keep(graph, coupling, keep), kind, sum(keep.values()))


def round_counts(keep: Mapping[int, int], orders: Mapping[int, GroupOrder], n: int) -> dict[int, int]:
    """Channel counts rounded up to multiples of ``n``, never below a group's floor nor above its size."""
    if n <= 1:
        return dict(keep)
    return {gid: min(orders[gid].order.size, max(orders[gid].floor, math.ceil(k / n) * n)) for gid, k in keep.items()}


def keep_sets(orders: Mapping[int, GroupOrder], counts: Mapping[int, int]) -> dict[int, np.ndarray]:
    """Level 2: the last ``counts[g]`` channels of each group's removal order, sorted."""
    return {gid: np.sort(orders[gid].order[orders[gid].order.size - k:]) for gid, k in counts.items()}


def _greedy(coupling: Coupling, orders: Mapping[int, GroupOrder], goal: float, value: Value,
            floors: Mapping[int, int], per_unit: bool, start: Mapping[int, int] | None = None,
            priced: Saving | None = None) -> tuple[dict[int, int], bool]:
    """Remove channels, cheapest predicted loss per unit saved first, until ``value(keep) <= goal``.

    ``priced``: the unit of the price's saving when it is not the target's own (predicted ms).
    """
    keep = dict(start) if start else {gid: coupling.by_id(gid).channels for gid in orders}
    chunk = max(1, sum(coupling.by_id(g).channels for g in orders) // 200)
    while True:
        now = value(keep)
        if now <= goal:
            return keep, True
        live = [g for g in orders if keep[g] > floors[g]]
        if not live:
            return keep, False
        saving: dict[int, float] = {}
        for g in live:
            trial = dict(keep)
            trial[g] -= 1
            saving[g] = max(now - value(trial), 1e-12)
        unit = saving if priced is None else {g: priced(keep, g) for g in live}
        est = now
        for _ in range(chunk):
            cands = [g for g in live if keep[g] > floors[g]]
            if not cands or est <= goal:
                break
            def price(g: int, unit: Mapping[int, float] = unit) -> float:
                o = orders[g]
                step = o.step_cost[o.order.size - keep[g]]
                return step / unit[g] if per_unit else step
            best = min(cands, key=price)
            keep[best] -= 1
            est -= saving[best]


def _rounded_to_goal(orders: Mapping[int, GroupOrder], keep: Mapping[int, int], goal: float,
                     value: Value, n: int, per_unit: bool, floors: Mapping[int, int]) -> dict[int, int]:
    """Rounding up overshoots the target: remove ``n`` channels at a time, cheapest first, until it is met again.

    What ``n`` channels of a group save is measured once per group, then again only for the group
    just cut (and for all every ``REFRESH`` steps): a neighbour's cut changes it only slightly.
    """
    keep = dict(keep)
    if n <= 1:
        return keep
    saved: dict[int, float] = {}

    def saving(g: int, now: float) -> float:
        trial = dict(keep)
        trial[g] -= n
        return max(now - value(trial), 1e-12)

    for step in itertools.count():
        now = value(keep)
        live = [g for g in orders if keep[g] - n >= max(floors[g], 1)]
        if now <= goal or not live:
            return keep
        if step % REFRESH == 0:
            saved.clear()

        def price(g: int, now: float = now) -> float:
            o = orders[g]
            done = o.order.size - keep[g]
            cost = float(np.sum(o.step_cost[done:done + n]))
            if not per_unit:
                return cost
            if g not in saved:
                saved[g] = saving(g, now)
            return cost / saved[g]

        best = min(live, key=price)
        keep[best] -= n
        saved.pop(best, None)
    raise AssertionError("unreachable")


def _rounded_given_back(orders: Mapping[int, GroupOrder], keep: Mapping[int, int], goal: float, value: Value, n: int,
                        per_unit: bool) -> dict[int, int]:
    """Whole steps of ``n`` overshoot the goal (a step of 8 in a 16-channel group is half of it): move groups back up
    ``n`` channels at a time (to at most their size), the most predicted loss restored per unit of the target added
    first, while the goal still holds."""
    keep = dict(keep)
    if n <= 1:
        return keep
    while True:
        now = value(keep)
        ups: dict[int, tuple[int, float]] = {}
        for g, o in orders.items():
            up = min(keep[g] + n, o.order.size)
            if up > keep[g] and (v := value({**keep, g: up})) <= goal:
                ups[g] = (up, max(v - now, 1e-12))

        def gain(g: int, ups: Mapping[int, tuple[int, float]] = ups) -> float:
            o, (up, added) = orders[g], ups[g]
            restored = float(np.sum(o.step_cost[o.order.size - up:o.order.size - keep[g]]))
            return restored / added if per_unit else restored

        if not ups:
            return keep
        best = max(ups, key=gain)
        keep[best] = ups[best][0]


def _uniform(coupling: Coupling, orders: Mapping[int, GroupOrder], goal: float, value: Value, round_to: int) -> dict[int, int]:
    def keep_at(ratio: float) -> dict[int, int]:
        return uniform_counts(coupling, orders, ratio, round_to)

    lo, hi = 0.0, 0.999
    for _ in range(40):
        mid = (lo + hi) / 2
        k = keep_at(mid)
        if value(k) <= goal:
            hi = mid
        else:
            lo = mid
    return keep_at(hi)


def _snapped_to_goal(keep: Mapping[int, int], orders: Mapping[int, GroupOrder], goal: float, value: Value,
                     latency: LatencyModel, floors: Mapping[int, int], per_unit: bool) -> dict[int, int] | None:
    """Counts snapped to fast ones, then groups moved down a fast count at a time (cheapest per ms) until the goal holds again.

    Returns None when the goal cannot be met with fast counts within the floors.
    """
    keep = snap_to_fast(keep, latency, floors)
    saving = ms_saving(latency)
    while value(keep) > goal:
        steps = {g: low for g in orders if (low := lower_fast(keep, latency, floors, g)) is not None}
        if not steps:
            return None

        def price(g: int, steps: Mapping[int, int] = steps) -> float:
            o = orders[g]
            done = o.order.size - keep[g]
            cost = float(np.sum(o.step_cost[done:o.order.size - steps[g]]))
            return cost / (saving(keep, g) * (keep[g] - steps[g])) if per_unit else cost

        best = min(steps, key=price)
        keep[best] = steps[best]
    return _given_back(keep, orders, goal, value, latency, floors)


def _given_back(keep: dict[int, int], orders: Mapping[int, GroupOrder], goal: float, value: Value,
                latency: LatencyModel, floors: Mapping[int, int]) -> dict[int, int]:
    """Snapping and whole fast-count steps overshoot the goal: move groups back up a fast count at a time,
    the most predicted loss restored per predicted ms added first, while the goal still holds."""
    while True:
        ups = {g: up for g in orders if (up := higher_fast(keep, latency, floors, g)) is not None
               and value({**keep, g: up}) <= goal}
        if not ups:
            return keep

        def gain(g: int, ups: Mapping[int, int] = ups) -> float:
            o = orders[g]
            restored = float(np.sum(o.step_cost[o.order.size - ups[g]:o.order.size - keep[g]]))
            return restored / max(latency.change(keep, g, ups[g]), EPS_MS)

        best = max(ups, key=gain)
        keep[best] = ups[best]


def _change(kind: str, fraction: float) -> str:
    """``fraction`` of the original as a change: '2.00x fewer' MACs or params, '1.10x faster' or '1.10x slower'."""
    if kind != "latency":
        return f"{1 / fraction:.2f}x fewer"
    from graphprune.report.prune import speed_change  # the one wording of speed changes (lazy: report sits above planning)

    return speed_change(1.0, fraction)


def make_plan(graph: ChannelGraph, coupling: Coupling, options: PlanOptions, analysis: Analysis | None = None,
              latency: LatencyModel | None = None) -> Plan:
    """Plan to reach ``options.target``.

    Args:
        graph: The model's channel graph.
        coupling: Its groups.
        options: Method, criterion, target, objective, rounding.
        analysis: The effective filter analysis (hierarchical method, analysis criteria).
        latency: The latency model of the model's runtime: with it, level 1 prices by predicted ms saved
            (objective ``auto`` or ``latency``), counts snap to fast ones unless ``round_to`` > 1, and a
            latency target is planned against its prediction.

    Raises:
        BadInputError: Bad options, or an analysis needed but missing.
        OverLimitError: Hierarchical target beyond the estimated maximum (unless allowed).
    """
    target = _check(options, analysis, latency)
    orders = removal_orders(coupling, graph, options, analysis)
    if not orders:
        raise BadInputError("no prunable group to plan (every group is frozen or could not be analysed)")
    kind = target.kind
    objective = resolve_objective(options.objective, latency)
    value = value_of(graph, coupling, kind, latency)
    full = {g: coupling.by_id(g).channels for g in orders}
    original = latency.original_ms if kind == "latency" and latency is not None else value(full)
    goal = original * (1.0 - target.value) if kind == "ratio" else original * target.value
    meta: dict[str, object] = {"method": options.method, "criterion": options.criterion, "target": dataclasses.asdict(target),
                               "round_to": options.round_to, "seed": options.seed, "objective": objective}
    priced = ms_saving(latency) if objective == "latency" and latency is not None else None
    if options.method == "uniform":
        keep = _uniform(coupling, orders, goal, value, options.round_to)
    else:
        floors = {g: o.floor for g, o in orders.items()}
        per_unit = options.method == "hierarchical"
        keep, reached = _greedy(coupling, orders, goal, value, floors, per_unit, priced=priced)
        if not reached and options.method == "hierarchical":
            best = value(keep) / original
            limit = f"{1 - best:.3f} of the channels removed" if kind == "ratio" else f"{best:.3f} of the original {kind} ({_change(kind, best)})"
            if not options.allow_over_limit:
                raise OverLimitError(
                    f"the target is beyond the estimated maximum compression: at most {limit} without pruning past "
                    "any group's effective filters; lower the target, raise --eps when analysing, or pass --allow-over-limit"
                )
            # past the floors: cheapest predicted loss first (the limit's budget family), or per unit saved
            excess_per_unit = options.excess == "per_unit"
            keep, reached = _greedy(coupling, orders, goal, value, {g: 1 for g in orders}, excess_per_unit, keep, priced)
            meta["over_limit"] = True
            meta["excess"] = "per_unit" if excess_per_unit else "loss"
        if not reached:
            tables = (" as the latency tables predict it (they cover each group from its effective filters up "
                      "unless profiled with below_floors, which --allow-over-limit sets)") if kind == "latency" else ""
            raise BadInputError(f"the target cannot be reached even keeping one channel per group ({kind}){tables}")
        ones = {g: 1 for g in orders}
        used = ones if meta.get("over_limit") else floors
        if options.round_to == 1 and latency is not None:
            snapped = _snapped_to_goal(keep, orders, goal, value, latency, used, per_unit)
            meta["fast_counts"] = snapped is not None
            keep = snapped if snapped is not None else keep
        keep = round_counts(keep, orders, options.round_to)
        keep = _rounded_to_goal(orders, keep, goal, value, options.round_to, per_unit, used)
        if value(keep) <= goal:
            keep = _rounded_given_back(orders, keep, goal, value, options.round_to, per_unit)
        if value(keep) > goal:
            if options.method == "hierarchical" and not options.allow_over_limit:
                raise OverLimitError(
                    f"with --round-to {options.round_to} the target is beyond the estimated maximum compression "
                    "(channel counts rounded up stay at or above every group's effective filters); lower the target "
                    "or --round-to, or pass --allow-over-limit"
                )
            keep = _rounded_to_goal(orders, keep, goal, value, options.round_to, per_unit, ones)
            if options.method == "hierarchical":
                meta["over_limit"] = True
            if value(keep) > goal:
                raise BadInputError(f"the target cannot be reached with --round-to {options.round_to} ({kind}): "
                                    f"counts at multiples of {options.round_to} keep {value(keep) / original:.3f} "
                                    "of the original; lower --round-to")
    meta["target_kept"] = value(keep) / original
    if latency is not None:
        meta["predicted_ms"] = latency.predict({g: k for g, k in keep.items() if g in latency.channels})
        meta["original_predicted_ms"] = latency.original_ms
    return plan_from_keep(coupling, keep_sets(orders, keep), meta)
