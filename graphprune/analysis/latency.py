"""A latency model of the target runtime as plain data: per-op lookup tables (HALP-style) and the prediction from them.

The tables are measured by :mod:`graphprune.execution.latency_tables` on
onnxruntime; this module only reads them. A table covers one cut sub-graph's
(input channels, output channels) grid, sampled coarsely: both one-dimensional
sweeps through the full size, plus a few interior points that correct a
multiplicative interpolation. Depthwise ops (input and output in one group)
have one axis.

The whole-model prediction is additive: the measured original latency plus,
over the tables, ``scale`` x (table(new sizes) - table(original sizes)).
Isolated probes do not add up to the whole model: each pays its own run
overhead and onnxruntime's layout reorders (NCHWc) at its borders, the whole
model pays them only where the layout changes, and the tables are timed as
the minimum of their runs while the whole model is timed (like validation) as
the median. ``scale`` corrects the sum per model: it is fitted so that the
prediction equals one whole-model measurement of the model pruned at a
calibration point (every group at a fast count near half its channels).
Without a calibration (``scale`` None) the differences are scaled down by the
tables' coverage when it is above 1, so no plan predicts below zero.

One factor does not hold at every depth: deep cuts save less in the whole model
than their probes say (on MobileNetV2 at 224 a group cut to 7 of 96 channels
saves a third of what its tables predict, a group at half saves about what they
predict). So a model can carry more measured points (``anchors``, each a plan
and its measured ratio to the original: the planner adds the first plan it
makes, measured at its batch): the correction of the tables' sum is then
piecewise linear in that sum, through zero, the calibration point and the
anchors (monotone; where the calibration point and an anchor disagree in order,
the anchor, measured at the plan's own depth, holds), proportional beyond the
deepest. Nor does one correction hold for every count: in the whole model an op
whose count breaks onnxruntime's channel blocking pays layout reorders its probe
does not show. So a model may carry a second calibration point with every count
a multiple of ``block`` (``blocked``): plans whose counts are all such multiples
read their own curve, through it and the anchors of their kind.
:func:`graphprune.execution.latency_tables.measure_plan_error` checks it.

Example:
    >>> lm = LatencyModel.load("model.latency.json")   # doctest: +SKIP
    >>> lm.predict({g.id: g.channels // 2 for g in coupling.prunable})   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.errors import BadInputError

__all__ = ["FORMAT", "AxisSpec", "BuildStats", "LatencyModel", "OpTable", "fraction_error"]

log = logging.getLogger(__name__)

FORMAT = "graphprune.latency/1"
MIN_FRACTION = 0.05
"""No prediction goes below this fraction of the original (interpolated noisy tables can add up below zero)."""


@dataclasses.dataclass(frozen=True)
class AxisSpec:
    """One table axis: a tensor axis and the prunable groups ``(id, multiplicity, channels)`` laid on it."""

    tensor: str
    axis: int
    size: int
    groups: tuple[tuple[int, int, int], ...]

    def size_with(self, keep: Mapping[int, int]) -> int:
        return self.size - sum((c - keep.get(g, c)) * m for g, m, c in self.groups)


@dataclasses.dataclass(frozen=True)
class OpTable:
    """Measured latencies (ms) of one cut sub-graph at (input size, output size) points.

    Attributes:
        node: The op the sub-graph is anchored at.
        ops: Op types of the cut sub-graph, in order.
        axes: One or two varied axes (input, output channels).
        points: ``(sizes, ms)``, one size per axis; the full sizes are always present.
        key: Cache key (hash).
    """

    node: str
    ops: tuple[str, ...]
    axes: tuple[AxisSpec, ...]
    points: tuple[tuple[tuple[int, ...], float], ...]
    key: str

    @property
    def full(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    def sizes_with(self, keep: Mapping[int, int]) -> tuple[int, ...]:
        return tuple(a.size_with(keep) for a in self.axes)

    @functools.cached_property
    def _pts(self) -> dict[tuple[int, ...], float]:
        return dict(self.points)

    def value(self, sizes: tuple[int, ...]) -> float:
        """Interpolated latency: piecewise linear along the sweeps, multiplicative with a bilinear correction off them."""
        pts = self._pts
        if sizes in pts:
            return pts[sizes]
        if len(sizes) == 1:
            xs = sorted(p[0] for p in pts)
            return float(np.interp(sizes[0], xs, [pts[(x,)] for x in xs]))
        (fi, fo), t0 = self.full, pts[self.full]
        ins = sorted(i for i, o in pts if o == fo)
        outs = sorted(o for i, o in pts if i == fi)
        a = float(np.interp(sizes[0], ins, [pts[(i, fo)] for i in ins]))
        b = float(np.interp(sizes[1], outs, [pts[(fi, o)] for o in outs]))
        ci = sorted({i for i, o in pts if o != fo} | {fi})
        co = sorted({o for i, o in pts if i != fi} | {fo})

        def rho(i: int, o: int) -> float:
            if i == fi or o == fo or (i, o) not in pts:
                return 1.0
            base = pts[(i, fo)] * pts[(fi, o)] / t0
            return pts[(i, o)] / base if base > 0 else 1.0

        rows = [float(np.interp(sizes[1], co, [rho(i, o) for o in co])) for i in ci]
        return a * b / t0 * float(np.interp(sizes[0], ci, rows))


@dataclasses.dataclass(frozen=True)
class BuildStats:
    """What a build cost: new table measurements, cache hits (points), tables, seconds (all, and measuring), the
    whole-model timings (the original and its calibration, measured by every build), and the cached tables whose
    full-size point was timed again to check the cache (``spot_checks``) and found stale, so measured again."""

    measurements: int = 0
    cache_hits: int = 0
    tables: int = 0
    tables_cached: int = 0
    seconds: float = 0.0
    measure_seconds: float = 0.0
    model_timings: int = 0
    spot_checks: int = 0
    stale_tables: int = 0


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """Per-op latency tables of one model on one runtime setting; plain data, JSON in and out.

    Attributes:
        original_ms: Measured latency of the unpruned model.
        tables: One per measured sub-graph.
        counts: Candidate channel counts per group id (ascending, within [floor, C]).
        channels: Channels per group id.
        left_out: ``(node, reason)`` of touched ops without a table (their latency is assumed unchanged).
        setting: Machine, onnxruntime version, provider, threads, batch.
        stats: Cost of the build.
        scale: Factor on the tables' differences fitted to a measured calibration point (None: not calibrated).
        calibration: The calibration point: ``(group id, kept count)`` pairs.
        calibration_ms: Measured latency of the model pruned at the calibration point (same statistic as ``original_ms``).
        anchors: Further measured points: ``(group id, kept count)`` pairs and the measured latency there as a
            ratio to the original measured alongside it (see :meth:`anchored`).
        block: Counts that are multiples of this keep onnxruntime's channel blocking whole (0: not told apart).
        blocked: A second calibration point whose counts are all multiples of ``block`` (the blocked plans' curve).
        blocked_ms: Measured latency of the model pruned at ``blocked`` (same statistic as ``original_ms``).
    """

    original_ms: float
    tables: tuple[OpTable, ...]
    counts: Mapping[int, tuple[int, ...]]
    channels: Mapping[int, int]
    left_out: tuple[tuple[str, str], ...]
    setting: Mapping[str, Any]
    stats: BuildStats
    scale: float | None = None
    calibration: tuple[tuple[int, int], ...] = ()
    calibration_ms: float | None = None
    anchors: tuple[tuple[tuple[tuple[int, int], ...], float], ...] = ()
    block: int = 0
    blocked: tuple[tuple[int, int], ...] = ()
    blocked_ms: float | None = None

    def predict(self, keep: Mapping[int, int]) -> float:
        """Predicted latency (ms) when group ``g`` keeps ``keep[g]`` channels (others keep all): additive, see the module.

        Raises:
            BadInputError: For an unknown group or a count outside [1, C].
        """
        for g, k in keep.items():
            if g not in self.channels or not 1 <= k <= self.channels[g]:
                raise BadInputError(f"keep: group {g} with {k} channels is not in this latency model's range")
        return max(self.original_ms + self.corrected(self.table_delta(keep), self.is_blocked(keep)), MIN_FRACTION * self.original_ms)

    def is_blocked(self, keep: Mapping[int, int]) -> bool:
        """Whether every tabulated group ``keep`` prunes keeps a multiple of ``block`` (False when ``block`` is 0)."""
        return self.block > 0 and all(k % self.block == 0 for g, k in keep.items() if g in self.channels and k < self.channels[g])

    def corrected(self, delta: float, blocked: bool = False) -> float:
        """The tables' summed difference ``delta`` (ms) as a whole-model difference: ``factor`` x ``delta`` without
        anchors; with them piecewise linear through (0, 0) and the measured points, monotone (see the module).
        ``blocked``: of a plan whose counts keep the channel blocking (:meth:`is_blocked`), read on the blocked
        plans' curve when the model has one (:attr:`_blocked_curve`)."""
        curve = (self._blocked_curve or self._curve) if blocked else self._curve
        if delta >= 0 or not curve:
            return delta * self.factor
        x = -delta
        xs, ys = [0.0, *(p[0] for p in curve)], [0.0, *(p[1] for p in curve)]
        if x >= xs[-1]:
            return -x * ys[-1] / xs[-1]
        return -float(np.interp(x, xs, ys))

    @functools.cached_property
    def _curve(self) -> tuple[tuple[float, float], ...]:
        """(tables' saving, measured saving) in ms at the anchors and the calibration point, by saving, monotone.

        An anchor that measures no larger a saving than a shallower anchor is raised to it (noise must not make
        deeper cuts slower). The calibration point then fits between the anchors: its saving is raised to a
        shallower anchor's and lowered to a deeper anchor's (an anchor is measured at the plan's own depth, beside
        the original; MobileNetV2 at 224, 3x: a calibration point at 0.29 of the original, the first plan, deeper
        by the tables, at 0.41)."""
        anchors = self._anchor_savings(blocked=False)
        if not anchors:
            return ()
        points = _monotone(sorted(anchors))
        if self.scale is not None and self.calibration:
            x = -self.table_delta(dict(self.calibration))
            low = max((b for a, b in points if a <= x), default=0.0)
            high = min((b for a, b in points if a >= x), default=math.inf)
            points = _monotone(sorted([*points, (x, min(max(self.scale * x, low), high))]))
        return tuple(points)

    @functools.cached_property
    def _blocked_curve(self) -> tuple[tuple[float, float], ...]:
        """The curve of plans whose counts keep the channel blocking: the blocked calibration point (and the first
        calibration point when its counts keep it too) and the blocked anchors, monotone (() without them: such plans
        read :attr:`_curve`).

        Isolated probes time blocked and unblocked counts alike, but in the whole model a count off the blocking
        makes onnxruntime reorder the layout around the op: on ResNet-50 at 224 (batch 32) blocked plans measured
        0.85-0.90 of the saving their tables predict at every depth, unblocked ones 0.67-0.81, so one curve fitted
        to either misprices the other by up to 20%."""
        if self.block <= 0:
            return ()
        points = self._anchor_savings(blocked=True)
        for keep, ms in ((self.blocked, self.blocked_ms), (self.calibration, self.calibration_ms)):
            if keep and ms is not None and self.is_blocked(dict(keep)):
                points += self._saving(keep, ms)
        return tuple(_monotone(sorted(points)))

    def _anchor_savings(self, blocked: bool) -> list[tuple[float, float]]:
        """:meth:`_saving` of each anchor whose counts keep the channel blocking (``blocked``) or break it."""
        out: list[tuple[float, float]] = []
        for keep, ratio in self.anchors:
            if self.is_blocked(dict(keep)) == blocked:
                out += self._saving(keep, ratio * self.original_ms)
        return out

    def _saving(self, keep: tuple[tuple[int, int], ...], measured_ms: float) -> list[tuple[float, float]]:
        """[(tables' saving, measured saving)] in ms of the model pruned to ``keep`` and measured at ``measured_ms``;
        [] unless both are positive."""
        x, y = -self.table_delta(dict(keep)), self.original_ms - measured_ms
        return [(x, y)] if x > 1e-3 * self.original_ms and y > 0 else []

    def with_blocked(self, keep: Mapping[int, int], measured_ms: float, block: int) -> LatencyModel:
        """A copy with the blocked calibration point: the model pruned to ``keep`` (counts multiples of ``block``)
        measured at ``measured_ms``."""
        return dataclasses.replace(self, block=int(block), blocked=tuple(sorted((int(g), int(k)) for g, k in keep.items())),
                                   blocked_ms=float(measured_ms))

    def anchored(self, keep: Mapping[int, int], measured_ratio: float) -> LatencyModel:
        """A copy with one more measured point: the model pruned to ``keep`` ran at ``measured_ratio`` x the original
        (both measured alike). A point the tables see no saving at, or that measured no faster, is kept but unused."""
        point = (tuple(sorted((int(g), int(k)) for g, k in keep.items() if k < self.channels.get(g, k + 1))), float(measured_ratio))
        return dataclasses.replace(self, anchors=(*self.anchors, point))

    def table_delta(self, keep: Mapping[int, int]) -> float:
        """Sum over the tables of table(new sizes) - table(full sizes), uncorrected (ms)."""
        return sum(t.value(t.sizes_with(keep)) - t.value(t.full) for t in self.tables)

    @functools.cached_property
    def _tables_of(self) -> dict[int, tuple[OpTable, ...]]:
        out: dict[int, list[OpTable]] = {}
        for t in self.tables:
            for g in {g for a in t.axes for g, _, _ in a.groups}:
                out.setdefault(g, []).append(t)
        return {g: tuple(ts) for g, ts in out.items()}

    def change(self, keep: Mapping[int, int], group_id: int, k: int) -> float:
        """``predict(keep with group_id at k) - predict(keep)`` (before predict's floor), from the tables that group touches only."""
        trial = {**keep, group_id: k}
        return self.factor * sum(t.value(t.sizes_with(trial)) - t.value(t.sizes_with(keep)) for t in self._tables_of.get(group_id, ()))

    @property
    def factor(self) -> float:
        """What multiplies the tables' differences: the fitted ``scale``, else 1 / max(1, coverage)."""
        return self.scale if self.scale is not None else 1.0 / max(1.0, self.coverage)

    def calibrated(self, keep: Mapping[int, int], measured_ms: float, bounds: tuple[float, float] = (0.1, 10.0)) -> LatencyModel:
        """A copy whose ``scale`` makes ``predict(keep)`` equal ``measured_ms`` (clamped to ``bounds``).

        When the tables see (almost) no change at ``keep`` or the measurement moves the other way, the scale
        is not identifiable and the copy keeps the coverage rule. The scale is also kept low enough that every
        table at its fastest measured point still predicts at least 5% of the original (never zero or below).
        """
        delta, moved = self.table_delta(keep), measured_ms - self.original_ms
        scale = None
        if abs(delta) > 1e-3 * self.original_ms and moved * delta > 0:
            low, high = bounds
            deepest = sum(min(ms for _, ms in t.points) - t.value(t.full) for t in self.tables)
            if deepest < 0:
                high = max(low, min(high, 0.95 * self.original_ms / -deepest))
            scale = float(np.clip(moved / delta, low, high))
        return dataclasses.replace(self, scale=scale, calibration=tuple(sorted(keep.items())), calibration_ms=measured_ms)

    @functools.cached_property
    def coverage(self) -> float:
        """Sum of the tables' full-size latencies over the measured model latency (how much of the model they see)."""
        return sum(t.value(t.full) for t in self.tables) / self.original_ms if self.original_ms > 0 else 0.0

    def saved_ms(self, group_id: int, k: int) -> float:
        """Milliseconds saved by keeping ``k`` channels of one group (others full)."""
        return self.original_ms - self.predict({group_id: k})

    def fast_counts(self, group_id: int) -> tuple[int, ...]:
        """Counts on the lower envelope: no larger candidate count is as fast (C always is)."""
        if group_id not in self._fast:
            counts = self.counts[group_id]
            times = [self.change({}, group_id, k) for k in counts]
            fast, best = [], float("inf")
            for k, t in zip(reversed(counts), reversed(times)):
                if t < best:
                    fast.append(k)
                    best = t
            self._fast[group_id] = tuple(sorted(fast))
        return self._fast[group_id]

    @functools.cached_property
    def _fast(self) -> dict[int, tuple[int, ...]]:
        return {}

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["counts"] = {str(g): list(c) for g, c in self.counts.items()}
        data["channels"] = {str(g): c for g, c in self.channels.items()}
        data["calibration"] = [list(p) for p in self.calibration]
        data["anchors"] = [[[list(p) for p in keep], ratio] for keep, ratio in self.anchors]
        data["blocked"] = [list(p) for p in self.blocked]
        return json.dumps({"format": FORMAT, **data}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LatencyModel:
        """Parse a saved latency model.

        Raises:
            BadInputError: When the text is not one.
        """
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise ValueError(f"format is not {FORMAT}")
            tables = tuple(
                OpTable(t["node"], tuple(t["ops"]), tuple(AxisSpec(a["tensor"], int(a["axis"]), int(a["size"]), tuple(tuple(x) for x in a["groups"])) for a in t["axes"]),
                        tuple((tuple(int(s) for s in p[0]), float(p[1])) for p in t["points"]), t["key"])
                for t in d["tables"]
            )
            return cls(float(d["original_ms"]), tables, {int(g): tuple(c) for g, c in d["counts"].items()},
                       {int(g): int(c) for g, c in d["channels"].items()}, tuple((str(n), str(r)) for n, r in d["left_out"]),
                       dict(d["setting"]), BuildStats(**d["stats"]),
                       None if d.get("scale") is None else float(d["scale"]),
                       tuple((int(g), int(k)) for g, k in d.get("calibration", ())),
                       None if d.get("calibration_ms") is None else float(d["calibration_ms"]),
                       tuple((tuple((int(g), int(k)) for g, k in keep), float(r)) for keep, r in d.get("anchors", ())),
                       int(d.get("block", 0)), tuple((int(g), int(k)) for g, k in d.get("blocked", ())),
                       None if d.get("blocked_ms") is None else float(d["blocked_ms"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadInputError(f"not a graphprune latency model ({exc})") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyModel:
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as exc:
            raise BadInputError(f"{path}: cannot read latency model ({exc.strerror})") from None


def fraction_error(predicted_ms: float, predicted_original_ms: float, measured_ms: float, original_ms: float) -> float:
    """A prediction's error as fractions of each one's own original: the predicted fraction of the latency model's
    original against the measured fraction of the original timed beside it, (predicted - measured) / measured. A
    change of the machine's speed between profiling and measuring cancels.

    >>> round(fraction_error(2.2, 4.0, 2.5, 5.0), 3)
    0.1
    """
    fraction = measured_ms / original_ms
    return (predicted_ms / predicted_original_ms - fraction) / fraction


def _monotone(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted (x, y) points with each y raised to the largest y before it; equal x merged (the larger y)."""
    out: list[tuple[float, float]] = []
    for x, y in points:
        if out and x - out[-1][0] < 1e-9:
            out[-1] = (x, max(out[-1][1], y))
        else:
            out.append((x, max(y, out[-1][1] if out else 0.0)))
    return out
