"""Canonical forms of exporter idioms whose channel mapping a per-op rule cannot state.

torch's decomposition of ``scaled_dot_product_attention`` (dynamo export)
transposes the key as ``Reshape (B, H, S, D) -> (B*H, S, D)``,
``Transpose (0, 2, 1)``, ``Reshape -> (B, H, D, S)``: the first Reshape
merges the heads into the dynamic batch axis, which has no channels, so
the heads would freeze. The three ops compute exactly
``Transpose (0, 1, 3, 2)`` of their input; :func:`fold_batch_transposes`
writes that one op instead (the model computes the same values, and the
pruned model keeps the single Transpose).
"""
from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from graphprune.ir.graph import ChannelGraph, Dim
from graphprune.ops.shape import factorize

__all__ = ["fold_batch_transposes"]

log = logging.getLogger(__name__)


def _ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.as_ints()]


def _only_use(value: ir.Value, op_type: str, graph: ir.Graph) -> ir.Node | None:
    """The one op that reads ``value`` (as its first input), when it is an ``op_type`` and ``value`` is no graph output."""
    uses = list(value.uses())
    if len(uses) != 1 or any(v is value for v in graph.outputs):
        return None
    node, index = uses[0]
    return node if node.op_type == op_type and node.domain in ("", "ai.onnx") and index == 0 else None


def _same(a: Dim, b: Dim) -> bool:
    return a is not None and a == b


def _batch_transpose(t: ir.Node, graph: ir.Graph, shapes: ChannelGraph) -> tuple[ir.Node, ir.Node] | None:
    """(first Reshape, last Reshape) when ``t`` is the middle of the key transpose idiom."""
    if t.op_type != "Transpose" or t.domain not in ("", "ai.onnx") or _ints(t, "perm") != [0, 2, 1]:
        return None
    first = t.inputs[0].producer() if t.inputs[0] is not None else None
    if first is None or first.op_type != "Reshape" or first.domain not in ("", "ai.onnx"):
        return None
    if _only_use(first.outputs[0], "Transpose", graph) is not t:
        return None
    last = _only_use(t.outputs[0], "Reshape", graph)
    x = first.inputs[0]
    if last is None or x is None:
        return None
    xs, ms, ys = (shapes.shape(v.name or "") for v in (x, first.outputs[0], last.outputs[0]))
    if xs is None or ms is None or ys is None or len(xs) != 4 or len(ms) != 3 or len(ys) != 4:
        return None
    if factorize(xs, ms) != [([0, 1], [0]), ([2], [1]), ([3], [2])] or not _same(xs[2], ms[1]) or not _same(xs[3], ms[2]):
        return None
    if not all(_same(xs[i], ys[j]) for i, j in ((0, 0), (1, 1), (2, 3), (3, 2))):
        return None
    return first, last


def fold_batch_transposes(model: ir.Model, shapes: ChannelGraph) -> int:
    """Replace every ``Reshape (B, H, S, D) -> (B*H, S, D), Transpose (0, 2, 1), Reshape -> (B, H, D, S)`` by ``Transpose (0, 1, 3, 2)``.

    Args:
        model: Edited in place.
        shapes: Its channel graph (the shapes the match needs).

    Returns:
        The number of idioms folded.
    """
    graph = model.graph
    folded = 0
    for t in list(graph):
        found = _batch_transpose(t, graph, shapes)
        if found is None:
            continue
        first, last = found
        y = last.outputs[0]
        node = ir.node("Transpose", [first.inputs[0]], {"perm": [0, 1, 3, 2]}, name=f"{last.name}_folded")
        out = node.outputs[0]
        out.shape, out.type = y.shape, y.type
        graph.insert_before(last, node)
        ir.convenience.replace_all_uses_with(y, out, replace_graph_outputs=True)
        graph.remove([last, t], safe=True)
        out.name = y.name
        folded += 1
    if folded:
        RemoveUnusedNodesPass()(model)
        log.debug("folded %d reshape-transpose-reshape key transposes into one Transpose", folded)
    return folded
