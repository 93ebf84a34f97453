"""The uniform planner: the same fraction of every group's channels.

:func:`uniform_counts` is the one rule of how many channels a group keeps at a
fraction; :func:`uniform_plan` applies it at a given fraction (the weakest
channels by a weight criterion go), and the ``uniform`` method of
:func:`graphprune.planning.hierarchical.make_plan` searches the fraction that
meets a MACs, parameter or channel target.

Example:
    >>> keep_count(10, 0.5), keep_count(10, 0.5, round_to=4), keep_count(3, 0.99)
    (5, 4, 1)
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError
from graphprune.ir.graph import ChannelGraph
from graphprune.ir.plan import Plan, plan_from_keep
from graphprune.planning.criteria import score_group

__all__ = ["keep_count", "uniform_counts", "uniform_plan"]


def keep_count(channels: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept when removing ``ratio`` of them, at least one, rounded to a multiple."""
    keep = max(1, channels - math.floor(ratio * channels + 1e-9))
    if round_to > 1:
        keep = max(round_to, round(keep / round_to) * round_to)
    return min(channels, keep)


def uniform_counts(coupling: Coupling, groups: Iterable[int], ratio: float, round_to: int = 1) -> dict[int, int]:
    """Channels each of ``groups`` (ids) keeps when ``ratio`` of every group goes (see :func:`keep_count`)."""
    return {gid: keep_count(coupling.by_id(gid).channels, ratio, round_to) for gid in groups}


def uniform_plan(
    graph: ChannelGraph,
    coupling: Coupling,
    ratio: float,
    criterion: str = "l1",
    round_to: int = 1,
    seed: int = 0,
) -> Plan:
    """Remove ``ratio`` of every prunable group's channels, the least important first.

    Args:
        graph: The model's channel graph (weights for the criterion).
        coupling: Its groups.
        ratio: Fraction of each group's channels to remove, in [0, 1).
        criterion: A weight criterion (:data:`graphprune.planning.options.MAGNITUDE_CRITERIA`).
        round_to: Kept counts are multiples of this.
        seed: Seed of the ``random`` criterion.

    Returns:
        The plan (groups keeping everything left out).

    Raises:
        BadInputError: For a ratio outside [0, 1), a bad round_to or an unknown criterion.
    """
    if not 0.0 <= ratio < 1.0:
        raise BadInputError(f"ratio must be in [0, 1), got {ratio}")
    if round_to < 1:
        raise BadInputError(f"--round-to must be at least 1, got {round_to}")
    keep: dict[int, np.ndarray] = {}
    for gid, k in uniform_counts(coupling, (g.id for g in coupling.prunable), ratio, round_to).items():
        group = coupling.by_id(gid)
        if k < group.channels:
            keep[gid] = np.argsort(-score_group(group, graph, criterion, seed), kind="stable")[:k]
    meta = {"method": "uniform", "ratio": ratio, "criterion": criterion, "round_to": round_to, "seed": seed}
    return plan_from_keep(coupling, keep, meta)
