"""Which channels of a group to drop: the second-order (Taylor) error with cross terms.

Removing a set R of a group's channels (gates a_R from 1 to 0) changes the loss
by about ``g_R . 1 + 1/2 1_R^T F_RR 1_R``; at a trained minimum the first-order
term is near zero. The greedy rule removes, one at a time, the channel whose
marginal cost ``F_cc / 2 + sum_{d in R} F_cd`` is least, so duplicated and
linearly dependent channels go first (METHOD.md section 2, step 5).
"""
from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["DropOrder", "drop_cost", "greedy_drop_order", "keep_set", "pivoted_cholesky_order"]


@dataclasses.dataclass(frozen=True)
class DropOrder:
    """Channels in the order the greedy rule removes them.

    Attributes:
        order: Channel indices, first removed first (all C of them).
        cost: ``cost[k]`` is the predicted loss increase after removing the
            first ``k`` channels of ``order`` (``cost[0] == 0``; C + 1 values).
    """

    order: np.ndarray
    cost: np.ndarray

    def keep(self, k: int) -> np.ndarray:
        """Sorted indices of the ``k`` channels kept."""
        c = self.order.size
        if not 0 <= k <= c:
            raise ValueError(f"cannot keep {k} of {c} channels")
        return np.sort(self.order[c - k:])


def drop_cost(f: np.ndarray, removed: np.ndarray, grad: np.ndarray | None = None) -> float:
    """Second-order predicted loss increase ``1/2 1_R^T F_RR 1_R`` (minus g_R . 1)."""
    r = np.asarray(removed, dtype=np.int64)
    cost = 0.5 * float(f[np.ix_(r, r)].sum())
    if grad is not None:
        cost -= float(np.asarray(grad)[r].sum())
    return cost


def greedy_drop_order(f: np.ndarray, grad: np.ndarray | None = None) -> DropOrder:
    """Greedy removal order minimising the second-order error (O(C^2)).

    Args:
        f: The group's F (C x C, symmetric PSD).
        grad: Optional mean gradient of the loss w.r.t. the gates (first-order
            term; removing channel c changes the loss by ``-grad[c]`` to first order).
    """
    c = f.shape[0]
    diag = np.diag(f).astype(np.float64)
    first = -np.asarray(grad, dtype=np.float64) if grad is not None else np.zeros(c)
    marginal = 0.5 * diag + first
    removed = np.zeros(c, dtype=bool)
    order = np.empty(c, dtype=np.int64)
    cost = np.zeros(c + 1)
    for k in range(c):
        cand = np.where(removed, np.inf, marginal)
        j = int(np.argmin(cand))
        order[k] = j
        cost[k + 1] = cost[k] + marginal[j]
        removed[j] = True
        marginal = marginal + f[:, j]
    return DropOrder(order, cost)


def keep_set(f: np.ndarray, k: int, grad: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the ``k`` channels the greedy rule keeps."""
    return greedy_drop_order(f, grad).keep(k)


def pivoted_cholesky_order(f: np.ndarray) -> np.ndarray:
    """Removal order from pivoted Cholesky on F: the last pivots go first.

    The pivots are the channels that explain most of F's remaining diagonal;
    the channels picked last add least new curvature (METHOD.md's alternative).
    """
    c = f.shape[0]
    residual = np.diag(f).astype(np.float64).copy()
    basis = np.zeros((c, c))
    picked: list[int] = []
    free = np.ones(c, dtype=bool)
    for k in range(c):
        j = int(np.argmax(np.where(free, residual, -np.inf)))
        picked.append(j)
        free[j] = False
        pivot = residual[j]
        if pivot <= 1e-300:
            picked += [int(i) for i in np.flatnonzero(free)]
            break
        col = (f[:, j] - basis[:, :k] @ basis[j, :k]) / np.sqrt(pivot)
        basis[:, k] = col
        residual = np.clip(residual - col**2, 0.0, None)
    return np.array(picked[::-1], dtype=np.int64)
