"""Channel importance scores for one group (higher = more important)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graphprune.coupling.groups import Group
from graphprune.errors import BadInputError
from graphprune.ir.graph import ChannelGraph
from graphprune.planning.options import MAGNITUDE_CRITERIA

__all__ = ["CRITERIA", "score_group"]


def _magnitude(group: Group, graph: ChannelGraph, power: int) -> np.ndarray:
    """Sum over the group's weights of each channel's L1 (or squared L2) norm.

    Each weight's norms are divided by their mean so that a large tensor does
    not drown the others (as in group-norm criteria).
    """
    total = np.zeros(group.channels)
    for m in group.params():
        w = graph.const(m.tensor)
        if w is None or w.size == 0:
            continue
        flat = np.moveaxis(np.abs(w.astype(np.float64)) ** power, m.axis, 0).reshape(w.shape[m.axis], -1).sum(1)
        per_channel = flat[m.indices].sum(1)
        mean = per_channel.mean()
        total += per_channel / mean if mean > 0 else per_channel
    return total


def _l1(group: Group, graph: ChannelGraph, _seed: int) -> np.ndarray:
    return _magnitude(group, graph, 1)


def _l2(group: Group, graph: ChannelGraph, _seed: int) -> np.ndarray:
    return _magnitude(group, graph, 2)


def _random(group: Group, _graph: ChannelGraph, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, group.id])
    return rng.random(group.channels)


CRITERIA: dict[str, Callable[[Group, ChannelGraph, int], np.ndarray]] = dict(zip(MAGNITUDE_CRITERIA, (_l1, _l2, _random)))
"""Scorer of each weight criterion, by the names of :data:`graphprune.planning.options.MAGNITUDE_CRITERIA`."""


def score_group(group: Group, graph: ChannelGraph, criterion: str, seed: int = 0) -> np.ndarray:
    """Importance of each channel of ``group``.

    Raises:
        BadInputError: For an unknown criterion.
    """
    if criterion not in CRITERIA:
        raise BadInputError(f"unknown criterion '{criterion}' (choose from {', '.join(CRITERIA)})")
    return CRITERIA[criterion](group, graph, seed)
