"""The calibrated limit: the largest MACs reduction whose quality stays within a tolerance of the original's.

Meaning (issue 16): with **no fine-tuning**, after compensation and statistics
repair, the quality (accuracy with labels, else top-1 agreement with the
original) on **held-out calibration data** stays within ``tolerance`` of the
original's. Channels are removed across all groups, cheapest predicted loss
increase first, under one network-wide predicted-loss budget
(:func:`graphprune.analysis.effective.budget_removals`); the per-group counts
at a budget are the effective filters at that budget.

- The **spectral estimate** is the reduction at the budget the spectra alone
  predict: ``SPECTRAL_NATS_PER_TOLERANCE * tolerance`` nats of predicted loss.
- The **calibrated limit** comes from a few measured points (each one plan,
  compensation, rewrite, repair and evaluation): the budget is bracketed by
  steps of ``STEP`` from ``START`` times the spectral budget, then narrowed
  where the quality, interpolated in log budget between the bracket's points,
  crosses the threshold (safeguarded: always inside the bracket's middle half).
- A point passes when its drop holds at the options' one-sided
  ``confidence``: the measured drop plus ``z`` standard errors of the drop,
  paired sample by sample with the original on the same held-out samples
  (:func:`paired_margin`), is within the tolerance; 0.5 is the measured drop
  alone. Points score the held-out samples stratified by how sure the
  original is of each (:class:`Strata`), and stop once the drop is decided
  or as precise as scoring them all would make it. The default
  (:func:`default_confidence`) is 0.8 on held-out data
  the model never saw: on 4,096 samples a drop near 1 pp has a standard
  error of about 0.2-0.3 pp, and the search keeps the largest budget that
  passed, where noise in its favour is likeliest (at 0.5 two of the four
  benchmark models lost 1.3-1.4 pp on the test split at their limits). On
  calibration samples the model was trained on it is 0.5: those lose more
  to pruning than unseen images (0.1-0.8 pp more at the limit on three of
  four models), a margin already, and one more moved the limit 20-47% below
  the knee (benchmarks/README.md, "the limit's confidence").
- The **fine-tuned limit** is estimated from the same curve: a brief
  fine-tune of E epochs is modelled as leaving ``remaining(E)`` of the
  accuracy drop, so quality holds where the no-fine-tune drop is at most
  ``tolerance / remaining(E)``.

This module is plain data and the search; the measuring lives in
:mod:`graphprune.pipeline.limit` (it runs the recovery passes).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from graphprune.analysis.cost import cost_with_keep
from graphprune.analysis.effective import Analysis, NetworkLimit
from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError
from graphprune.ir.graph import ChannelGraph

__all__ = [
    "FINETUNE_REMAINING_AT_ONE_EPOCH",
    "FINETUNE_REMAINING_EXPONENT",
    "SPECTRAL_NATS_PER_TOLERANCE",
    "CalibratedLimit",
    "CalibrationPoint",
    "FineTunedLimit",
    "LimitOptions",
    "Strata",
    "default_confidence",
    "expected_line",
    "factor_to_drop",
    "finetuned_limit",
    "floored",
    "full_standard_error",
    "measured_curve",
    "paired_drop",
    "paired_margin",
    "paired_standard_error",
    "remaining_after",
    "search",
    "stratified_order",
]

SPECTRAL_NATS_PER_TOLERANCE = 1.0
"""The spectral budget in nats of predicted loss per unit of tolerance: 1 pp of accuracy ~ 0.01 nats
(benchmarks/calibration.json: ResNet-20, budget 0.01 cost 1.0 pp with no compensation nor repair)."""
FINETUNE_REMAINING_AT_ONE_EPOCH = 0.274
"""Fraction of the no-fine-tune accuracy drop left after one epoch of fine-tuning: ``remaining(0.25) = 0.82`` as
fitted on ResNet-20 after the sequential refit (benchmarks/limit.json, 2026-12-03: the no-fine-tune drop at the
measured fine-tuned knee, 2.25x, is 1.22 pp), carried to one epoch by the exponent below. The refit leaves a brief
fine-tune little to recover near the knee (the earlier recovery's 0.27 at a quarter epoch overshot by 20-53%)."""
FINETUNE_REMAINING_EXPONENT = 0.79
"""remaining(E) = 0.274 E^-0.79 (the exponent from earlier ResNet-20 measurements at one and a quarter epoch)."""
STEP = 4.0
"""Factor between two budgets while bracketing the limit."""
START = STEP
"""The first point's budget over the spectral one. With compensation and repair every benchmark model's limit lay
5-10x above the spectral budget in nats, and a first point at the spectral budget passed on all four
(benchmarks/limit.json, 2026-12-07): it is measured only when the first point fails (the bracket's lower end then
comes down by ``STEP``)."""
RESOLUTION = 1.05
"""The search stops when the failing and passing reductions are within this factor."""
INTERPOLATION_CLAMP = 0.25
"""Each interpolated budget lies at least this fraction of the bracket (in log budget) from either end."""
PRIOR_EXPONENT = 1.5
"""The drop taken to grow as the budget to this power when the bracket extrapolates from one point: between budgets
0.04 and 0.16 it grew as the power 1.47 / 1.52 / 1.65 on ResNet-20 / ``vgg16s`` / MobileNetV2 (benchmarks/limit.json,
2026-12-07) and 1.37 on the demo's ResNet-20."""
REACH_OVERSHOOT = 1.5
"""A point meant to show a drop (the fine-tuned estimate's) aims this much past it: the exponent varies by model."""
MIN_LOG_DROP = 0.2
"""Interpolate in log drop only where the smaller drop is at least this fraction of the allowed one (noise below)."""
EXTRA_FINETUNE_POINTS = 2
"""Points measured beyond ``points`` to reach the drop the fine-tuned estimate needs."""
HELD_OUT_CONFIDENCE = 0.8
"""The default confidence on held-out data the model never saw (``--held-out``)."""
CALIBRATION_CONFIDENCE = 0.5
"""The default confidence on calibration samples (possibly trained on): their larger drops are a margin already."""
FRAGILE_SHARE = 0.25
"""The share of held-out samples the original is least sure of that form the fragile stratum (:class:`Strata`)."""
FRAGILE_RATE = 0.75
"""The share of fragile samples among the first ones a point scores, until they run out."""
MIN_STRATUM = 64
"""Fewer held-out samples than twice this: one stratum."""


@dataclasses.dataclass(frozen=True)
class LimitOptions:
    """What the limit means and what measuring it may cost.

    Attributes:
        tolerance: Quality may drop by at most this (0.01: 1 pp of accuracy or agreement).
        points: Most measured points of the no-fine-tune search.
        holdout: Most held-out samples a point is scored on (of the held-out data when given, else of the
            calibration samples the analysis and compensation leave); a point whose drop is clearly on one side of
            the tolerance stops after :data:`graphprune.pipeline.limit.SCORING_STEP` of them.
        finetune_epochs: When > 0, also estimate the limit after this brief fine-tune.
        confidence: One-sided confidence that a passing point's drop is within the tolerance (0.5: the measured drop
            alone; 0: :func:`default_confidence`, by where the held-out samples come from).
    """

    tolerance: float = 0.01
    points: int = 6
    holdout: int = 4096
    finetune_epochs: float = 0.0
    confidence: float = 0.0

    def check(self) -> None:
        """Raises BadInputError on out-of-range values."""
        if not 0.0 < self.tolerance < 1.0:
            raise BadInputError(f"--tolerance must be in (0, 1) (a fraction: 0.01 is 1 pp), got {self.tolerance}")
        if self.points < 2:
            raise BadInputError(f"limit points must be at least 2, got {self.points}")
        if self.holdout < 16:
            raise BadInputError(f"limit holdout must be at least 16 samples, got {self.holdout}")
        if self.finetune_epochs < 0:
            raise BadInputError(f"limit finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if not (0.5 <= self.confidence < 1.0 or self.confidence == 0.0):
            raise BadInputError(f"limit confidence must be in [0.5, 1) (0.5: the measured drop alone; 0: the default), "
                                f"got {self.confidence}")


@dataclasses.dataclass(frozen=True)
class CalibrationPoint:
    """One measured point of the curve: a budget, what it removes, and the quality after recovery."""

    budget: float
    macs_reduction: float
    params_reduction: float
    predicted_loss: float
    quality: float
    seconds: float = 0.0
    margin: float = 0.0
    """``z`` standard errors of the drop (paired with the original): the point passes when ``quality - margin`` does."""
    samples: int = 0
    """Held-out samples scored (0: every one). A point clearly on one side of the pass line stops early; its
    ``quality`` is then the base quality less the drop paired with the original on the samples scored."""

    @property
    def bound(self) -> float:
        """The quality the point holds at the search's confidence."""
        return self.quality - self.margin


@dataclasses.dataclass(frozen=True)
class FineTunedLimit:
    """The limit after a brief fine-tune, estimated from the no-fine-tune curve.

    ``bounded``: the curve never dropped far enough, so the value is a lower bound (the largest measured reduction).
    """

    epochs: float
    remaining: float
    macs_reduction: float
    bounded: bool


@dataclasses.dataclass(frozen=True)
class CalibratedLimit:
    """The calibrated limit, the spectral estimate it corrects, and the measured curve behind it.

    Attributes:
        metric: ``accuracy`` (labels) or ``agreement`` (top-1 agreement with the original).
        tolerance: The allowed drop.
        base_quality: The original's quality on the held-out samples.
        holdout: How many held-out samples.
        spectral_budget, spectral_macs_reduction: The spectra's prediction.
        budget, macs_reduction, params_reduction, quality: The calibrated limit (quality measured there).
        effective: Per-group effective filters at the calibrated budget (the plan's floors).
        points: Every measured point, in measuring order.
        finetuned: The limit after a brief fine-tune, or None.
        seconds: Time spent measuring.
        analysis_seconds: Time the effective filter analysis took (0: unknown), for the cost ratio.
    """

    metric: str
    tolerance: float
    base_quality: float
    holdout: int
    spectral_budget: float
    spectral_macs_reduction: float
    budget: float
    macs_reduction: float
    params_reduction: float
    quality: float
    effective: Mapping[int, int]
    points: tuple[CalibrationPoint, ...]
    finetuned: FineTunedLimit | None = None
    seconds: float = 0.0
    analysis_seconds: float = 0.0
    confidence: float = 0.5
    margin: float = 0.0

    @property
    def threshold(self) -> float:
        return self.base_quality - self.tolerance

    @property
    def gap(self) -> float:
        """Calibrated over spectral reduction (2.0: the spectra predicted half the reduction)."""
        return self.macs_reduction / max(self.spectral_macs_reduction, 1e-12)

    def curve(self) -> list[tuple[float, float]]:
        """(MACs reduction, quality) from the original (1.0, base) on: see :func:`measured_curve`."""
        return measured_curve(self.base_quality, self.points)

    def expected_quality(self, macs_reduction: float) -> tuple[float, bool]:
        """Quality the measured curve expects at ``macs_reduction`` (interpolated in log reduction).

        Returns (value, beyond): ``beyond`` when the reduction is past every measured point (the value is then
        the last measured quality, an upper bound).
        """
        curve = self.curve()
        if macs_reduction <= curve[0][0]:
            return curve[0][1], False
        for (x0, q0), (x1, q1) in itertools.pairwise(curve):
            if macs_reduction <= x1:
                t = math.log(macs_reduction / x0) / max(math.log(x1 / x0), 1e-12)
                return q0 + t * (q1 - q0), False
        return curve[-1][1], True

    @property
    def scored(self) -> int:
        """The most held-out samples one point scored, when every point stopped early (0 otherwise)."""
        most = max((p.samples for p in self.points), default=0)
        return most if 0 < most < self.holdout and all(p.samples for p in self.points) else 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["effective"] = {str(k): int(v) for k, v in sorted(self.effective.items())}
        d["gap"] = self.gap
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibratedLimit:
        ft = d.get("finetuned")
        return cls(
            metric=str(d["metric"]), tolerance=float(d["tolerance"]), base_quality=float(d["base_quality"]),
            holdout=int(d["holdout"]), spectral_budget=float(d["spectral_budget"]),
            spectral_macs_reduction=float(d["spectral_macs_reduction"]), budget=float(d["budget"]),
            macs_reduction=float(d["macs_reduction"]), params_reduction=float(d["params_reduction"]),
            quality=float(d["quality"]), effective={int(k): int(v) for k, v in d["effective"].items()},
            points=tuple(CalibrationPoint(**p) for p in d["points"]),
            finetuned=FineTunedLimit(**ft) if ft else None, seconds=float(d.get("seconds", 0.0)),
            analysis_seconds=float(d.get("analysis_seconds", 0.0)), confidence=float(d.get("confidence", 0.5)),
            margin=float(d.get("margin", 0.0)),
        )

    def lines(self) -> list[str]:
        """What a person reads: both numbers, how far apart, how they were measured."""
        pp = 100 * self.tolerance
        out = [
            f"spectral estimate (predicted loss budget {self.spectral_budget:.3g}): {self.spectral_macs_reduction:.2f}x fewer MACs",
            f"calibrated limit ({self.metric} within {pp:g} pp, no fine-tuning, after compensation and repair): "
            f"{self.macs_reduction:.2f}x fewer MACs, {self.params_reduction:.2f}x fewer parameters "
            f"(budget {self.budget:.3g}; {self.metric} {self.quality:.4f} against {self.base_quality:.4f}"
            + (f", a drop of at most {100 * (self.base_quality - self.quality + self.margin):.2f} pp at "
               f"{100 * self.confidence:g}% confidence" if self.confidence > 0.5 else "")
            + f"); {self.gap:.2f}x the spectral estimate",
            f"measured {len(self.points)} points on {self.holdout} held-out calibration samples in {self.seconds:.1f} s"
            + (f" ({self.seconds / self.analysis_seconds:.1f}x the analysis)" if self.analysis_seconds > 0 else "")
            + (f"; each point scored {self.scored} of them at most, the least sure first" if self.scored else ""),
        ]
        if self.finetuned is not None:
            f = self.finetuned
            out.append(f"estimated limit after {f.epochs:g} epoch(s) of fine-tuning: {'at least ' if f.bounded else ''}"
                       f"{f.macs_reduction:.2f}x fewer MACs (modelled: fine-tuning leaves {f.remaining:.2f} of the drop)")
        return out


def measured_curve(base_quality: float, points: Sequence[CalibrationPoint]) -> list[tuple[float, float]]:
    """(MACs reduction, quality) from the original (1.0, base) on, by reduction, quality made non-increasing."""
    out: list[tuple[float, float]] = []
    for x, measured in sorted([(1.0, base_quality), *((p.macs_reduction, p.quality) for p in points)]):
        q = min(measured, out[-1][1]) if out else measured
        if out and math.isclose(x, out[-1][0]):
            out[-1] = (x, q)
        else:
            out.append((x, q))
    return out


def floored(analysis: Analysis, effective: Mapping[int, int], graph: ChannelGraph, coupling: Coupling) -> Analysis:
    """``analysis`` with its groups' effective filters replaced by ``effective`` (the hierarchical plan's floors)."""
    groups = tuple(
        dataclasses.replace(g, effective=(r := int(effective.get(g.group, g.effective))), redundancy=1.0 - r / g.channels)
        for g in analysis.groups
    )
    at = cost_with_keep(graph, coupling, {g.group: max(1, g.effective) for g in groups})
    return dataclasses.replace(analysis, groups=groups, limit=NetworkLimit(analysis.limit.original, at))


Evaluate = Callable[[float], CalibrationPoint]
Counts = Callable[[float], Mapping[int, int]]


def _same(a: Mapping[int, int], b: Mapping[int, int]) -> bool:
    return dict(a) == dict(b)


def search(evaluate: Evaluate, counts: Counts, spectral_budget: float, max_budget: float, threshold: float,
           base: CalibrationPoint, points: int, reduction: Callable[[float], float] | None = None,
           reach: float = 0.0) -> tuple[CalibrationPoint, CalibrationPoint | None, list[CalibrationPoint]]:
    """Bracket, then narrow by interpolation, the largest budget whose measured quality is at least ``threshold``.

    Args:
        evaluate: Measures one budget.
        counts: The per-group counts of a budget (cheap; ``counts(0)`` is the original's). Two budgets with the
            same counts are one point: the bracket moves without measuring.
        spectral_budget: The spectral budget: the search starts ``START`` above it.
        max_budget: A budget at which every group keeps one channel.
        threshold: The least quality that passes.
        base: The original as a point (budget 0, reduction 1, the base quality): passing by definition.
        points: Most points to measure.
        reduction: The MACs reduction of a budget (cheap), when known: an interpolated budget within
            ``RESOLUTION`` of a bracket's end is moved to close the bracket (:func:`_closing`).
        reach: A drop the bracket's upper end should show besides failing (the fine-tuned estimate's), so that
            one point serves both (:func:`_bracket_step`).

    Returns:
        (the passing point with the largest budget, the failing point with the smallest or None, every measured point).
    """
    measured: list[CalibrationPoint] = []
    lo: CalibrationPoint = base
    hi: CalibrationPoint | None = None

    def step(b: float) -> bool:
        """Move the bracket to budget ``b`` (measuring unless its counts are a bracket's); True when ``b`` passed."""
        nonlocal lo, hi
        c = counts(b)
        if _same(c, counts(lo.budget)):
            lo = dataclasses.replace(lo, budget=b) if b > lo.budget else lo
            return True
        if hi is not None and _same(c, counts(hi.budget)):
            hi = dataclasses.replace(hi, budget=b) if b < hi.budget else hi
            return False
        p = evaluate(b)
        measured.append(p)
        if p.bound >= threshold:
            lo = p
            return True
        hi = p
        return False

    b = min(max(spectral_budget * START, 1e-12), max_budget)
    step(b)
    while hi is None and b < max_budget and len(measured) < points:  # bracket: up until a point fails
        b = min(b * _bracket_step(lo, base.quality - threshold, reach, base.quality), max_budget)
        step(b)
    for _ in range(64):  # safeguarded interpolation in log budget
        if hi is None or len(measured) >= points or hi.macs_reduction / lo.macs_reduction <= RESOLUTION:
            break
        b = _between(lo, hi, threshold, base.quality)
        if reduction is not None:
            b = _closing(lo, hi, _between(lo, hi, threshold, base.quality, clamp=0.0), reduction) or b
        step(b)
    return lo, hi, measured


def factor_to_drop(p: CalibrationPoint, drop: float, base_quality: float, informative: float) -> float:
    """The factor from point ``p``'s budget to one whose drop reaches ``drop``, the drop taken to grow as the
    budget to ``PRIOR_EXPONENT``, between ``sqrt(STEP)`` and ``STEP ** 2``; ``STEP`` when ``p``'s own drop is at
    most ``informative`` (too small to extrapolate from)."""
    measured = base_quality - p.quality
    if p.budget <= 0 or measured <= informative:
        return STEP
    factor = (drop / measured) ** (1.0 / PRIOR_EXPONENT)
    return float(min(max(factor, math.sqrt(STEP)), STEP**2))


def _bracket_step(lo: CalibrationPoint, allowed: float, reach: float, base_quality: float) -> float:
    """The factor from the passing point ``lo`` to the bracket's next budget: where twice the ``allowed`` drop (a
    clear failure) or ``REACH_OVERSHOOT`` times ``reach``, when larger, is expected (:func:`factor_to_drop`)."""
    return factor_to_drop(lo, max(2.0 * allowed, REACH_OVERSHOOT * reach), base_quality, MIN_LOG_DROP * allowed)


def _closing(lo: CalibrationPoint, hi: CalibrationPoint, b: float, reduction: Callable[[float], float]) -> float | None:
    """When the interpolated crossing ``b`` (unclamped) is within ``RESOLUTION`` of an end of the bracket in MACs
    reduction, the budget whose reduction is just inside ``RESOLUTION`` of that end (None otherwise): whether that
    point passes or fails, the search can stop after it, where the clamped interpolation would move the end by a
    quarter of the bracket and need more points."""
    r = reduction(b)
    if r < lo.macs_reduction * RESOLUTION:
        goal, below = lo.macs_reduction * RESOLUTION ** 0.9, True
    elif r * RESOLUTION > hi.macs_reduction:
        goal, below = hi.macs_reduction / RESOLUTION ** 0.9, False
    else:
        return None
    a, z = max(lo.budget, 1e-12), hi.budget  # reduction(a) < goal < reduction(z): bisect in log budget
    for _ in range(40):
        mid = math.sqrt(a * z)
        if reduction(mid) <= goal:
            a = mid
        else:
            z = mid
    return a if below else z


def _between(lo: CalibrationPoint, hi: CalibrationPoint, threshold: float, base_quality: float,
             clamp: float = INTERPOLATION_CLAMP) -> float:
    """The next budget inside the bracket: where the drop the quality held (:attr:`CalibrationPoint.bound`) shows
    reaches the allowed drop, kept within the middle half of the bracket (a cliff or noise cannot stall it: each
    point shrinks the bracket to at most three quarters).

    Between two measured drops, both above ``MIN_LOG_DROP`` of the allowed one, the drop is taken as a power of the
    budget (linear in log drop and log budget: the benchmark models' measured drops grow about so, where a line in
    the drop itself lands low); otherwise linear in log budget."""
    if lo.budget <= 0:
        return hi.budget / STEP
    allowed = base_quality - threshold
    d_lo, d_hi = base_quality - lo.bound, base_quality - hi.bound
    if d_lo > MIN_LOG_DROP * allowed and d_hi > d_lo:
        t = math.log(allowed / d_lo) / math.log(d_hi / d_lo)
    else:
        t = (lo.bound - threshold) / max(lo.bound - hi.bound, 1e-12)
    t = min(max(t, clamp), 1.0 - clamp)
    return float(math.exp(math.log(lo.budget) + t * math.log(hi.budget / lo.budget)))


def default_confidence(confidence: float, unseen: bool) -> float:
    """``confidence``, or when it is 0 the default for held-out samples the model never saw (``unseen``) or for
    calibration samples it may have been trained on."""
    if confidence:
        return confidence
    return HELD_OUT_CONFIDENCE if unseen else CALIBRATION_CONFIDENCE


def paired_margin(base_correct: np.ndarray, correct: np.ndarray, confidence: float, strata: Strata | None = None) -> float:
    """``z`` standard errors of the drop ``mean(base_correct - correct)``, the two scored on the same samples (a
    sample both get right or wrong adds no variance), ``z`` the one-sided normal quantile of ``confidence``;
    stratified when ``strata`` are given (:func:`paired_drop`).

    >>> round(paired_margin(np.array([1, 1, 1, 1]), np.array([1, 1, 1, 0]), 0.8), 3)
    0.21
    """
    if confidence <= 0.5:
        return 0.0
    return float(NormalDist().inv_cdf(confidence) * paired_drop(base_correct, correct, strata)[1])


def paired_standard_error(base_correct: np.ndarray, correct: np.ndarray, strata: Strata | None = None) -> float:
    """Standard error of the drop ``mean(base_correct - correct)``, the two scored on the same samples (0 for fewer
    than two samples); stratified when ``strata`` are given (:func:`paired_drop`)."""
    return paired_drop(base_correct, correct, strata)[1]


@dataclasses.dataclass(frozen=True)
class Strata:
    """Stratified scoring of the held-out samples: the stratum of each sample in the order points score them, and
    each stratum's size in the held-out set.

    A point scores a prefix of that order; its drop is each stratum's mean drop weighted by the stratum's share of
    the held-out set, and its variance the strata's variances so weighted (stratified sampling). Built by
    :func:`stratified_order`: flips under pruning gather on the samples the original is least sure of.
    """

    of: np.ndarray
    sizes: tuple[int, ...]

    @classmethod
    def single(cls, n: int) -> Strata:
        """One stratum: the plain paired drop."""
        return cls(np.zeros(n, dtype=np.int64), (n,))

    def weights(self) -> np.ndarray:
        sizes = np.asarray(self.sizes, dtype=np.float64)
        return sizes / max(sizes.sum(), 1.0)


def stratified_order(margin: np.ndarray, seed: int) -> tuple[np.ndarray, Strata]:
    """The order points score held-out samples in, and its strata: the ``FRAGILE_SHARE`` with the smallest
    ``margin`` (the original's top-1 minus top-2 probability) are fragile, the rest robust, each in a seeded random
    order; the first ones scored are ``FRAGILE_RATE`` fragile until those run out (about the Neyman allocation for
    a 1 pp drop: the fragile samples carry nearly every flip, ResNet-20 on Fashion-MNIST)."""
    n = len(margin)
    k = round(FRAGILE_SHARE * n) if n >= 2 * MIN_STRATUM else 0
    rng = np.random.default_rng(seed)
    by_margin = np.argsort(margin, kind="stable")
    fragile, robust = rng.permutation(by_margin[:k]), rng.permutation(by_margin[k:])
    keys = np.concatenate([np.arange(k) / FRAGILE_RATE, np.arange(n - k) / (1.0 - FRAGILE_RATE)])
    at = np.argsort(keys, kind="stable")
    order = np.concatenate([fragile, robust])[at]
    stratum = np.concatenate([np.zeros(k, dtype=np.int64), np.ones(n - k, dtype=np.int64)])[at]
    if not k:
        return order, Strata.single(n)
    return order, Strata(stratum, (k, n - k))


def paired_drop(base_correct: np.ndarray, correct: np.ndarray, strata: Strata | None = None) -> tuple[float, float]:
    """(drop, standard error) of ``base_correct - correct``, the two scored on the first ``len(correct)`` samples of
    the scoring order: plain means without ``strata``, else stratified (a stratum none of whose samples were scored
    yet drops out and the others' weights grow to cover it)."""
    d = np.asarray(base_correct, dtype=np.float64) - np.asarray(correct, dtype=np.float64)
    if strata is None or len(strata.sizes) == 1:
        return (float(d.mean()) if d.size else 0.0), (0.0 if d.size < 2 else float(d.std(ddof=1) / math.sqrt(d.size)))
    of = strata.of[: d.shape[0]]
    drop = var = total = 0.0
    for h, w in enumerate(strata.weights()):
        dh = d[of == h].ravel()
        if not dh.size:
            continue
        total += w
        drop += w * float(dh.mean())
        var += w * w * (float(dh.var(ddof=1)) / dh.size if dh.size > 1 else 0.0)
    total = max(total, 1e-12)
    return drop / total, math.sqrt(var) / total


def full_standard_error(base_correct: np.ndarray, correct: np.ndarray, strata: Strata) -> float:
    """The standard error the drop would have with every held-out sample scored, from each stratum's variance on
    the samples scored so far (:func:`paired_drop`'s estimate at full size)."""
    d = np.asarray(base_correct, dtype=np.float64) - np.asarray(correct, dtype=np.float64)
    of = strata.of[: d.shape[0]]
    var = 0.0
    tokens = d[0].size if d.ndim > 1 and d.shape[0] else 1
    for h, (w, size) in enumerate(zip(strata.weights(), strata.sizes)):
        dh = d[of == h].ravel()
        if dh.size > 1:
            var += w * w * float(dh.var(ddof=1)) / (size * tokens)
    return math.sqrt(var)


def remaining_after(epochs: float) -> float:
    """Modelled fraction of the no-fine-tune drop left after ``epochs`` of fine-tuning (1.0 at 0 epochs)."""
    if epochs <= 0:
        return 1.0
    return min(1.0, FINETUNE_REMAINING_AT_ONE_EPOCH * epochs ** -FINETUNE_REMAINING_EXPONENT)


def finetuned_limit(curve: Sequence[tuple[float, float]], base: float, tolerance: float, epochs: float) -> FineTunedLimit:
    """The largest reduction on ``curve`` (non-increasing quality) whose drop, times ``remaining_after(epochs)``,
    is within ``tolerance``; interpolated in log reduction, a lower bound when the curve never drops that far."""
    rho = remaining_after(epochs)
    allowed = tolerance / rho
    for (x0, q0), (x1, q1) in itertools.pairwise(curve):
        d0, d1 = base - q0, base - q1
        if d1 > allowed:
            t = (allowed - d0) / max(d1 - d0, 1e-12)
            return FineTunedLimit(epochs, rho, float(math.exp(math.log(x0) + min(max(t, 0.0), 1.0) * math.log(x1 / x0))), False)
    return FineTunedLimit(epochs, rho, float(curve[-1][0]), True)


def expected_line(limit: CalibratedLimit, macs_reduction: float) -> str:
    """'accuracy expected at 3.00x fewer MACs (...): 0.8421 against 0.9120 (-6.99 pp)' from the measured curve."""
    q, beyond = limit.expected_quality(macs_reduction)
    where = f"{limit.metric} expected at {macs_reduction:.2f}x fewer MACs (measured curve, {limit.holdout} held-out calibration samples, no fine-tuning)"
    if beyond:
        top = limit.curve()[-1][0]
        value = f"at most {q:.4f} (the last measured point, {top:.2f}x)"
    else:
        value = f"{q:.4f}"
    return f"{where}: {value} against {limit.base_quality:.4f} ({100 * (q - limit.base_quality):+.2f} pp)"
