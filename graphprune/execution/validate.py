"""Validation of a pruned ONNX model: checker, shape inference, runs, exactness."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphprune.errors import ValidationError
from graphprune.execution.exactness import compare_outputs
from graphprune.execution.sessions import make_session, providers
from graphprune.frontends.onnx import OnnxModel, check_onnx
from graphprune.ir.graph import Axis, ChannelGraph
from graphprune.ir.masks import keep_masks
from graphprune.ir.onnx import clone_model, model_session, new_const, value_map
from graphprune.ops import lookup

__all__ = ["ValidationReport", "compare_outputs", "masked_model", "validate_pruned"]


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    """What was checked and what was seen.

    Attributes:
        provider: onnxruntime execution provider used.
        exact: Whether the masked-original comparison ran and held.
        max_abs_error: Largest output difference against the masked original.
    """

    provider: str
    exact: bool | None
    max_abs_error: float | None


def _signature(graph: ChannelGraph, names: tuple[str, ...]) -> list[tuple[str, int | None, str]]:
    return [(n, graph.tensors[n].rank, graph.tensors[n].dtype) for n in names]


def validate_pruned(
    original: OnnxModel,
    pruned_path: Path,
    feeds: Mapping[str, np.ndarray],
    kept: Mapping[Axis, np.ndarray] | None = None,
) -> ValidationReport:
    """Check a pruned model file; with ``kept``, also check exactness.

    Raises:
        ValidationError: On any failed check.
    """
    try:
        check_onnx(pruned_path, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ValidationError(f"pruned model fails onnx.checker: {str(exc).splitlines()[0][:200]}") from None
    try:
        session = make_session(str(pruned_path))
        outs = session.run(None, dict(feeds))
    except Exception as exc:  # noqa: BLE001
        raise ValidationError(f"pruned model does not run on onnxruntime: {str(exc).splitlines()[0][:200]}") from None
    g = original.graph
    got_in = [(i.name, len(i.shape)) for i in session.get_inputs()]
    want_in = [(n, g.tensors[n].rank) for n in g.inputs]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != want_in or got_out != list(g.outputs):
        raise ValidationError("pruned model's inputs or outputs differ from the original's")
    exact, err = None, None
    if kept is not None:
        quantized = _is_quantized(original)
        if quantized:  # onnxruntime fuses QDQ into integer kernels that the masking nodes keep apart: compare unfused
            outs = make_session(str(pruned_path), optimize=False).run(None, dict(feeds))
        with model_session(masked_model(original, kept), optimize=not quantized) as reference:
            expected = reference.run(None, dict(feeds))
        err = compare_outputs(expected, outs, list(g.outputs))
        exact = True
    return ValidationReport(providers()[0], exact, err)


def _is_quantized(om: OnnxModel) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in om.graph.nodes)


def masked_model(om: OnnxModel, kept: Mapping[Axis, np.ndarray]) -> ir.Model:
    """The original model with every removed channel zeroed on every activation of its group.

    Each masked activation is followed by ``Where(mask, x, 0)`` (masks from :func:`graphprune.ir.masks.keep_masks`);
    a quantized (integer) activation is filled with its zero point, the value that stands for 0.
    """
    model = clone_model(om.model)
    graph = model.graph
    values = value_map(graph)
    masks = keep_masks(om.graph, kept, kinds=("activation",))
    for name, mask in masks.items():
        x = values[name]
        zero = np.zeros((), x.dtype.numpy() if x.dtype is not None else np.float32)
        if x.dtype is None or not x.dtype.is_floating_point():
            zp = _zero_point(x)
            zero = zp if zp is not None else zero
        mask_v = new_const(graph, f"{name}__mask", mask)
        zero_v = new_const(graph, f"{name}__zero", zero)
        where = ir.Node("", "Where", [mask_v, x, zero_v], name=f"{name}__masking")
        where.outputs[0].name = f"{name}__masked"
        x.replace_all_uses_with(where.outputs[0])
        where.replace_input_with(1, x)
        producer = x.producer()
        assert producer is not None
        graph.insert_after(producer, where)
    return model


def _zero_point(x: ir.Value, depth: int = 16) -> np.ndarray | None:
    """The value standing for 0 in a quantized tensor: its producer's output zero point (op table), looked for
    through ops that only move values (pooling, reshapes: same element type in and out); None for other tensors."""
    for _ in range(depth):
        node = x.producer()
        if node is None or not node.inputs or node.inputs[0] is None:
            return None
        spec = lookup(node.domain, node.op_type)
        if spec is not None and spec.zero_point is not None:
            zp = node.inputs[spec.zero_point] if spec.zero_point < len(node.inputs) else None
            value = zp.const_value if zp is not None else None
            arr = value.numpy() if value is not None else None
            return arr.reshape(()) if arr is not None and arr.size == 1 else None
        if spec is None or spec.couple is None or node.inputs[0].dtype not in (x.dtype, None):
            return None
        x = node.inputs[0]
    return None
