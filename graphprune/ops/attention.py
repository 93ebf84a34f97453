"""Scaled dot-product attention: ONNX ``Attention`` (opset 23) and ``aten.scaled_dot_product_attention``."""
from __future__ import annotations

import math

from graphprune.ir.graph import Axis, ChannelGraph, OpNode
from graphprune.ops._common import freeze_axes, freeze_node, needs_shapes
from graphprune.ops.registry import Link, Semantics, register

__all__ = ["attention"]


def _attention_macs(node: OpNode, graph: ChannelGraph) -> int:
    q, k, v = (graph.shape(n) for n in node.inputs[:3])
    if q is None or k is None or v is None or len(q) != 4 or len(v) != 4:
        return 0
    dims = [d for d in (*q[:3], k[2]) if isinstance(d, int)]
    per = math.prod(dims)
    return per * sum(d for d in (q[3], v[3]) if isinstance(d, int))


@register("Attention", macs=_attention_macs)
def attention(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Q (B, H, L, E), K (B, H, S, E), V (B, H, S, Ev), mask (.., L, S) -> Y (B, H, L, Ev).

    Heads are linked across Q, K, V, the mask and Y, so a head goes as a whole
    (a zeroed head gives uniform attention over zeroed values: zeros). E is
    contracted between Q and K and Ev passes from V to Y. E is frozen unless
    ``scale`` is given: the default 1/sqrt(E) would change with it. 3-D inputs
    (heads merged into the hidden axis), grouped-query heads, past key/values
    and the extra outputs freeze every axis.
    """
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else ""
    y = node.outputs[0]
    missing = needs_shapes(node, graph, [q, k, v, mask, y])
    if missing is not None:
        return missing
    if any(node.inputs[4:]) or any(node.outputs[1:]):
        return freeze_node(node, graph, "Attention: past key/values and extra outputs are not supported")
    shapes = [graph.shape(n) for n in (q, k, v, y)]
    if any(len(s) != 4 for s in shapes) or (mask and len(graph.shape(mask)) > 4):  # type: ignore[arg-type]
        return freeze_node(node, graph, "Attention: 3-D inputs merge the heads into the hidden axis")
    if shapes[0][1] != shapes[1][1] or shapes[1][1] != shapes[2][1]:  # type: ignore[index]
        return freeze_node(node, graph, "Attention: grouped-query heads (fewer key/value heads) are not supported")
    links = [Link(Axis(q, i), Axis(t, i)) for t in (k, v, y) for i in (0, 1)]
    links += [Link(Axis(q, 2), Axis(y, 2)), Link(Axis(k, 2), Axis(v, 2)),
              Link(Axis(q, 3), Axis(k, 3)), Link(Axis(v, 3), Axis(y, 3))]
    if mask:
        links += _mask_links(mask, graph, (Axis(q, 0), Axis(q, 1), Axis(q, 2), Axis(k, 2)))
    freezes = () if "scale" in node.attrs else freeze_axes(
        [Axis(q, 3)], "Attention: the default scale 1/sqrt(head size) changes with the head size")
    return Semantics(links=tuple(links), freezes=freezes)


def _mask_links(mask: str, graph: ChannelGraph, target: tuple[Axis, ...]) -> list[Link]:
    """The mask broadcasts to (B, H, L, S): its non-broadcast axes are the same channels."""
    shape = graph.shape(mask)
    assert shape is not None
    off = 4 - len(shape)
    return [Link(Axis(mask, i), target[off + i]) for i, d in enumerate(shape) if d != 1]
