"""Symbolic shape inference: shapes computed at run time (``Shape -> Gather -> Div -> Concat -> Reshape``).

ONNX shape inference leaves a Reshape whose target is computed from
``Shape`` with unknown dims (``unk__3``), and a transformer's head split
then looks unmatched. onnxruntime's symbolic shape inference (shipped with
onnxruntime, built on sympy) evaluates that arithmetic, the ``com.microsoft``
fused ops included: its dims are ints, input dim names, or expressions of
them (``4*batch``). Only integer constants travel to it; weights are given
as typed inputs, so a model with large (or external) weights costs no copy.
"""
from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

from graphprune.errors import short_message
from graphprune.ir.graph import Dim

__all__ = ["symbolic_shapes"]

log = logging.getLogger(__name__)

_SHAPE_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
_MAX_CONST_ELEMENTS = 4096
"""Integer initializers up to this size are passed with their values (shape vectors, indices)."""


def symbolic_shapes(model: ir.Model) -> dict[str, tuple[Dim, ...]]:
    """Shapes of every value onnxruntime's symbolic inference resolves.

    Returns:
        Value name -> dims (int, or a symbol / expression as a string); {} when
        the inference fails (it is best effort: the caller keeps ONNX's shapes).
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        proto = _shape_only_proto(model)
        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=False)
    except Exception as exc:  # noqa: BLE001 - any failure leaves the ONNX shapes in place
        log.debug("symbolic shape inference failed: %s", short_message(exc))
        return {}
    if inferred is None:
        return {}
    out: dict[str, tuple[Dim, ...]] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.output):
        dims = _dims(vi)
        if dims is not None:
            out[vi.name] = dims
    return out


def _dims(vi: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.dim_param and not d.dim_param.startswith("unk__"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _shape_only_proto(model: ir.Model) -> onnx.ModelProto:
    """The model with weights turned into typed graph inputs (small integer constants keep their values)."""
    proto = ir.to_proto(model)
    keep: list[onnx.TensorProto] = []
    for init in proto.graph.initializer:
        small_int = init.data_type in _SHAPE_TYPES and init.data_location != onnx.TensorProto.EXTERNAL
        n = 1
        for d in init.dims:
            n *= d
        if small_int and n <= _MAX_CONST_ELEMENTS:
            keep.append(init)
            continue
        proto.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    proto.graph.ClearField("value_info")
    return proto
