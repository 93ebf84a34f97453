"""Cost model: parameters and multiply-accumulates, from the op table."""
from __future__ import annotations

import dataclasses
import math

from graphprune.graph import ChannelGraph
from graphprune.ops import lookup

__all__ = ["Cost", "model_cost"]

_WEIGHT_TYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"})


@dataclasses.dataclass(frozen=True)
class Cost:
    """Parameters (floating-point constants) and MACs for one sample."""

    params: int
    macs: int


def model_cost(graph: ChannelGraph) -> Cost:
    """Count parameters and per-sample MACs (dynamic dims count as 1)."""
    params = sum(
        math.prod(d for d in info.shape if isinstance(d, int))
        for info in graph.tensors.values()
        if info.kind == "param" and info.dtype in _WEIGHT_TYPES and info.shape is not None
    )
    macs = 0
    for node in graph.nodes:
        spec = lookup(node.domain, node.op_type)
        if spec is not None and spec.macs is not None:
            macs += spec.macs(node, graph)
    return Cost(params, macs)
