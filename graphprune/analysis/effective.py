"""Effective filter analysis: per-group effective filters and the network's maximum compression.

Steps 1 to 4 of METHOD.md section 2: stream each coupling group's gradient
matrix F_g, take its numerical rank r_g (effective filters) by spectral
energy, classify the exact rank deficit (singularities), check the rank's
stability on two halves of the data, and cost the network when every group
keeps r_g channels. The result is plain data, saved as JSON (read by the
planner) plus an ``.npz`` with the F matrices.
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.analysis.cost import Cost, cost_with_keep, model_cost
from graphprune.analysis.fisher import FisherResult, GroupFisher, collect_fisher
from graphprune.analysis.gates import plan_gates
from graphprune.analysis.spectrum import Singularities, eigenvalues, energy_rank, singularities
from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError
from graphprune.execution.interpreter import GraphInterpreter
from graphprune.execution.progress import Progress
from graphprune.frontends.data import Calibration
from graphprune.ir.graph import ChannelGraph
from graphprune.planning.selection import DropOrder, greedy_drop_order

__all__ = ["Analysis", "AnalysisOptions", "GroupAnalysis", "NetworkLimit", "analyze", "budget_removals", "removal_envelope", "summarize", "with_removals"]

log = logging.getLogger(__name__)

FORMAT = "graphprune.analysis/1"
SAMPLES_PER_CHANNEL = 4
"""Fewer samples than this times a group's width triggers a warning."""


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    """Options of the analysis.

    Attributes:
        eps: Energy left out: r_g keeps 1 - eps of F_g's spectrum.
        floor: Absolute eigenvalue floor; eigenvalues at or below never count.
        loss: ``fisher``, ``labels`` or ``projection`` (see :data:`graphprune.analysis.fisher.LOSSES`).
        batch_size: Samples per forward/backward pass.
        seed: Seed of the Fisher label sampling and projections.
        budget: When set, r_g comes from one network-wide budget instead of
            eps: channels are removed across all groups, cheapest predicted
            loss increase first (greedy second-order costs), while the total
            stays within ``budget`` (METHOD.md section 2, step 4).
    """

    eps: float = 1e-2
    floor: float = 0.0
    loss: str = "fisher"
    batch_size: int = 64
    seed: int = 0
    budget: float | None = None

    def check(self) -> None:
        """Raises BadInputError on out-of-range values."""
        if not 0.0 <= self.eps < 1.0:
            raise BadInputError(f"--eps must be in [0, 1), got {self.eps}")
        if self.floor < 0.0:
            raise BadInputError(f"--floor must be >= 0, got {self.floor}")
        if self.batch_size < 1:
            raise BadInputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.budget is not None and self.budget < 0.0:
            raise BadInputError(f"--budget must be >= 0, got {self.budget}")


@dataclasses.dataclass(frozen=True)
class GroupAnalysis:
    """Effective filters of one group.

    Attributes:
        group: Group id; anchor and channels identify it as in plans.
        effective: r_g, the effective filters.
        redundancy: 1 - r_g / C_g, the group's maximum redundancy.
        singular: Exact rank deficit by kind.
        half_ranks: r_g on the even and odd halves of the samples.
        predicted_loss: Second-order loss increase when the greedy rule keeps r_g.
        eigenvalues: F_g's spectrum, descending.
        warning: Why the estimate may be unreliable, or None.
    """

    group: int
    anchor: str
    channels: int
    effective: int
    redundancy: float
    singular: Singularities
    half_ranks: tuple[int, int]
    predicted_loss: float
    eigenvalues: tuple[float, ...]
    warning: str | None = None

    @property
    def stability(self) -> int:
        """Largest difference between a half's rank and the full rank."""
        return max(abs(r - self.effective) for r in self.half_ranks)


@dataclasses.dataclass(frozen=True)
class NetworkLimit:
    """The network's cost now and when every analysed group keeps r_g channels."""

    original: Cost
    at_limit: Cost

    @property
    def macs_reduction(self) -> float:
        return self.original.macs / max(1, self.at_limit.macs)

    @property
    def params_reduction(self) -> float:
        return self.original.params / max(1, self.at_limit.params)


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Result of :func:`analyze`: plain data plus the F matrices."""

    groups: tuple[GroupAnalysis, ...]
    skipped: Mapping[int, str]
    limit: NetworkLimit
    samples: int
    options: AnalysisOptions
    fisher: Mapping[int, GroupFisher] = dataclasses.field(repr=False, default_factory=dict)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def by_group(self) -> dict[int, GroupAnalysis]:
        return {g.group: g for g in self.groups}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "meta": dict(self.meta),
            "options": dataclasses.asdict(self.options),
            "samples": self.samples,
            "network": {
                "macs": self.limit.original.macs,
                "params": self.limit.original.params,
                "macs_at_limit": self.limit.at_limit.macs,
                "params_at_limit": self.limit.at_limit.params,
                "max_macs_reduction": self.limit.macs_reduction,
                "max_params_reduction": self.limit.params_reduction,
            },
            "groups": [
                {**dataclasses.asdict(g), "singular": dataclasses.asdict(g.singular), "stability": g.stability}
                for g in self.groups
            ],
            "skipped": {str(k): v for k, v in sorted(self.skipped.items())},
        }

    def save(self, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``path`` (JSON, with ``extra`` keys such as the calibrated limit) and its F matrices beside it
        (``<stem>.fisher.npz``); returns the npz path."""
        from graphprune.io import write_bytes_atomic, write_text_atomic

        p = Path(path)
        npz = p.with_name(p.stem + ".fisher.npz")
        arrays: dict[str, np.ndarray] = {}
        for gid, gf in self.fisher.items():
            arrays[f"f_{gid}"], arrays[f"grad_{gid}"] = gf.f, gf.grad
            arrays[f"fa_{gid}"], arrays[f"fb_{gid}"] = gf.halves
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, allow_pickle=False, **arrays)  # named, so no array key can be taken for the flag
        write_bytes_atomic(npz, buf.getvalue())
        data = {**self.to_dict(), **dict(extra or {})}
        data["fisher_file"] = npz.name
        write_text_atomic(p, json.dumps(data, indent=1))
        return npz

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Analysis:
        """Read an analysis written by :meth:`save`.

        Raises:
            BadInputError: When the file is not a graphprune analysis.
        """
        p = Path(path)
        try:
            data = json.loads(p.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format is not {FORMAT}")
            groups = tuple(
                GroupAnalysis(
                    group=int(g["group"]), anchor=str(g["anchor"]), channels=int(g["channels"]),
                    effective=int(g["effective"]), redundancy=float(g["redundancy"]),
                    singular=Singularities(**{k: int(v) for k, v in g["singular"].items()}),
                    half_ranks=(int(g["half_ranks"][0]), int(g["half_ranks"][1])),
                    predicted_loss=float(g["predicted_loss"]),
                    eigenvalues=tuple(float(v) for v in g["eigenvalues"]), warning=g.get("warning"),
                )
                for g in data["groups"]
            )
            net = data["network"]
            limit = NetworkLimit(Cost(int(net["params"]), int(net["macs"])), Cost(int(net["params_at_limit"]), int(net["macs_at_limit"])))
            options = AnalysisOptions(**data["options"])
            fisher: dict[int, GroupFisher] = {}
            npz_path = p.with_name(str(data.get("fisher_file", p.stem + ".fisher.npz")))
            if npz_path.exists():
                with np.load(npz_path) as npz:
                    for g in groups:
                        if f"f_{g.group}" in npz.files:
                            fisher[g.group] = GroupFisher(
                                npz[f"f_{g.group}"], (npz[f"fa_{g.group}"], npz[f"fb_{g.group}"]), npz[f"grad_{g.group}"]
                            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadInputError(f"{p}: not a graphprune analysis ({exc})") from None
        skipped = {int(k): str(v) for k, v in data.get("skipped", {}).items()}
        return cls(groups, skipped, limit, int(data["samples"]), options, fisher, data.get("meta", {}))


def _group_result(
    gid: int, anchor: str, gf: GroupFisher, order: DropOrder, samples: int, options: AnalysisOptions
) -> GroupAnalysis:
    c = gf.f.shape[0]
    eigs = eigenvalues(gf.f)
    sing = singularities(gf.f)
    structural = c - sing.total
    r = min(energy_rank(eigs, options.eps, options.floor), structural)
    halves = tuple(min(energy_rank(eigenvalues(h), options.eps, options.floor), c) for h in gf.halves)
    keep = max(1, r)
    warning = None
    if samples < SAMPLES_PER_CHANNEL * c:
        warning = f"{samples} samples for {c} channels: use at least {SAMPLES_PER_CHANNEL * c} for a reliable rank"
    return GroupAnalysis(
        group=gid, anchor=anchor, channels=c, effective=r, redundancy=1.0 - r / c, singular=sing,
        half_ranks=(int(halves[0]), int(halves[1])), predicted_loss=float(order.cost[c - keep]),
        eigenvalues=tuple(float(v) for v in eigs), warning=warning,
    )


def removal_envelope(order: DropOrder) -> np.ndarray:
    """``env[k]``: the least predicted loss of removing at least ``k`` channels in the greedy order (k < C).

    The greedy order's cumulative cost need not rise at every step (cross terms can make a later prefix
    cheaper); its suffix minimum does, so a budget reaches every prefix whose own cost fits it.
    """
    cost = np.asarray(order.cost[:order.order.size], dtype=np.float64)
    return np.minimum.accumulate(cost[::-1])[::-1]


def budget_removals(orders: Mapping[int, DropOrder], budget: float) -> dict[int, int]:
    """Channels each group drops under one network-wide predicted-loss budget (cheapest removals first).

    Every group keeps at least one channel; the removals' predicted loss increases (steps of
    :func:`removal_envelope`) add up to at most ``budget``.
    """
    removed = dict.fromkeys(orders, 0)
    steps = {gid: np.diff(removal_envelope(o)) for gid, o in orders.items()}
    heap = [(float(st[0]), gid) for gid, st in steps.items() if st.size > 0]
    heapq.heapify(heap)
    total = 0.0
    while heap:
        step, gid = heapq.heappop(heap)
        if total + step > budget:
            break
        total += step
        removed[gid] += 1
        k = removed[gid]
        if k < steps[gid].size:
            heapq.heappush(heap, (float(steps[gid][k]), gid))
    return removed


def with_removals(
    groups: tuple[GroupAnalysis, ...], orders: Mapping[int, DropOrder], removed: Mapping[int, int]
) -> tuple[GroupAnalysis, ...]:
    """The groups with r_g = C_g - removed[g] (and its redundancy and predicted loss)."""
    out = []
    for g in groups:
        k = removed.get(g.group, g.channels - g.effective)
        r = g.channels - k
        out.append(dataclasses.replace(g, effective=r, redundancy=1.0 - r / g.channels,
                                       predicted_loss=float(orders[g.group].cost[k])))
    return tuple(out)


def summarize(
    fisher: FisherResult, graph: ChannelGraph, coupling: Coupling, options: AnalysisOptions, meta: Mapping[str, Any] | None = None
) -> Analysis:
    """Turn streamed F matrices into the per-group and network figures."""
    orders = {gid: greedy_drop_order(gf.f) for gid, gf in fisher.groups.items()}
    groups = tuple(
        _group_result(gid, coupling.by_id(gid).anchor, fisher.groups[gid], orders[gid], fisher.samples, options)
        for gid in sorted(fisher.groups)
    )
    if options.budget is not None:
        groups = with_removals(groups, orders, budget_removals(orders, options.budget))
    keep = {g.group: max(1, g.effective) for g in groups}
    limit = NetworkLimit(model_cost(graph), cost_with_keep(graph, coupling, keep))
    return Analysis(groups, dict(fisher.skipped), limit, fisher.samples, options, dict(fisher.groups), dict(meta or {}))


def analyze(
    graph: ChannelGraph,
    coupling: Coupling,
    data: Calibration,
    options: AnalysisOptions | None = None,
    progress: Progress | None = None,
    model: GraphInterpreter | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Analysis:
    """Effective filter analysis of every prunable group.

    Args:
        graph: The model's channel graph.
        coupling: Its coupling groups.
        data: Calibration samples (this rank's shard is read under torchrun).
        options: Rank threshold, loss, batch size, seed.
        progress: Called with (samples done, samples total).
        model: An interpreter of ``graph`` to reuse (built when None).
        meta: Extra facts stored with the result (model path, data source).

    Raises:
        BadInputError: Bad options or data.
        UnsupportedOpError: The graph has ops without a torch implementation.
    """
    options = options or AnalysisOptions()
    options.check()
    model = model or GraphInterpreter(graph)
    gates = plan_gates(coupling, graph)
    fisher = collect_fisher(model, gates, data, options.loss, options.batch_size, options.seed, progress=progress)
    return summarize(fisher, graph, coupling, options, meta)
