"""Rank and singularities of a group's gradient matrix F = G^T G / N (numpy only).

Effective filters are the numerical rank of F by spectral energy; the exact
(structural) deficit is split into the three singularities of Orhan & Pitkow:
elimination (a channel whose gradient is zero on every sample), overlap (two
channels with identical gradients up to scale) and linear dependence (a
channel whose gradient is a combination of others').
"""
from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "DEPENDENCE_TOL",
    "ELIMINATION_RTOL",
    "OVERLAP_TOL",
    "Singularities",
    "eigenvalues",
    "energy_rank",
    "singularities",
]

ELIMINATION_RTOL = 1e-10
"""A channel is eliminated when F_cc <= this times the group's largest F_dd."""
OVERLAP_TOL = 1e-8
"""Two channels overlap when 1 - |corr| <= this."""
DEPENDENCE_TOL = 1e-8
"""Correlation-matrix eigenvalues at or below this are linear dependences
(the residual variance fraction of a channel explained by the others)."""


@dataclasses.dataclass(frozen=True)
class Singularities:
    """Exact rank deficits of F, by kind."""

    elimination: int
    overlap: int
    linear_dependence: int

    @property
    def total(self) -> int:
        return self.elimination + self.overlap + self.linear_dependence


def eigenvalues(f: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix, descending, negatives clipped to 0."""
    vals = np.linalg.eigvalsh((f + f.T) / 2.0)[::-1]
    return np.clip(vals, 0.0, None)


def energy_rank(eigs: np.ndarray, eps: float, floor: float = 0.0) -> int:
    """Smallest r whose top eigenvalues hold at least 1 - eps of the energy.

    Eigenvalues at or below ``floor`` (absolute) never count. A zero spectrum
    has rank 0.
    """
    eigs = np.asarray(eigs, dtype=np.float64)
    useful = eigs[eigs > floor]
    total = float(useful.sum())
    if total <= 0.0:
        return 0
    cum = np.cumsum(useful)
    return int(np.searchsorted(cum, (1.0 - eps) * total - 1e-15 * total) + 1)


def _clusters(corr: np.ndarray, live: np.ndarray) -> list[list[int]]:
    """Channels grouped by |corr| ~ 1 (union-find over live channels)."""
    parent = {int(c): int(c) for c in live}

    def root(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    sub = np.abs(corr[np.ix_(live, live)])
    rows, cols = np.nonzero(np.triu(sub >= 1.0 - OVERLAP_TOL, k=1))
    for i, j in zip(rows, cols):
        a, b = root(int(live[i])), root(int(live[j]))
        if a != b:
            parent[max(a, b)] = min(a, b)
    out: dict[int, list[int]] = {}
    for c in parent:
        out.setdefault(root(c), []).append(c)
    return sorted(out.values())


def singularities(f: np.ndarray) -> Singularities:
    """Count eliminated, overlapping and linearly dependent channels of F."""
    diag = np.clip(np.diag(f), 0.0, None)
    if diag.size == 0 or diag.max() <= 0.0:
        return Singularities(int(diag.size), 0, 0)
    live = np.flatnonzero(diag > ELIMINATION_RTOL * diag.max())
    scale = np.sqrt(np.where(diag > 0, diag, 1.0))
    corr = f / np.outer(scale, scale)
    clusters = _clusters(corr, live)
    reps = np.array([c[0] for c in clusters], dtype=np.int64)
    r = corr[np.ix_(reps, reps)]
    vals = np.linalg.eigvalsh((r + r.T) / 2.0)
    dependent = int(np.sum(vals <= DEPENDENCE_TOL * max(1.0, float(vals.max()))))
    return Singularities(
        elimination=int(diag.size - live.size),
        overlap=int(live.size - reps.size),
        linear_dependence=dependent,
    )
