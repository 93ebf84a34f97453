"""onnx-ir helpers shared by the frontend, the backend, validation and planning: copies, lookups, constants.

Nothing here knows about plans; every function takes or returns onnx-ir
objects. :func:`model_session` hands a model of any size to
:func:`graphprune.execution.sessions.make_session`.

Example:
    >>> import numpy as np, onnx_ir as ir
    >>> graph = ir.Graph([], [], nodes=[], name="g")
    >>> new_const(graph, "w", np.zeros(2, np.float32)).name, new_const(graph, "w", np.ones(1, np.float32)).name
    ('w', 'w_1')
"""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.io import weight_bytes

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["INLINE_LIMIT", "clone_model", "inline_proto", "model_bytes", "model_session", "new_const", "node_map", "node_name", "value_map"]

INLINE_LIMIT = 1_500_000_000
"""Initializer bytes above which sessions are built from a temporary file with external data (protobuf caps at 2 GB)."""


def clone_model(model: ir.Model) -> ir.Model:
    """An independent copy of a model's graph; weight tensors (immutable) are shared.

    Sharing keeps external-data tensors pointing at their files.

    Args:
        model: The model to copy.

    Returns:
        A new model whose graph, nodes and values can be edited without touching ``model``.
    """
    copy = ir.from_proto(ir.to_proto(model))
    for name, value in copy.graph.initializers.items():
        original = model.graph.initializers.get(name)
        if original is not None and original.const_value is not None:
            value.const_value = original.const_value
    return copy


def inline_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto with external-data weights read inline (files stay open)."""
    proto = ir.to_proto(model)
    by_name = {t.name: t for t in proto.graph.initializer}
    for name, value in model.graph.initializers.items():
        if isinstance(value.const_value, ir.ExternalTensor) and name in by_name:
            by_name[name].CopyFrom(onnx.numpy_helper.from_array(value.const_value.numpy(), name))
    return proto


def model_bytes(model: ir.Model) -> bytes:
    """Serialised model with every weight inline (for sessions built from memory)."""
    return inline_proto(model).SerializeToString()


@contextlib.contextmanager
def model_session(model: ir.Model, **options: Any) -> Iterator[ort.InferenceSession]:
    """An onnxruntime session for an in-memory model of any size.

    Args:
        model: The model; up to :data:`INLINE_LIMIT` bytes of weights it is serialised in memory,
            above that saved to a temporary folder with external data for the session's lifetime.
        options: Passed to :func:`graphprune.execution.sessions.make_session`.

    Yields:
        The session.
    """
    from graphprune.execution.sessions import make_session  # onnxruntime loads only when a session is made

    if weight_bytes(model) <= INLINE_LIMIT:
        yield make_session(model_bytes(model), **options)
        return
    with tempfile.TemporaryDirectory(prefix="graphprune-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        yield make_session(str(path), **options)


def node_name(node: ir.Node, index: int) -> str:
    """The name an op gets in the channel graph: its own, or op type and position."""
    return node.name or f"{node.op_type}_{index}"


def value_map(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the main graph: inputs, initializers and node outputs."""
    out: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    out.update(graph.initializers)
    for node in graph:
        out.update((o.name, o) for o in node.outputs if o.name)
    return out


def node_map(graph: ir.Graph) -> dict[str, ir.Node]:
    """Nodes by the names the frontend gave them (see :func:`node_name`)."""
    return {node_name(node, k): node for k, node in enumerate(graph)}


def new_const(graph: ir.Graph, base: str, arr: np.ndarray) -> ir.Value:
    """Register ``arr`` as a new initializer of ``graph`` named ``base`` (or ``base_1``, ``base_2``... if taken).

    Args:
        graph: Receives the initializer.
        base: Preferred name.
        arr: The value; its dtype is the initializer's.

    Returns:
        The new initializer value.
    """
    existing = set(graph.initializers)
    name, k = base, 0
    while name in existing:
        k += 1
        name = f"{base}_{k}"
    value = ir.Value(name=name, const_value=ir.tensor(arr, name=name), shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)))
    graph.register_initializer(value)
    return value
