"""A latency model of the target runtime as plain data: per-op lookup tables (HALP-style) and the prediction from them.

The tables are measured by :mod:`graphprune.execution.latency_tables` on
onnxruntime; this module only reads them. A table covers one cut sub-graph's
(input channels, output channels) grid, sampled coarsely: both one-dimensional
sweeps through the full size, plus a few interior points that correct a
multiplicative interpolation. Depthwise ops (input and output in one group)
have one axis.

The whole-model prediction is additive: the measured original latency plus,
over the tables, table(new sizes) - table(original sizes); when the tables add
up to more than the whole model (each probe pays its own run overhead), the
differences are scaled down by that ratio, so no plan predicts below zero. It
assumes the ops run one after the other and that an op's time depends only on
its own sizes; layout changes between ops (onnxruntime's NCHWc reorders),
memory traffic and cache effects across ops are outside it.
:func:`graphprune.execution.latency_tables.measure_plan_error` checks it.

Example:
    >>> lm = LatencyModel.load("model.latency.json")   # doctest: +SKIP
    >>> lm.predict({g.id: g.channels // 2 for g in coupling.prunable})   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.errors import BadInputError

__all__ = ["FORMAT", "AxisSpec", "BuildStats", "LatencyModel", "OpTable"]

log = logging.getLogger(__name__)

FORMAT = "graphprune.latency/1"


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

    def value(self, sizes: tuple[int, ...]) -> float:
        """Interpolated latency: piecewise linear along the sweeps, multiplicative with a bilinear correction off them."""
        pts = dict(self.points)
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
    """What a build cost: new measurements, cache hits (points), tables, seconds (all, and measuring)."""

    measurements: int = 0
    cache_hits: int = 0
    tables: int = 0
    tables_cached: int = 0
    seconds: float = 0.0
    measure_seconds: float = 0.0


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
    """

    original_ms: float
    tables: tuple[OpTable, ...]
    counts: Mapping[int, tuple[int, ...]]
    channels: Mapping[int, int]
    left_out: tuple[tuple[str, str], ...]
    setting: Mapping[str, Any]
    stats: BuildStats

    def predict(self, keep: Mapping[int, int]) -> float:
        """Predicted latency (ms) when group ``g`` keeps ``keep[g]`` channels (others keep all): additive, see the module.

        Raises:
            BadInputError: For an unknown group or a count outside [1, C].
        """
        for g, k in keep.items():
            if g not in self.channels or not 1 <= k <= self.channels[g]:
                raise BadInputError(f"keep: group {g} with {k} channels is not in this latency model's range")
        full = sum(t.value(t.full) for t in self.tables)
        new = sum(t.value(t.sizes_with(keep)) for t in self.tables)
        return self.original_ms + (new - full) / max(1.0, self.coverage)

    @property
    def coverage(self) -> float:
        """Sum of the tables' full-size latencies over the measured model latency (how much of the model they see)."""
        return sum(t.value(t.full) for t in self.tables) / self.original_ms if self.original_ms > 0 else 0.0

    def saved_ms(self, group_id: int, k: int) -> float:
        """Milliseconds saved by keeping ``k`` channels of one group (others full)."""
        return self.original_ms - self.predict({group_id: k})

    def fast_counts(self, group_id: int) -> tuple[int, ...]:
        """Counts on the lower envelope: no larger candidate count is as fast (C always is)."""
        counts = self.counts[group_id]
        times = [self.predict({group_id: k}) for k in counts]
        fast, best = [], float("inf")
        for k, t in zip(reversed(counts), reversed(times)):
            if t < best:
                fast.append(k)
                best = t
        return tuple(sorted(fast))

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["counts"] = {str(g): list(c) for g, c in self.counts.items()}
        data["channels"] = {str(g): c for g, c in self.channels.items()}
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
                       dict(d["setting"]), BuildStats(**d["stats"]))
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
