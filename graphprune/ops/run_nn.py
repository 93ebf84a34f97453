"""Torch implementations of convolution, pooling, normalisation, matrix and
reduction ops with ONNX semantics (padding conventions, opset differences).

BatchNormalization here is the inference form; the interpreter switches it to
batch statistics when it is put in training mode.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from graphprune.ir.graph import OpNode
from graphprune.ops.registry import register_run
from graphprune.ops.run_tensor import ints

__all__ = ["explicit_pads"]

Args = list[Any]


def explicit_pads(
    node: OpNode, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]
) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis, resolving ``auto_pad``."""
    n = len(spatial)
    auto = str(node.attrs.get("auto_pad", "NOTSET"))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            out.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return out
    if auto == "VALID":
        return [(0, 0)] * n
    pads = [int(p) for p in node.attrs.get("pads", [0] * (2 * n))]
    return [(pads[i], pads[i + n]) for i in range(n)]


def _geometry(node: OpNode, x: torch.Tensor, kernel: list[int]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    n = len(kernel)
    strides = [int(s) for s in node.attrs.get("strides", [1] * n)]
    dilations = [int(d) for d in node.attrs.get("dilations", [1] * n)]
    pads = explicit_pads(node, list(x.shape[2:]), kernel, strides, dilations)
    return strides, dilations, pads


def _torch_pad(pads: list[tuple[int, int]]) -> list[int]:
    out: list[int] = []
    for begin, end in reversed(pads):
        out += [begin, end]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@register_run("Conv")
def _conv(node: OpNode, args: Args) -> tuple[Any, ...]:
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    kernel = list(w.shape[2:])
    strides, dilations, pads = _geometry(node, x, kernel)
    if any(p != q for p, q in pads):
        x, padding = F.pad(x, _torch_pad(pads)), [0] * len(pads)
    else:
        padding = [p for p, _ in pads]
    fn = _CONV[len(kernel)]
    return (fn(x, w, b, strides, padding, dilations, int(node.attrs.get("group", 1))),)


@register_run("ConvTranspose")
def _conv_transpose(node: OpNode, args: Args) -> tuple[Any, ...]:
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    kernel = list(w.shape[2:])
    n = len(kernel)
    if "output_shape" in node.attrs or str(node.attrs.get("auto_pad", "NOTSET")) != "NOTSET":
        raise NotImplementedError("ConvTranspose with output_shape or auto_pad")
    strides = [int(s) for s in node.attrs.get("strides", [1] * n)]
    dilations = [int(d) for d in node.attrs.get("dilations", [1] * n)]
    pads = [int(p) for p in node.attrs.get("pads", [0] * (2 * n))]
    extra = [int(p) for p in node.attrs.get("output_padding", [0] * n)]
    group = int(node.attrs.get("group", 1))
    y = _CONV_T[n](x, w, b, strides, 0, extra, group, dilations)
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[i + n]) for i in range(n)]
    return (y[tuple(index)],)


def _pool_pads(node: OpNode, x: torch.Tensor, kernel: list[int]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Strides, dilations and pads, with the ceil-mode overflow added to the end pads."""
    strides, dilations, pads = _geometry(node, x, kernel)
    if int(node.attrs.get("ceil_mode", 0)):
        grown = []
        for size, k, s, d, (p0, p1) in zip(x.shape[2:], kernel, strides, dilations, pads):
            span = size + p0 + p1 - ((k - 1) * d + 1)
            out = math.ceil(span / s) + 1
            if (out - 1) * s >= size + p0:
                out -= 1
            grown.append((p0, max(p1, (out - 1) * s + (k - 1) * d + 1 - size - p0)))
        pads = grown
    return strides, dilations, pads


_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@register_run("MaxPool")
def _max_pool(node: OpNode, args: Args) -> tuple[Any, ...]:
    if len(node.outputs) > 1 and node.outputs[1]:
        raise NotImplementedError("MaxPool with an indices output")
    x = args[0]
    kernel = [int(k) for k in node.attrs["kernel_shape"]]
    strides, dilations, pads = _pool_pads(node, x, kernel)
    x = F.pad(x, _torch_pad(pads), value=float("-inf"))
    return (_MAX[len(kernel)](x, kernel, strides, 0, dilations),)


@register_run("AveragePool")
def _avg_pool(node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    kernel = [int(k) for k in node.attrs["kernel_shape"]]
    if any(int(d) != 1 for d in node.attrs.get("dilations", [])):
        raise NotImplementedError("AveragePool with dilations")
    strides, _, explicit = _geometry(node, x, kernel)
    _, _, pads = _pool_pads(node, x, kernel)
    fn = _AVG[len(kernel)]
    total = fn(F.pad(x, _torch_pad(pads)), kernel, strides, 0)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if int(node.attrs.get("count_include_pad", 0)):
        ones = F.pad(ones, _torch_pad(explicit), value=1.0)
        overflow = [(0, p1 - e1) for (_, p1), (_, e1) in zip(pads, explicit)]
        ones = F.pad(ones, _torch_pad(overflow))
    else:
        ones = F.pad(ones, _torch_pad(pads))
    return (total / fn(ones, kernel, strides, 0),)


@register_run("GlobalAveragePool")
def _global_avg(_node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    return (x.mean(dim=tuple(range(2, x.dim())), keepdim=True),)


@register_run("GlobalMaxPool")
def _global_max(_node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    return (x.amax(dim=tuple(range(2, x.dim())), keepdim=True),)


@register_run("BatchNormalization")
def _batch_norm(node: OpNode, args: Args) -> tuple[Any, ...]:
    x, scale, bias, mean, var = args[:5]
    y = F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(node.attrs.get("epsilon", 1e-5)))
    return (y, *(mean, var)[:len(node.outputs) - 1])


@register_run("InstanceNormalization")
def _instance_norm(node: OpNode, args: Args) -> tuple[Any, ...]:
    x, scale, bias = args
    return (F.instance_norm(x, weight=scale, bias=bias, eps=float(node.attrs.get("epsilon", 1e-5))),)


@register_run("LayerNormalization")
def _layer_norm(node: OpNode, args: Args) -> tuple[Any, ...]:
    x, scale = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    axis = int(node.attrs.get("axis", -1)) % x.dim()
    eps = float(node.attrs.get("epsilon", 1e-5))
    shape = tuple(x.shape[axis:])
    y = F.layer_norm(x, shape, None, None, eps) * scale
    return (y + bias if bias is not None else y,)


@register_run("GroupNormalization")
def _group_norm(node: OpNode, args: Args) -> tuple[Any, ...]:
    x, scale, bias = args
    groups = int(node.attrs["num_groups"])
    eps = float(node.attrs.get("epsilon", 1e-5))
    if scale.numel() == groups and groups != x.shape[1]:
        per = x.shape[1] // groups
        scale, bias = scale.repeat_interleave(per), bias.repeat_interleave(per)
    return (F.group_norm(x, groups, scale, bias, eps),)


@register_run("LRN")
def _lrn(node: OpNode, args: Args) -> tuple[Any, ...]:
    a = node.attrs
    return (F.local_response_norm(args[0], int(a["size"]), float(a.get("alpha", 1e-4)),
                                  float(a.get("beta", 0.75)), float(a.get("bias", 1.0))),)


@register_run("Gemm")
def _gemm(node: OpNode, args: Args) -> tuple[Any, ...]:
    a, b = args[0], args[1]
    c = args[2] if len(args) > 2 else None
    if int(node.attrs.get("transA", 0)):
        a = a.t()
    if int(node.attrs.get("transB", 0)):
        b = b.t()
    y = float(node.attrs.get("alpha", 1.0)) * (a @ b)
    if c is not None:
        y = y + float(node.attrs.get("beta", 1.0)) * c
    return (y,)


@register_run("Attention")
def _attention(node: OpNode, args: Args) -> tuple[Any, ...]:
    q, k, v = args[:3]
    mask = args[3] if len(args) > 3 else None
    if q.dim() != 4:
        raise NotImplementedError("Attention with 3-D inputs")
    scale = node.attrs.get("scale")
    causal = bool(int(node.attrs.get("is_causal", 0)))
    if causal and mask is not None:  # ONNX adds both; torch takes one
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = (mask if mask.dtype != torch.bool else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf")))
        mask, causal = mask.masked_fill(~keep, float("-inf")), False
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                       scale=None if scale is None else float(scale), enable_gqa=q.shape[1] != k.shape[1])
    return (y,)


@register_run("MatMul")
def _matmul(_node: OpNode, args: Args) -> tuple[Any, ...]:
    return (torch.matmul(args[0], args[1]),)


def _reduce_axes(node: OpNode, args: Args, x: torch.Tensor) -> tuple[int, ...] | None:
    if "axes" in node.attrs:
        axes = [int(a) for a in node.attrs["axes"]]
    elif len(args) > 1 and args[1] is not None and args[1].numel():
        axes = ints(args[1])
    else:
        return None if int(node.attrs.get("noop_with_empty_axes", 0)) else tuple(range(x.dim()))
    return tuple(a % x.dim() for a in axes)


def _prod(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


_REDUCE = {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: (x * x).sum(dim=d, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(dim=d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


@register_run(*_REDUCE)
def _reduce(node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    axes = _reduce_axes(node, args, x)
    if axes is None:
        return (x,)
    return (_REDUCE[node.op_type](x, axes, bool(int(node.attrs.get("keepdims", 1)))),)


@register_run("Softmax", "LogSoftmax")
def _softmax(node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    fn = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    if node.opset >= 13:
        return (fn(x, dim=int(node.attrs.get("axis", -1))),)
    axis = int(node.attrs.get("axis", 1)) % x.dim()
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return (fn(flat, dim=1).reshape(x.shape),)


@register_run("Resize", "Upsample")
def _resize(node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    mode = str(node.attrs.get("mode", "nearest"))
    ctm = str(node.attrs.get("coordinate_transformation_mode", "half_pixel"))
    if node.op_type == "Upsample" or node.opset < 11:
        scales, sizes, ctm = args[1], None, "asymmetric"
    else:
        scales = args[2] if len(args) > 2 else None
        sizes = args[3] if len(args) > 3 else None
    if sizes is not None and sizes.numel():
        out = ints(sizes)[2:]
    else:
        factors = [float(s) for s in scales.reshape(-1).tolist()][2:]
        out = [math.floor(d * f) for d, f in zip(x.shape[2:], factors)]
    if mode == "nearest" and ctm == "asymmetric" and str(node.attrs.get("nearest_mode", "round_prefer_floor")) == "floor":
        return (F.interpolate(x, size=out, mode="nearest"),)
    if mode == "nearest" and ctm == "asymmetric" and node.op_type == "Upsample":
        return (F.interpolate(x, size=out, mode="nearest"),)
    if mode == "linear" and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        kind = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(out)]
        return (F.interpolate(x, size=out, mode=kind, align_corners=ctm == "align_corners"),)
    raise NotImplementedError(f"Resize mode={mode} coordinate_transformation_mode={ctm}")
