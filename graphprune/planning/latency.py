"""Planning against a latency model: milliseconds saved as the price's unit, fast channel counts, latency goals.

The latency model (:class:`~graphprune.analysis.latency.LatencyModel`, plain
data measured before planning) is an input like the analysis. Level 1 then
prices a removal by its predicted loss increase per predicted millisecond
saved (METHOD.md section 6, "Latency instead of MACs"), and each group's count
is snapped to one the tables show is fast (what ``--round-to 8`` guesses by
hand).

Example:
    >>> saving = ms_saving(lm)   # doctest: +SKIP
    >>> saving(keep, group_id)   # ms saved per channel removed from there   # doctest: +SKIP
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from graphprune.analysis.latency import LatencyModel

__all__ = ["Saving", "fast_candidates", "higher_fast", "lower_fast", "ms_saving", "resolve_objective", "snap_to_fast"]

log = logging.getLogger(__name__)

Saving = Callable[[Mapping[int, int], int], float]
"""``saving(keep, g)``: what removing one more channel of group ``g`` from ``keep`` saves, per channel."""

EPS_MS = 1e-9


def resolve_objective(objective: str, latency: LatencyModel | None) -> str:
    """``latency`` or ``macs`` (see :data:`~graphprune.planning.options.OBJECTIVES`): ``auto`` becomes latency when there is a latency model."""
    if objective == "auto":
        return "latency" if latency is not None else "macs"
    return objective


def fast_candidates(latency: LatencyModel, group_id: int, floor: int) -> tuple[int, ...]:
    """The group's fast counts at or above ``floor`` (its full size always is one)."""
    return tuple(k for k in latency.fast_counts(group_id) if k >= floor) or (latency.channels[group_id],)


def ms_saving(latency: LatencyModel) -> Saving:
    """Predicted ms saved per channel when group ``g`` goes down to its next lower tabulated count.

    A step to the next measured count, not one channel: between two table
    points the prediction is interpolated, and one channel can look slower
    (kernel blocking) where the step down is not.
    """
    def saving(keep: Mapping[int, int], g: int) -> float:
        k = keep[g]
        if g not in latency.counts:
            return EPS_MS
        lower = [c for c in latency.counts[g] if c < k]
        step = k - (lower[-1] if lower else k - 1)
        if k - step < 1:
            return EPS_MS
        return max(-latency.change(keep, g, k - step) / step, EPS_MS)

    return saving


def snap_to_fast(keep: Mapping[int, int], latency: LatencyModel, floors: Mapping[int, int]) -> dict[int, int]:
    """Each group's count moved to the nearest of its fast counts at or above its floor (ties: the larger)."""
    out = dict(keep)
    for g, k in keep.items():
        if g not in latency.channels:
            continue
        fast = fast_candidates(latency, g, floors.get(g, 1))
        out[g] = min(fast, key=lambda c: (abs(c - k), -c))
    return out


def lower_fast(keep: Mapping[int, int], latency: LatencyModel, floors: Mapping[int, int], g: int) -> int | None:
    """The next fast count below ``keep[g]`` (at or above the floor), or None."""
    below = [c for c in fast_candidates(latency, g, floors.get(g, 1)) if c < keep[g]]
    return below[-1] if below else None


def higher_fast(keep: Mapping[int, int], latency: LatencyModel, floors: Mapping[int, int], g: int) -> int | None:
    """The next fast count above ``keep[g]`` (at most the group's size), or None."""
    above = [c for c in fast_candidates(latency, g, floors.get(g, 1)) if c > keep[g]]
    return above[0] if above else None
