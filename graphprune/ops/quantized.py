"""Quantized ops: QDQ pairs, the QOperator ops, and com.microsoft MatMulNBits.

A quantization parameter (scale, zero point) is either per-tensor (a scalar,
or a 1-element vector) and then left untouched, or per-axis (a vector with
one entry per channel of one axis) and then linked to that axis, so that it
is sliced with its channels. Anything else freezes with the reason. The
QOperator ops have the channel mapping of their float op: their handlers call
the float handler on the float op's inputs (:func:`_as_float`) and add the
links of their quantization parameters.

QuantizeLinear and DequantizeLinear also run in the interpreter (so the
effective filter analysis and recovery run on a QDQ model): quantization is
simulated in float with a straight-through gradient (identity inside the
representable range, zero where it saturates), as in quantization-aware
training. The interpreter's quantized tensors hold the integer values in the
input's float dtype.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from graphprune.ir.graph import Axis, ChannelGraph, OpNode
from graphprune.ops._common import broadcast_links, freeze_axes, freeze_node, identity_links, needs_shapes, norm_axis
from graphprune.ops.conv import _conv_adjust, _conv_macs, conv
from graphprune.ops.linear import _gemm_macs, _matmul_macs, gemm, matmul
from graphprune.ops.norm import pool
from graphprune.ops.registry import AdjustContext, Adjustment, CoupleFn, Freeze, Link, Semantics, register, register_run
from graphprune.ops.shape import concat

__all__ = ["matmul_nbits", "qdq", "qlinear_conv", "qlinear_elementwise", "qlinear_matmul"]

MS = "com.microsoft"


def _input(node: OpNode, index: int) -> str:
    return node.inputs[index] if index < len(node.inputs) else ""


def _per_tensor(graph: ChannelGraph, name: str) -> bool:
    """An absent parameter, a scalar or a 1-element vector: one value for the whole tensor."""
    shape = graph.shape(name) if name else ()
    return shape is not None and (len(shape) == 0 or (len(shape) == 1 and shape[0] == 1))


def _param_links(node: OpNode, graph: ChannelGraph, params: Sequence[int], target: Axis) -> list[Link] | str:
    """Links of per-axis parameters (inputs ``params``) to ``target``, or why they cannot be linked."""
    size = graph.shape(target.tensor)[target.axis]  # type: ignore[index]
    links: list[Link] = []
    for index in params:
        name = _input(node, index)
        if _per_tensor(graph, name):
            continue
        shape = graph.shape(name)
        if shape is None or len(shape) != 1 or shape[0] != size:
            return f"{node.op_type}: quantization parameter '{name}' of shape {shape} is neither per-tensor nor per-channel"
        if graph.const(name) is None:
            return f"{node.op_type}: per-channel quantization parameter '{name}' is computed at run time"
        links.append(Link(Axis(name, 0), target))
    return links


def _scalars(node: OpNode, graph: ChannelGraph, params: Sequence[int]) -> str | None:
    """Why parameters that must be per-tensor are not, or None."""
    for index in params:
        name = _input(node, index)
        if not _per_tensor(graph, name):
            return f"{node.op_type}: quantization parameter '{name}' is not per-tensor"
    return None


def _as_float(node: OpNode, inputs: Sequence[int]) -> OpNode:
    """The float op's view of a quantized node: only its data inputs, in the float op's order."""
    return dataclasses.replace(node, inputs=tuple(_input(node, i) for i in inputs))


def _with(sem: Semantics, links: Sequence[Link] = (), freezes: Sequence[Freeze] = ()) -> Semantics:
    return dataclasses.replace(sem, links=sem.links + tuple(links), freezes=sem.freezes + tuple(freezes))


@register("QuantizeLinear", zero_point=2)
@register("DequantizeLinear")
def qdq(node: OpNode, graph: ChannelGraph) -> Semantics:
    """y = quantize(x) element for element: every axis passes; per-axis scale/zero point follow ``axis``."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y, *node.inputs[1:3]])
    if missing is not None:
        return missing
    if int(node.attrs.get("block_size", 0)):
        return freeze_node(node, graph, f"{node.op_type}: blocked quantization (block_size) is not supported")
    rank = len(graph.shape(x) or ())
    links = identity_links(x, y, ((i, i) for i in range(rank)))
    if all(_per_tensor(graph, _input(node, i)) for i in (1, 2)):
        return Semantics(links=tuple(links))
    if rank == 0 or node.opset < 13:
        return freeze_node(node, graph, f"{node.op_type}: a non-scalar scale needs opset 13 and a tensor")
    axis = norm_axis(int(node.attrs.get("axis", 1)), rank)
    found = _param_links(node, graph, (1, 2), Axis(y, axis))
    if isinstance(found, str):
        return freeze_node(node, graph, found)
    return Semantics(links=tuple(links + found))



# ONNX tensor types a QuantizeLinear may produce (its zero point's type, ``output_dtype``, else uint8).
_QRANGE: dict[torch.dtype, tuple[int, int]] = {
    torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767), torch.int32: (-2**31, 2**31 - 1),
}
_ONNX_QTYPE = {2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16}


def _along(param: torch.Tensor, x: torch.Tensor, node: OpNode) -> torch.Tensor:
    """A scale or zero point shaped to broadcast over ``x``: per-tensor as is, per-axis along ``axis``."""
    if param.dim() == 0 or param.numel() == 1:
        return param.reshape(())
    if int(node.attrs.get("block_size", 0)):
        raise NotImplementedError(f"{node.op_type}: blocked quantization (block_size)")
    shape = [1] * x.dim()
    shape[norm_axis(int(node.attrs.get("axis", 1)), x.dim())] = param.numel()
    return param.reshape(shape)


def _qrange(node: OpNode, zero_point: torch.Tensor | None) -> tuple[int, int]:
    dtype = zero_point.dtype if zero_point is not None else _ONNX_QTYPE.get(int(node.attrs.get("output_dtype", 2)), torch.uint8)
    if dtype == torch.uint16:
        return 0, 65535
    if dtype not in _QRANGE:
        raise NotImplementedError(f"QuantizeLinear to {dtype}")
    return _QRANGE[dtype]


@register_run("QuantizeLinear")
def _quantize_linear(node: OpNode, args: list[torch.Tensor | None]) -> tuple[torch.Tensor]:
    """saturate(round(x / scale) + zero_point), in x's float dtype; straight-through gradient inside the range."""
    x, scale = args[0], args[1]
    zp = args[2] if len(args) > 2 else None
    assert x is not None and scale is not None
    lo, hi = _qrange(node, zp)
    s = _along(scale.to(x.dtype), x, node)
    z = _along(zp.to(x.dtype), x, node) if zp is not None else torch.zeros((), dtype=x.dtype, device=x.device)
    linear = torch.clamp(x / s + z, lo, hi)
    q = torch.clamp(torch.round(x / s) + z, lo, hi)  # torch.round rounds half to even, as ONNX does
    return (linear + (q - linear).detach(),)


@register_run("DequantizeLinear")
def _dequantize_linear(node: OpNode, args: list[torch.Tensor | None]) -> tuple[torch.Tensor]:
    """(x - zero_point) * scale in the scale's dtype."""
    x, scale = args[0], args[1]
    zp = args[2] if len(args) > 2 else None
    assert x is not None and scale is not None
    xf = x.to(scale.dtype)
    if zp is not None:
        xf = xf - _along(zp.to(scale.dtype), xf, node)
    return (xf * _along(scale, xf, node),)

# QLinearConv: x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, [B]
def _qconv_adjust(node: OpNode, ctx: AdjustContext) -> Adjustment:
    return _conv_adjust(_as_float(node, (0, 3, 8)), ctx)


def _qconv_macs(node: OpNode, graph: ChannelGraph) -> int:
    return _conv_macs(_as_float(node, (0, 3, 8)), graph)


def _requantized(node: OpNode, graph: ChannelGraph, float_op: CoupleFn, data: Sequence[int], scalars: Sequence[int],
                 last_axis: bool = False) -> Semantics:
    """A QOperator op as its float op on the ``data`` inputs; the scales and zero points at ``scalars`` must be
    per-tensor, the weight's (inputs 4, 5) per-tensor or along the output's channel axis (1, or the last one)."""
    y = node.outputs[0]
    missing = needs_shapes(node, graph, [y, *node.inputs])
    if missing is not None:
        return missing
    why = _scalars(node, graph, scalars)
    rank = len(graph.shape(y) or ())
    if why is None and last_axis and rank < 2:
        why = f"{node.op_type}: 1-D operands are not supported"
    found = _param_links(node, graph, (4, 5), Axis(y, rank - 1 if last_axis else 1)) if why is None else why
    if isinstance(found, str):
        return freeze_node(node, graph, found)
    return _with(float_op(_as_float(node, data), graph), found)


@register("QLinearConv", adjust=_qconv_adjust, macs=_qconv_macs, zero_point=7)
def qlinear_conv(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Conv's channel map on (x, w, B); w_scale/w_zp per-tensor or per output channel."""
    return _requantized(node, graph, conv, (0, 3, 8), (1, 2, 6, 7))


# QLinearMatMul: a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp
@register("QLinearMatMul", zero_point=7, macs=lambda node, graph: _matmul_macs(_as_float(node, (0, 3)), graph))
def qlinear_matmul(node: OpNode, graph: ChannelGraph) -> Semantics:
    """MatMul's channel map on (a, b); b_scale/b_zp per-tensor or per column (2-D b)."""
    return _requantized(node, graph, matmul, (0, 3), (1, 2, 6, 7), last_axis=True)


# com.microsoft QGemm: A, a_scale, a_zp, B, b_scale, b_zp, [C], [y_scale], [y_zp]
@register("QGemm", domain=MS, zero_point=8, macs=lambda node, graph: _gemm_macs(_as_float(node, (0, 3)), graph))
def qgemm(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Gemm's channel map on (A, B, C); b_scale/b_zp per-tensor or per column of B'."""
    return _requantized(node, graph, gemm, (0, 3, 6), (1, 2, 7, 8))


# com.microsoft element-wise ops: (data input indices, scale/zero-point indices)
_ELEMENTWISE = {
    "QLinearAdd": ((0, 3), (1, 2, 4, 5, 6, 7)),
    "QLinearMul": ((0, 3), (1, 2, 4, 5, 6, 7)),
    "QLinearLeakyRelu": ((0,), (1, 2, 3, 4)),
    "QLinearSigmoid": ((0,), (1, 2, 3, 4)),
}


@register("QLinearAdd", "QLinearMul", domain=MS, zero_point=7)
@register("QLinearLeakyRelu", "QLinearSigmoid", domain=MS, zero_point=4)
def qlinear_elementwise(node: OpNode, graph: ChannelGraph) -> Semantics:
    """The float op's broadcasting on the data inputs; every scale and zero point per-tensor."""
    data, params = _ELEMENTWISE[node.op_type]
    missing = needs_shapes(node, graph, [*node.outputs, *node.inputs])
    if missing is not None:
        return missing
    why = _scalars(node, graph, params)
    if why is not None:
        return freeze_node(node, graph, why)
    return broadcast_links(node, graph, [_input(node, i) for i in data])


# com.microsoft QLinearConcat: y_scale, y_zp, then (x, x_scale, x_zp) per input
@register("QLinearConcat", domain=MS, zero_point=1)
def qlinear_concat(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Concat's channel map on the data inputs; every scale and zero point per-tensor."""
    missing = needs_shapes(node, graph, [*node.outputs, *node.inputs])
    if missing is not None:
        return missing
    data = range(2, len(node.inputs), 3)
    why = _scalars(node, graph, [i for i in range(len(node.inputs)) if i not in data])
    if why is not None:
        return freeze_node(node, graph, why)
    return concat(_as_float(node, data), graph)


# com.microsoft QLinearGlobalAveragePool: x, x_scale, x_zp, y_scale, y_zp
@register("QLinearGlobalAveragePool", domain=MS, zero_point=4)
def qlinear_global_average_pool(node: OpNode, graph: ChannelGraph) -> Semantics:
    """GlobalAveragePool's channel map (channels first); per-tensor scales."""
    missing = needs_shapes(node, graph, [*node.outputs, *node.inputs])
    if missing is not None:
        return missing
    why = _scalars(node, graph, (1, 2, 3, 4))
    if why is None and int(node.attrs.get("channels_last", 0)):
        why = "QLinearGlobalAveragePool: channels_last layout is not supported"
    if why is not None:
        return freeze_node(node, graph, why)
    return pool(_as_float(node, (0,)), graph)


# com.microsoft MatMulNBits: A, B (N, n_blocks, blob), scales, [zero_points], [g_idx], [bias]
def _nbits_adjust(node: OpNode, ctx: AdjustContext) -> Adjustment:
    """The N attribute follows the output's last axis."""
    y = node.outputs[0]
    rank = len(ctx.graph.shape(y) or ())
    n = ctx.new_size(Axis(y, rank - 1)) if rank else None
    return Adjustment(attrs={"N": n}) if n is not None and n != int(node.attrs["N"]) else Adjustment()


def _rows(graph: ChannelGraph, name: str, n: int, y_last: Axis) -> Link | str:
    """Link a per-row parameter (n rows, stored (n, m) or flat (n*m,)) to the output channels."""
    shape = graph.shape(name)
    first = shape[0] if shape else None
    if shape is None or not isinstance(first, int) or first % n:
        return f"MatMulNBits: '{name}' of shape {shape} has no row per output channel"
    if len(shape) == 1:
        m = first // n
        rows = np.repeat(np.arange(n), m)
        return Link(Axis(name, 0), y_last, np.arange(n * m), rows)
    return Link(Axis(name, 0), y_last)


@register("MatMulNBits", domain=MS, adjust=_nbits_adjust)
def matmul_nbits(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Y = A @ dequant(B)^T: output channels (rows of B) prune exactly; K is packed in blocks and freezes."""
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    missing = needs_shapes(node, graph, [a, b, y])
    if missing is not None:
        return missing
    if _input(node, 4):
        return freeze_node(node, graph, "MatMulNBits: g_idx (act-order) reorders the input channels")
    ra, ry = len(graph.shape(a) or ()), len(graph.shape(y) or ())
    n = int(node.attrs["N"])
    y_last = Axis(y, ry - 1)
    links = identity_links(a, y, ((i, i) for i in range(ra - 1)))
    links.append(Link(Axis(b, 0), y_last))
    for index in (2, 3, 5):
        name = _input(node, index)
        if name:
            found = _rows(graph, name, n, y_last)
            if isinstance(found, str):
                return freeze_node(node, graph, found)
            links.append(found)
    reason = "MatMulNBits: input channels (K) are packed in blocks; only output channels (N) are pruned"
    rb = len(graph.shape(b) or ())
    return Semantics(links=tuple(links), freezes=freeze_axes([Axis(a, ra - 1), *(Axis(b, i) for i in range(1, rb))], reason))
