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

__all__ = ["apply_kept", "apply_plan", "merged_copies"]

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
    shared: dict[tuple[str, tuple[tuple[int, int], ...]], ir.Value] = {}
    for op, _spec, adj in adjustments(om.graph, kept):
        if adj:
            rank = len(om.graph.shape(op.outputs[0]) or ())
            _apply_adjustment(model.graph, nodes[op.name], op, adj, rank, shared)
    _merge_copies(om.graph, model.graph)
    return model


def merged_copies(om: OnnxModel) -> ir.Model:
    """``om.model`` as it is written: the load-time copies of shared constants merged again (a copy when there are any)."""
    if not om.graph.copies:
        return om.model
    model = clone_model(om.model)
    _merge_copies(om.graph, model.graph)
    return model


def _merge_copies(graph: ChannelGraph, target: ir.Graph) -> None:
    """Load-time copies of a shared constant (``graph.copies``) that are still equal after pruning are one initializer again."""
    by_original: dict[str, list[str]] = {}
    for copy, original in graph.copies.items():
        by_original.setdefault(original, []).append(copy)
    inits = target.initializers
    for original, names in by_original.items():
        distinct = [inits[original]] if original in inits else []
        for name in names:
            value = inits.get(name)
            if value is None or value.const_value is None:
                continue
            same = next((d for d in distinct if _equal(d, value)), None)
            if same is None:
                distinct.append(value)
                continue
            ir.convenience.replace_all_uses_with(value, same)
            inits.pop(name)


def _equal(a: ir.Value, b: ir.Value) -> bool:
    ta, tb = a.const_value, b.const_value
    if ta is None or tb is None:
        return False
    if ta is tb:
        return True
    return ta.dtype == tb.dtype and tuple(ta.shape) == tuple(tb.shape) and bool(np.array_equal(ta.numpy(), tb.numpy()))


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


Patched = dict[tuple[str, tuple[tuple[int, int], ...]], ir.Value]
"""Shape vectors already rebuilt, by (old vector, new entries): nodes sharing a vector share its rebuild."""


def _apply_adjustment(graph: ir.Graph, node: ir.Node, op: OpNode, adj: Adjustment, rank: int, shared: Patched) -> None:
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
        elif (old.name or "", tuple(sorted(entries.items()))) in shared:
            node.replace_input_with(index, shared[(old.name or "", tuple(sorted(entries.items())))])
        elif not _patch_concat(graph, node, op, index, old, entries, shared):
            _override_at_run_time(graph, node, op, index, old, entries, rank)


def _chunk_len(value: ir.Value) -> int | None:
    """Entries of one Concat input of a shape vector (a scalar or a 1-D vector of static length)."""
    if value.shape is None:
        return None
    dims = list(value.shape)
    if not dims:
        return 1
    return dims[0] if len(dims) == 1 and isinstance(dims[0], int) else None


def _patch_concat(
    graph: ir.Graph, node: ir.Node, op: OpNode, index: int, old: ir.Value, entries: Mapping[int, int], shared: Patched
) -> bool:
    """Write the new entries as constants of the Concat that builds the shape vector, when every Concat input
    holding one holds only new entries (``Concat(Shape[0], Shape[1], [4], [8])``: the head count and head size
    become constants; the run-time sizes stay). The Concat is copied for this node; the old one, if unused, goes.
    """
    src = old.producer()
    if src is None or src.op_type != "Concat" or src.domain not in ("", "ai.onnx") or src.attributes.get_int("axis", 0) != 0:
        return False
    inputs: list[ir.Value | None] = []
    off = 0
    for value in src.inputs:
        n = _chunk_len(value) if value is not None else None
        if value is None or n is None:
            return False
        hit = [j for j in range(off, off + n) if j in entries]
        if hit and len(hit) != n:
            return False
        if hit:
            dtype = np.int32 if value.dtype == ir.DataType.INT32 else np.int64
            arr = np.array([entries[j] for j in hit], dtype=dtype)
            inputs.append(new_const(graph, f"{op.name}_in{index}_part{off}_pruned", arr))
        else:
            inputs.append(value)
        off += n
    concat = ir.Node("", "Concat", inputs, attributes=[ir.convenience.convert_attribute("axis", 0)],
                     name=f"{op.name}_shape_concat")
    concat.outputs[0].name = f"{op.name}_shape_pruned"
    if old.dtype is not None:
        concat.outputs[0].dtype = old.dtype
    concat.outputs[0].shape = old.shape
    graph.insert_before(node, [concat])
    node.replace_input_with(index, concat.outputs[0])
    shared[(old.name or "", tuple(sorted(entries.items())))] = concat.outputs[0]
    return True


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
