"""ONNX backend: apply a plan to an onnx-ir model."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphprune.coupling.groups import Coupling
from graphprune.frontends.onnx import OnnxModel
from graphprune.ir.graph import Axis, ChannelGraph, OpNode
from graphprune.ir.onnx import clone_model, new_const, node_map, value_map
from graphprune.ir.plan import Plan, kept_elements
from graphprune.ops import Adjustment, adjustments

__all__ = ["apply_kept", "apply_plan"]

log = logging.getLogger(__name__)


def apply_plan(om: OnnxModel, coupling: Coupling, plan: Plan) -> ir.Model:
    """Return a pruned copy of ``om.model``; the original is left untouched.

    Raises:
        PlanMismatchError: When the plan does not fit the model.
    """
    return apply_kept(om, kept_elements(plan, coupling, om.graph))


def apply_kept(om: OnnxModel, kept: Mapping[Axis, np.ndarray]) -> ir.Model:
    """Pruned copy of ``om.model`` keeping, on every listed axis, the given elements."""
    model = clone_model(om.model)
    values = value_map(model.graph)
    _slice_tensors(om.graph, values, kept)
    nodes = node_map(model.graph)
    for op, _spec, adj in adjustments(om.graph, kept):
        if adj:
            rank = len(om.graph.shape(op.outputs[0]) or ())
            _apply_adjustment(model.graph, nodes[op.name], op, adj, rank)
    return model


def _slice_tensors(graph: ChannelGraph, values: Mapping[str, ir.Value], kept: Mapping[Axis, np.ndarray]) -> None:
    """Slice every kept-from weight and shrink the declared shape of every kept-from activation."""
    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for ax, idx in kept.items():
        by_tensor.setdefault(ax.tensor, []).append((ax.axis, idx))
    for name, cuts in by_tensor.items():
        value = values[name]
        if graph.tensors[name].kind == "param":
            arr = graph.param(name)
            for dim, k in cuts:
                arr = np.take(arr, k, axis=dim)
            value.const_value = ir.tensor(np.ascontiguousarray(arr), name=name)
            value.shape = ir.Shape(arr.shape)
        elif value.shape is not None:
            dims = list(value.shape)
            for dim, k in cuts:
                dims[dim] = int(k.size)
            value.shape = ir.Shape(dims)


def _set_input(node: ir.Node, index: int, value: ir.Value) -> None:
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def _apply_adjustment(graph: ir.Graph, node: ir.Node, op: OpNode, adj: Adjustment, rank: int) -> None:
    """Apply attribute, constant-input and shape-vector edits (``rank``: the output's rank)."""
    for key, val in adj.attrs.items():
        if val is None:
            node.attributes.pop(key, None)
        else:
            node.attributes[key] = ir.convenience.convert_attribute(key, val)
    for index, arr in adj.const_inputs.items():
        _set_input(node, index, new_const(graph, f"{op.name}_in{index}_pruned", np.asarray(arr)))
    for index, entries in adj.shape_overrides.items():
        old = node.inputs[index]
        assert old is not None
        if old.const_value is not None:
            arr = old.const_value.numpy().copy()
            for j, n in entries.items():
                arr[j] = n
            _set_input(node, index, new_const(graph, f"{op.name}_in{index}_pruned", arr))
        else:
            _override_at_run_time(graph, node, op, index, old, entries, rank)


def _override_at_run_time(
    graph: ir.Graph, node: ir.Node, op: OpNode, index: int, old: ir.Value, entries: Mapping[int, int], rank: int
) -> None:
    """shape' = shape * keep + set, for a shape vector computed at run time."""
    keep = np.ones(rank, np.int64)
    put = np.zeros(rank, np.int64)
    for j, n in entries.items():
        keep[j], put[j] = 0, n
    mul = ir.Node("", "Mul", [old, new_const(graph, f"{op.name}_keep", keep)], name=f"{op.name}_shape_mul")
    add = ir.Node("", "Add", [mul.outputs[0], new_const(graph, f"{op.name}_set", put)], name=f"{op.name}_shape_add")
    mul.outputs[0].name = f"{op.name}_shape_kept"
    add.outputs[0].name = f"{op.name}_shape_pruned"
    graph.insert_before(node, [mul, add])
    node.replace_input_with(index, add.outputs[0])
