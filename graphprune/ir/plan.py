"""The plan: for every pruned group, the channels kept. Plain data, JSON in and out."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError, PlanMismatchError
from graphprune.ir.graph import Axis, ChannelGraph

__all__ = ["GroupPlan", "Plan", "kept_elements", "plan_from_keep", "translate_plan"]

FORMAT = "graphprune.plan/1"


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """Kept channels of one group.

    Attributes:
        group: Group id.
        anchor: Stable name of the group (checked when applying).
        channels: Channels before pruning.
        keep: Sorted indices of the kept channels.
    """

    group: int
    anchor: str
    channels: int
    keep: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to prune, independent of the model format."""

    groups: tuple[GroupPlan, ...]
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"format": FORMAT, "meta": dict(self.meta), "groups": [dataclasses.asdict(g) for g in self.groups]},
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse a plan.

        Raises:
            BadInputError: When the text is not a graphprune plan.
        """
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format is not {FORMAT}")
            groups = tuple(
                GroupPlan(int(g["group"]), str(g["anchor"]), int(g["channels"]), tuple(int(i) for i in g["keep"]))
                for g in data["groups"]
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadInputError(f"not a graphprune plan ({exc})") from None
        return cls(groups, data.get("meta", {}))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise BadInputError(f"{path}: cannot read plan ({exc.strerror})") from None
        return cls.from_json(text)


def plan_from_keep(coupling: Coupling, keep: Mapping[int, np.ndarray], meta: Mapping[str, Any] | None = None) -> Plan:
    """A plan from kept channel indices per group id (groups keeping everything are left out)."""
    groups = []
    for gid in sorted(keep):
        g = coupling.by_id(gid)
        kept = np.unique(np.asarray(keep[gid], dtype=np.int64))
        if kept.size < g.channels:
            groups.append(GroupPlan(gid, g.anchor, g.channels, tuple(int(i) for i in kept)))
    return Plan(tuple(groups), dict(meta or {}))


def kept_elements(plan: Plan, coupling: Coupling, graph: ChannelGraph) -> dict[Axis, np.ndarray]:
    """Sorted kept element indices of every axis the plan shrinks.

    Raises:
        PlanMismatchError: When the plan names groups this model does not have.
    """
    removed: dict[Axis, list[np.ndarray]] = {}
    for gp in plan.groups:
        if gp.group >= len(coupling.groups):
            raise PlanMismatchError(f"plan group {gp.group} does not exist in this model")
        group = coupling.groups[gp.group]
        if group.anchor != gp.anchor or group.channels != gp.channels:
            raise PlanMismatchError(
                f"plan group {gp.group} is {gp.anchor} ({gp.channels} channels) but the model has "
                f"{group.anchor} ({group.channels} channels): the plan was made for another model"
            )
        if not group.prunable:
            raise PlanMismatchError(f"plan prunes group {gp.group} ({group.anchor}), which is frozen: {group.frozen[0]}")
        keep = np.asarray(gp.keep, dtype=np.int64)
        if keep.size == 0 or keep.min() < 0 or keep.max() >= group.channels or np.unique(keep).size != keep.size:
            raise BadInputError(f"plan group {gp.group}: kept indices must be distinct and in [0, {group.channels})")
        drop = np.setdiff1d(np.arange(group.channels), keep)
        for m in group.members:
            axis = Axis(m.tensor, m.axis)
            removed.setdefault(axis, []).append(m.indices[drop].reshape(-1))
    out: dict[Axis, np.ndarray] = {}
    for axis, parts in removed.items():
        size = graph.tensors[axis.tensor].size(axis.axis)
        assert size is not None  # prunable groups only hold static axes
        out[axis] = np.setdiff1d(np.arange(size), np.concatenate(parts))
    return out


def translate_plan(plan: Plan, source: Coupling, target: Coupling) -> Plan:
    """The same plan for another description of the same model (torch path <-> ONNX path).

    Groups are matched by a weight axis they share (same tensor name and
    axis: parameter names survive both frontends), and channels by the
    element order of that axis.

    Raises:
        PlanMismatchError: When a planned group has no counterpart.
    """
    index: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    for g in target.groups:
        for m in g.params():
            index.setdefault((m.tensor, m.axis), []).append((g.id, m.indices))
    groups = []
    for gp in plan.groups:
        src = source.by_id(gp.group)
        match = None
        for m in src.params():
            for gid, dst_idx in index.get((m.tensor, m.axis), []):
                if dst_idx.shape == m.indices.shape and set(dst_idx[:, 0].tolist()) == set(m.indices[:, 0].tolist()):
                    match = (gid, dst_idx, m.indices)
                    break
            if match is not None:
                break
        if match is None:
            raise PlanMismatchError(f"plan group {gp.group} ({gp.anchor}) has no counterpart in the other model")
        gid, dst_idx, src_idx = match
        dst = target.by_id(gid)
        # channel c of the source group is the target channel holding the same first element
        where = {int(e): c for c, e in enumerate(dst_idx[:, 0])}
        keep = sorted(where[int(src_idx[c, 0])] for c in gp.keep)
        groups.append(GroupPlan(dst.id, dst.anchor, dst.channels, tuple(keep)))
    return Plan(tuple(groups), dict(plan.meta))

