"""ONNX backend: apply a plan to an onnx-ir model."""
from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphprune.coupling.groups import Coupling
from graphprune.errors import ValidationError
from graphprune.execution.sessions import make_session
from graphprune.frontends.onnx import OnnxModel, inline_proto, node_name
from graphprune.io import weight_bytes
from graphprune.ir.graph import Axis, ChannelGraph, OpNode
from graphprune.ir.plan import Plan, kept_elements
from graphprune.ops import AdjustContext, Adjustment, lookup

__all__ = ["apply_kept", "apply_plan", "clone_model", "model_bytes", "model_session", "new_const", "node_map", "value_map"]

log = logging.getLogger(__name__)


def clone_model(model: ir.Model) -> ir.Model:
    """An independent copy of a model's graph; weight tensors (immutable) are shared.

    Sharing keeps external-data tensors pointing at their files.
    """
    copy = ir.from_proto(ir.to_proto(model))
    for name, value in copy.graph.initializers.items():
        original = model.graph.initializers.get(name)
        if original is not None and original.const_value is not None:
            value.const_value = original.const_value
    return copy


INLINE_LIMIT = 1_500_000_000
"""Initializer bytes above which sessions are built from a temporary file with external data (protobuf caps at 2 GB)."""


@contextlib.contextmanager
def model_session(model: ir.Model, **options: Any) -> Iterator[ort.InferenceSession]:
    """An onnxruntime session for an in-memory model of any size (see :func:`graphprune.execution.sessions.make_session`)."""
    if weight_bytes(model) <= INLINE_LIMIT:
        yield make_session(model_bytes(model), **options)
        return
    with tempfile.TemporaryDirectory(prefix="graphprune-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        yield make_session(str(path), **options)


def model_bytes(model: ir.Model) -> bytes:
    """Serialised model with every weight inline (for sessions built from memory)."""
    return inline_proto(model).SerializeToString()


def value_map(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the main graph."""
    out: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    out.update(graph.initializers)
    for node in graph:
        out.update((o.name, o) for o in node.outputs if o.name)
    return out


def node_map(graph: ir.Graph) -> dict[str, ir.Node]:
    """Nodes by the names the frontend gave them."""
    return {node_name(node, k): node for k, node in enumerate(graph)}


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
    ctx = AdjustContext(kept, om.graph)
    nodes = node_map(model.graph)
    for op in om.graph.nodes:
        spec = lookup(op.domain, op.op_type)
        if spec is None or spec.adjust is None:
            continue
        try:
            adj = spec.adjust(op, ctx)
        except (ValueError, IndexError, KeyError, TypeError) as exc:  # an inconsistent model: shapes contradict the graph
            raise ValidationError(f"cannot rewrite {op.op_type} node '{op.name}': {exc}") from None
        if adj:
            rank = len(om.graph.shape(op.outputs[0]) or ())
            _apply_adjustment(model.graph, nodes[op.name], op, adj, rank)
    return model


def _slice_tensors(graph: ChannelGraph, values: Mapping[str, ir.Value], kept: Mapping[Axis, np.ndarray]) -> None:
    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for axis, k in kept.items():
        by_tensor.setdefault(axis.tensor, []).append((axis.axis, k))
    for name, cuts in by_tensor.items():
        value = values[name]
        if graph.tensors[name].kind == "param":
            arr = graph.const(name)
            assert arr is not None
            for axis, k in cuts:
                arr = np.take(arr, k, axis=axis)
            value.const_value = ir.tensor(np.ascontiguousarray(arr), name=name)
            value.shape = ir.Shape(arr.shape)
        elif value.shape is not None:
            dims = list(value.shape)
            for axis, k in cuts:
                dims[axis] = int(k.size)
            value.shape = ir.Shape(dims)


def new_const(graph: ir.Graph, base: str, arr: np.ndarray) -> ir.Value:
    existing = {v for v in graph.initializers}
    name, k = base, 0
    while name in existing:
        k += 1
        name = f"{base}_{k}"
    value = ir.Value(name=name, const_value=ir.tensor(arr, name=name), shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)))
    graph.register_initializer(value)
    return value


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
