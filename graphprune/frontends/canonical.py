"""Canonical forms of exporter idioms whose channel mapping a per-op rule cannot state.

torch's decomposition of ``scaled_dot_product_attention`` (dynamo export)
transposes the key as ``Reshape (B, H, S, D) -> (B*H, S, D)``,
``Transpose (0, 2, 1)``, ``Reshape -> (B, H, D, S)``: the first Reshape
merges the heads into the dynamic batch axis, which has no channels, so
the heads would freeze. The three ops compute exactly
``Transpose (0, 1, 3, 2)`` of their input; :func:`fold_batch_transposes`
writes that one op instead (the model computes the same values, and the
pruned model keeps the single Transpose).

Exporters below opset 17 (LayerNorm) or 23 (RMSNorm) write a norm as its
arithmetic: ``ReduceMean``, ``Sub``, ``Pow``, ``ReduceMean``, ``Add``,
``Sqrt``, ``Div`` (or ``Reciprocal`` + ``Mul``), ``Mul`` by the scale,
``Add`` of the shift. :func:`fuse_decomposed_norms` writes one norm op for
each (``LayerNormalization``; ``RMSNormalization`` from opset 23, else
``SimplifiedLayerNormalization``, which onnxruntime runs at any opset), so
the hidden pass finds the stream it normalises. It is used by that pass on a
copy only, whose norms it then replaces in any case.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from graphprune.ir.graph import ChannelGraph, Dim
from graphprune.ops.shape import factorize

__all__ = ["DecomposedNorm", "decomposed_norm", "fold_batch_transposes", "fuse_decomposed_norms"]

log = logging.getLogger(__name__)


def _ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.as_ints()]


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _sole_use(value: ir.Value | None, graph: ir.Graph) -> ir.Node | None:
    """The one op reading ``value``, when it has one use and is no graph output."""
    if value is None or any(v is value for v in graph.outputs):
        return None
    uses = list(value.uses())
    return uses[0][0] if len(uses) == 1 else None


def _only_use(value: ir.Value, op_type: str, graph: ir.Graph) -> ir.Node | None:
    """The one op that reads ``value`` (as its first input), when it is an ``op_type`` and ``value`` is no graph output."""
    node = _sole_use(value, graph)
    return node if node is not None and _is(node, op_type) and node.inputs[0] is value else None


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


@dataclasses.dataclass
class DecomposedNorm:
    """A norm over the last axis written as arithmetic: its ops, input, output, constants and epsilon."""

    nodes: list[ir.Node]
    x: ir.Value
    out: ir.Value
    scale: ir.Value | None
    bias: ir.Value | None
    epsilon: float
    centred: bool

    @property
    def name(self) -> str:
        """The name the fused op takes (from the last op of the arithmetic)."""
        return f"{self.nodes[-1].name}_fused"


def _scalar(value: ir.Value | None) -> float | None:
    tensor = value.const_value if value is not None else None
    if tensor is None:
        return None
    arr = tensor.numpy()
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a binary op that reads ``value`` (None when it reads it twice or not at all)."""
    a, b = node.inputs[0], node.inputs[1]
    if a is value and b is not value:
        return b
    if b is value and a is not value:
        return a
    return None


def _last_axis_mean(node: ir.Node | None) -> bool:
    """A ``ReduceMean`` over the last axis only, keeping it."""
    if not _is(node, "ReduceMean") or node is None or node.inputs[0] is None:
        return False
    if int(node.attributes.get_int("keepdims", 1)) != 1:
        return False
    axes = _ints(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        axes = [int(a) for a in node.inputs[1].const_value.numpy().reshape(-1)]
    shape = node.inputs[0].shape
    rank = len(shape) if shape is not None else None
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _square_of(node: ir.Node | None) -> ir.Value | None:
    """``d`` when ``node`` is ``Pow(d, 2)`` or ``Mul(d, d)``."""
    if _is(node, "Pow") and node is not None and _scalar(node.inputs[1]) == 2.0:
        return node.inputs[0]
    if _is(node, "Mul") and node is not None and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


def _normalised(root: ir.Node, d: ir.Value, graph: ir.Graph) -> tuple[list[ir.Node], ir.Value] | None:
    """The ops after ``Sqrt`` that divide ``d`` by it (``Div``, ``Reciprocal`` + ``Mul``, ``Div(1, .)`` + ``Mul``)."""
    nxt = _sole_use(root.outputs[0], graph)
    if _is(nxt, "Div") and nxt is not None and nxt.inputs[0] is d and nxt.inputs[1] is root.outputs[0]:
        return [nxt], nxt.outputs[0]
    inverse = _is(nxt, "Reciprocal") or (_is(nxt, "Div") and nxt is not None and _scalar(nxt.inputs[0]) == 1.0
                                          and nxt.inputs[1] is root.outputs[0])
    if not inverse or nxt is None:
        return None
    mul = _sole_use(nxt.outputs[0], graph)
    if not _is(mul, "Mul") or mul is None or _other(mul, nxt.outputs[0]) is not d:
        return None
    return [nxt, mul], mul.outputs[0]


def _affine(value: ir.Value, op_type: str, width: int | None, graph: ir.Graph) -> tuple[ir.Node, ir.Value, int] | None:
    """(the op, its constant, its length) when ``value``'s one use is ``op_type`` with a constant vector of ``width``
    entries (any length when ``width`` is None)."""
    node = _sole_use(value, graph)
    if not _is(node, op_type) or node is None:
        return None
    const = _other(node, value)
    tensor = const.const_value if const is not None else None
    if const is None or tensor is None or tensor.shape is None or len(tensor.shape) != 1:
        return None
    if width is not None and int(tensor.size) != width:
        return None
    return node, const, int(tensor.size)


def decomposed_norm(mean_sq: ir.Node, graph: ir.Graph) -> DecomposedNorm | None:
    """The norm whose mean of squares is ``mean_sq``, or None when the arithmetic around it is not a norm's."""
    if not _last_axis_mean(mean_sq):
        return None
    sq = mean_sq.inputs[0].producer() if mean_sq.inputs[0] is not None else None
    d = _square_of(sq)
    if d is None or sq is None or _sole_use(sq.outputs[0], graph) is not mean_sq:
        return None
    add = _sole_use(mean_sq.outputs[0], graph)
    eps_value = _other(add, mean_sq.outputs[0]) if _is(add, "Add") and add is not None else None
    epsilon = _scalar(eps_value)
    root = _sole_use(add.outputs[0], graph) if add is not None else None
    if epsilon is None or add is None or not _is(root, "Sqrt") or root is None:
        return None
    tail = _normalised(root, d, graph)
    if tail is None:
        return None
    divide, out = tail
    nodes = [sq, mean_sq, add, root, *divide]
    x, centred = d, False
    sub = d.producer()
    if _is(sub, "Sub") and sub is not None and {id(n) for n, _ in d.uses()} == {id(sq), id(divide[-1])} \
            and not any(v is d for v in graph.outputs):
        mean = sub.inputs[1].producer() if sub.inputs[1] is not None else None
        if _last_axis_mean(mean) and mean is not None and mean.inputs[0] is sub.inputs[0] \
                and _sole_use(mean.outputs[0], graph) is sub and sub.inputs[0] is not None:
            x, centred, nodes = sub.inputs[0], True, [mean, sub, *nodes]
    shape = x.shape
    width = shape[-1] if shape is not None and len(shape) and isinstance(shape[-1], int) else None
    scale = bias = None
    found = _affine(out, "Mul", width, graph)
    if found is not None:
        node, scale, width = found
        nodes.append(node)
        out = node.outputs[0]
    if centred:
        found = _affine(out, "Add", width, graph)
        if found is not None:
            node, bias, _ = found
            nodes.append(node)
            out = node.outputs[0]
    if scale is None and width is None:
        return None
    return DecomposedNorm(nodes, x, out, scale, bias, epsilon, centred)


def _fused_node(norm: DecomposedNorm, graph: ir.Graph, opset: int) -> ir.Node:
    scale = norm.scale
    if scale is None:
        shape = norm.x.shape
        dtype = np.dtype(norm.x.dtype.numpy()) if norm.x.dtype is not None else np.dtype(np.float32)
        assert shape is not None and isinstance(shape[-1], int)  # decomposed_norm checked the width
        scale = ir.Value(name=f"{norm.name}_scale", const_value=ir.tensor(np.ones(int(shape[-1]), dtype=dtype)))
        graph.register_initializer(scale)
    attrs = {"axis": -1, "epsilon": norm.epsilon}
    if norm.centred:
        inputs = [norm.x, scale] + ([norm.bias] if norm.bias is not None else [])
        return ir.node("LayerNormalization", inputs, attrs, name=norm.name)
    op_type = "RMSNormalization" if opset >= 23 else "SimplifiedLayerNormalization"
    return ir.node(op_type, [norm.x, scale], attrs, name=norm.name)


def fuse_decomposed_norms(model: ir.Model) -> list[str]:
    """Replace every norm over the last axis written as arithmetic by one norm op.

    Args:
        model: Edited in place.

    Returns:
        The names of the norm ops written.
    """
    graph = model.graph
    opset = model.opset_imports.get("", 17)
    fused: list[str] = []
    for node in list(graph):
        if node.graph is None:  # removed as part of an earlier match
            continue
        norm = decomposed_norm(node, graph)
        if norm is None:
            continue
        new = _fused_node(norm, graph, opset)
        out = new.outputs[0]
        out.shape, out.type = norm.out.shape, norm.out.type
        graph.insert_before(norm.nodes[-1], new)
        ir.convenience.replace_all_uses_with(norm.out, out, replace_graph_outputs=True)
        graph.remove(norm.nodes, safe=True)
        out.name = norm.out.name
        fused.append(norm.name)
    if fused:
        log.debug("fused %d norms written as arithmetic", len(fused))
    return fused
