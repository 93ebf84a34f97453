"""Matrix products: Gemm and MatMul."""
from __future__ import annotations

import math

from graphprune.ir.graph import Axis, ChannelGraph, OpNode
from graphprune.ops._common import broadcast_links, freeze_node, needs_shapes
from graphprune.ops.registry import AxisOf, Link, ModuleRule, Semantics, register

__all__ = ["LINEAR_MODULE", "gemm", "matmul"]


def _gemm_macs(node: OpNode, graph: ChannelGraph) -> int:
    a, y = graph.shape(node.inputs[0]), graph.shape(node.outputs[0])
    if a is None or y is None:
        return 0
    k = a[0] if node.attrs.get("transA", 0) else a[1]
    return math.prod(d for d in (*y, k) if isinstance(d, int))


@register("Gemm", macs=_gemm_macs)
def gemm(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Y = A' B' + C with A' (M, K), B' (K, N); K is contracted."""
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    c = node.inputs[2] if len(node.inputs) > 2 else ""
    missing = needs_shapes(node, graph, [a, b, c, y])
    if missing is not None:
        return missing
    ta, tb = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    a_m, a_k = (1, 0) if ta else (0, 1)
    b_k, b_n = (1, 0) if tb else (0, 1)
    links = [
        Link(Axis(a, a_m), Axis(y, 0)),
        Link(Axis(b, b_n), Axis(y, 1)),
        Link(Axis(a, a_k), Axis(b, b_k)),
    ]
    if c:
        links += broadcast_links(node, graph, [c]).links
    return Semantics(links=tuple(links))


def _matmul_macs(node: OpNode, graph: ChannelGraph) -> int:
    a, y = graph.shape(node.inputs[0]), graph.shape(node.outputs[0])
    if a is None or y is None:
        return 0
    return math.prod(d for d in (*y, a[-1]) if isinstance(d, int))


LINEAR_MODULE = ModuleRule(sizes={"in_features": AxisOf(1, -2), "out_features": AxisOf(1, -1),
                                  "nx": AxisOf(1, -2), "nf": AxisOf(1, -1)})
"""``nn.Linear`` (converted to X @ W^T): features follow the axes of B = W^T; so do Hugging Face's ``Conv1D``
sizes (``torch.addmm(bias, x, W)``, W as B)."""


@register("MatMul", macs=_matmul_macs, module=LINEAR_MODULE)
def matmul(node: OpNode, graph: ChannelGraph) -> Semantics:
    """A (..., M, K) @ B (..., K, N) -> Y (..., M, N); batch axes broadcast."""
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    missing = needs_shapes(node, graph, [a, b, y])
    if missing is not None:
        return missing
    ra, rb, ry = (len(graph.shape(n)) for n in (a, b, y))  # type: ignore[arg-type]
    if ra < 2 or rb < 2:
        return freeze_node(node, graph, "MatMul: 1-D operands are not supported")
    links = [
        Link(Axis(a, ra - 2), Axis(y, ry - 2)),
        Link(Axis(b, rb - 1), Axis(y, ry - 1)),
        Link(Axis(a, ra - 1), Axis(b, rb - 2)),
    ]
    oshape = graph.shape(y)
    assert oshape is not None
    for name, rank in ((a, ra), (b, rb)):
        shape = graph.shape(name)
        assert shape is not None
        off = (ry - 2) - (rank - 2)
        for i in range(rank - 2):
            if shape[i] == 1 and oshape[off + i] != 1:
                continue
            links.append(Link(Axis(name, i), Axis(y, off + i)))
    return Semantics(links=tuple(links))
