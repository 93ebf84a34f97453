"""Channel gates: where a group's gate vector multiplies the graph.

Pruning channel c of a group is the same as setting its gate a_c to 0 on
every edge where the channel *leaves* the group (an input of an op none of
whose outputs belong to the group: the next conv, the classifier, an
attention product). Gating those exit edges reproduces the pruned model
exactly at a_c = 0 and the original at a_c = 1, and scales each exit's input
linearly in between.

Gates are per sample: a gate tensor of shape (N, C), all ones, so one
backward pass gives every sample's gradient d loss_i / d a (samples are
independent in inference mode).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import torch

from graphprune.coupling.groups import Coupling, Group
from graphprune.ir.graph import ChannelGraph, input_dependent
from graphprune.ir.masks import keep_vector

__all__ = ["GateEdge", "GatePlan", "compose", "gate_taps", "keep_gates", "plan_gates"]


@dataclasses.dataclass(frozen=True)
class GateEdge:
    """One exit edge of a group.

    Attributes:
        node: Consumer node name.
        input_index: Which input of that node.
        axis: The group's axis in that tensor.
        index: (C, m) element indices of the group's channels on that axis.
    """

    node: str
    input_index: int
    axis: int
    index: np.ndarray


@dataclasses.dataclass(frozen=True)
class GatePlan:
    """Exit edges of every gateable group, and why the others cannot be gated."""

    edges: Mapping[int, tuple[GateEdge, ...]]
    skipped: Mapping[int, str]


def _exit_edges(group: Group, graph: ChannelGraph) -> tuple[GateEdge, ...] | str:
    members = {m.tensor for m in group.members}
    consumers = graph.consumers()
    varying = input_dependent(graph)
    edges: list[GateEdge] = []
    for m in group.members:
        if m.kind == "param" or m.tensor not in varying:  # a weight, or one computed from constants (QDQ)
            continue
        if graph.tensors[m.tensor].is_output:
            return f"channels reach the graph output '{m.tensor}'"
        for node in consumers.get(m.tensor, []):
            if any(o in members for o in node.outputs if o):
                continue
            for i, name in enumerate(node.inputs):
                if name == m.tensor:
                    edges.append(GateEdge(node.name, i, m.axis, m.indices))
    if not edges:
        return "channels never leave the group"
    return tuple(edges)


def plan_gates(coupling: Coupling, graph: ChannelGraph) -> GatePlan:
    """Exit edges of every prunable group."""
    edges: dict[int, tuple[GateEdge, ...]] = {}
    skipped: dict[int, str] = {}
    for g in coupling.prunable:
        found = _exit_edges(g, graph)
        if isinstance(found, str):
            skipped[g.id] = found
        else:
            edges[g.id] = found
    return GatePlan(edges, skipped)


class BatchAxisError(ValueError):
    """A gated tensor has no leading batch axis of the batch's size."""


def _gate_fn(gate: torch.Tensor, edge: GateEdge) -> Callable[[torch.Tensor], torch.Tensor]:
    n, _c = gate.shape
    m = edge.index.shape[1]
    flat = torch.as_tensor(edge.index.reshape(-1), dtype=torch.int64, device=gate.device)

    def apply(x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[0] != n:
            raise BatchAxisError(f"tensor of shape {tuple(x.shape)} at {edge.node} has no batch axis of size {n}")
        if edge.axis == 0:
            raise BatchAxisError(f"group axis is the batch axis at {edge.node}")
        size = x.shape[edge.axis]
        ones = torch.ones(n, size, dtype=x.dtype, device=x.device)
        scale = ones.index_copy(1, flat, gate.to(x.dtype).repeat_interleave(m, dim=1))
        shape = [n] + [1] * (x.dim() - 1)
        shape[edge.axis] = size
        return x * scale.reshape(shape)

    return apply


def compose(fns: list[Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Apply ``fns`` in order (several taps on one edge)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            x = fn(x)
        return x

    return apply


def keep_gates(keep: Mapping[int, np.ndarray], channels: Mapping[int, int], batch: int) -> dict[int, torch.Tensor]:
    """Gates that prune: per group, an (N, C) gate of ones on the kept channels and zeros on the others.

    With :func:`gate_taps` they make the interpreter compute the model pruned to ``keep``.

    Args:
        keep: Group id -> kept channel indices.
        channels: Group id -> the group's channel count.
        batch: N, the batch the gates are for.
    """
    return {gid: torch.from_numpy(keep_vector(channels[gid], k)).float().expand(batch, -1).clone() for gid, k in keep.items()}


def gate_taps(plan: GatePlan, gates: Mapping[int, torch.Tensor]) -> dict[tuple[str, int], Callable]:
    """Edge taps for :class:`~graphprune.execution.interpreter.GraphInterpreter` that apply ``gates``.

    Args:
        plan: Exit edges per group.
        gates: Group id -> (N, C) gate tensor.
    """
    per_edge: dict[tuple[str, int], list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    for gid, gate in gates.items():
        for edge in plan.edges[gid]:
            per_edge.setdefault((edge.node, edge.input_index), []).append(_gate_fn(gate, edge))
    return {k: v[0] if len(v) == 1 else compose(v) for k, v in per_edge.items()}
