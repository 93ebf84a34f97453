"""Cost model: parameters and multiply-accumulates, from the op table."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from graphprune.coupling.groups import Coupling
from graphprune.ir.dtypes import WEIGHT_TYPES
from graphprune.ir.graph import ChannelGraph, TensorInfo
from graphprune.ops import lookup

__all__ = ["Cost", "cost_with_keep", "model_cost"]


@dataclasses.dataclass(frozen=True)
class Cost:
    """Parameters (float and quantized weight constants) and MACs for one sample."""

    params: int
    macs: int


def model_cost(graph: ChannelGraph) -> Cost:
    """Count parameters and per-sample MACs (dynamic dims count as 1)."""
    params = sum(
        math.prod(d for d in info.shape if isinstance(d, int))
        for info in graph.tensors.values()
        if info.kind == "param" and info.dtype in WEIGHT_TYPES and info.shape is not None
    )
    macs = 0
    for node in graph.nodes:
        spec = lookup(node.domain, node.op_type)
        if spec is not None and spec.macs is not None:
            macs += spec.macs(node, graph)
    return Cost(params, macs)


def cost_with_keep(graph: ChannelGraph, coupling: Coupling, keep: Mapping[int, int]) -> Cost:
    """Cost of the model after keeping ``keep[g]`` channels of group ``g`` (no rewrite).

    Only counts matter, not which channels: every member axis shrinks by the
    dropped channels times their element multiplicity.
    """
    shrink: dict[tuple[str, int], int] = {}
    for gid, k in keep.items():
        group = coupling.by_id(gid)
        dropped = group.channels - k
        if dropped <= 0:
            continue
        for m in group.members:
            key = (m.tensor, m.axis)
            shrink[key] = shrink.get(key, 0) + dropped * int(m.indices.shape[1])
    tensors = dict(graph.tensors)
    for (name, axis), n in shrink.items():
        info = tensors[name]
        assert info.shape is not None
        shape = list(info.shape)
        dim = shape[axis]
        if isinstance(dim, int):
            shape[axis] = dim - n
        tensors[name] = TensorInfo(info.name, tuple(shape), info.dtype, info.kind, info.is_output)
    view = ChannelGraph(tensors, graph.nodes, graph.inputs, graph.outputs, graph.constant_loader)
    return model_cost(view)
