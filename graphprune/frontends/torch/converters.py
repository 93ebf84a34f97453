"""aten -> ONNX-form converters for the torch frontend (one per aten target family).

Each converter appends the op-table ops that compute the same thing, so the
coupling handlers, the cost model and the interpreter need no torch variant.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from graphprune.frontends.torch.builder import Builder, converts
from graphprune.frontends.torch.builder import arg as _arg
from graphprune.frontends.torch.builder import pair as _pair
from graphprune.ir.graph import OpNode

__all__: list[str] = []

Node = torch.fx.Node


def _shape_const(b: Builder, node: Node, out: str) -> str:
    """A Reshape target for ``node``'s output: a leading batch dim copied (0), other dims static."""
    shape = b.tensors[out].shape or ()
    src = b.tensors.get(b.name(node.args[0]))
    dims = []
    for i, d in enumerate(shape):
        if i == 0 and src is not None and src.shape and src.shape[0] == d:
            dims.append(0)
        elif isinstance(d, int):
            dims.append(d)
        else:
            dims.append(-1)
    return b.const(out, dims, np.int64)


@converts("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default")
def _conv(b: Builder, node: Node, out: str) -> None:
    x, w = b.name(node.args[0]), b.name(node.args[1])
    bias = _arg(node, 2, "bias", None)
    n = len(b.tensors[w].shape or ()) - 2
    stride, padding = _pair(_arg(node, 3, "stride", 1), n), _arg(node, 4, "padding", 0)
    dilation, groups = _pair(_arg(node, 5, "dilation", 1), n), int(_arg(node, 6, "groups", 1))
    attrs: dict[str, Any] = {"strides": stride, "dilations": dilation, "group": groups}
    if isinstance(padding, str):
        attrs["auto_pad"] = {"same": "SAME_UPPER", "valid": "VALID"}[padding]
    else:
        p = _pair(padding, n)
        attrs["pads"] = p + p
    inputs = [x, w] + ([b.name(bias)] if bias is not None else [])
    b.add(out, "Conv", inputs, [out], **attrs)


@converts("aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.conv_transpose3d.input")
def _conv_transpose(b: Builder, node: Node, out: str) -> None:
    x, w = b.name(node.args[0]), b.name(node.args[1])
    bias = _arg(node, 2, "bias", None)
    n = len(b.tensors[w].shape or ()) - 2
    pads = _pair(_arg(node, 4, "padding", 0), n)
    attrs = {"strides": _pair(_arg(node, 3, "stride", 1), n), "pads": pads + pads,
             "output_padding": _pair(_arg(node, 5, "output_padding", 0), n), "group": int(_arg(node, 6, "groups", 1)),
             "dilations": _pair(_arg(node, 7, "dilation", 1), n)}
    b.add(out, "ConvTranspose", [x, w] + ([b.name(bias)] if bias is not None else []), [out], **attrs)


@converts("aten.group_norm.default")
def _group_norm(b: Builder, node: Node, out: str) -> None:
    x, groups = b.name(node.args[0]), int(node.args[1])
    w, bias = _arg(node, 2, "weight", None), _arg(node, 3, "bias", None)
    c = int((b.tensors[x].shape or (0, 0))[1])  # type: ignore[arg-type]
    scale = b.name(w) if w is not None else b.const(out, np.ones(c, np.float32))
    shift = b.name(bias) if bias is not None else b.const(out, np.zeros(c, np.float32))
    b.add(out, "GroupNormalization", [x, scale, shift], [out], num_groups=groups, epsilon=float(_arg(node, 4, "eps", 1e-5)))


@converts("aten.linear.default")
def _linear(b: Builder, node: Node, out: str) -> None:
    x, w = b.name(node.args[0]), b.name(node.args[1])
    bias = _arg(node, 2, "bias", None)
    wshape = b.tensors[w].shape or ()
    b.tensor(f"{out}.wT", tuple(reversed(wshape)), b.tensors[w].dtype, "activation")
    b.add(f"{out}.t", "Transpose", [w], [f"{out}.wT"], perm=(1, 0))
    if bias is None:
        b.add(out, "MatMul", [x, f"{out}.wT"], [out])
        return
    b.tensor(f"{out}.mm", b.tensors[out].shape, b.tensors[out].dtype, "activation")
    b.add(f"{out}.matmul", "MatMul", [x, f"{out}.wT"], [f"{out}.mm"])
    b.add(out, "Add", [f"{out}.mm", b.name(bias)], [out])


@converts("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")
def _batch_norm(b: Builder, node: Node, out: str) -> None:
    x, w, bias, mean, var = (b.name(a) for a in node.args[:5])
    eps = float(node.args[7] if str(node.target).startswith("aten.batch_norm") else node.args[6])
    outs = [out] if out in b.tensors else [f"{out}.0"]
    b.add(out, "BatchNormalization", [x, w, bias, mean, var], outs, epsilon=eps)


@converts("aten.layer_norm.default")
def _layer_norm(b: Builder, node: Node, out: str) -> None:
    x, shape = b.name(node.args[0]), list(node.args[1])
    w, bias = _arg(node, 2, "weight", None), _arg(node, 3, "bias", None)
    eps = float(_arg(node, 4, "eps", 1e-5))
    w_name = b.const(out, np.ones(shape, np.float32)) if w is None else b.name(w)
    inputs = [x, w_name] + ([b.name(bias)] if bias is not None else [])
    b.add(out, "LayerNormalization", inputs, [out], axis=-len(shape), epsilon=eps)


def _unary(op: str, **attrs: Any) -> Any:
    def conv(b: Builder, node: Node, out: str) -> None:
        b.add(out, op, [b.name(node.args[0])], [out], **attrs)
    return conv


for _target, _op in {"relu": "Relu", "relu_": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh",
                     "clone": "Identity", "contiguous": "Identity", "dropout": "Identity", "erf": "Erf", "exp": "Exp",
                     "sqrt": "Sqrt", "neg": "Neg", "abs": "Abs", "alias": "Identity", "detach": "Identity"}.items():
    converts(f"aten.{_target}.default")(_unary(_op))


@converts("aten.gelu.default")
def _gelu(b: Builder, node: Node, out: str) -> None:
    b.add(out, "Gelu", [b.name(node.args[0])], [out], approximate=str(node.kwargs.get("approximate", "none")))


@converts("aten.hardtanh.default", "aten.hardtanh_.default")
def _hardtanh(b: Builder, node: Node, out: str) -> None:
    lo, hi = float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0))
    b.add(out, "Clip", [b.name(node.args[0]), b.const(out, lo), b.const(out, hi)], [out])


def _operand(b: Builder, a: Any, out: str) -> str:
    return b.name(a) if isinstance(a, Node) else b.const(out, float(a))


@converts("aten.add.Tensor", "aten.add_.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.mul_.Tensor", "aten.div.Tensor")
def _binary(b: Builder, node: Node, out: str) -> None:
    op = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}[str(node.target).split(".")[1].rstrip("_")]
    x, y = _operand(b, node.args[0], out), _operand(b, node.args[1], out)
    alpha = node.kwargs.get("alpha", 1)
    if alpha != 1 and op in ("Add", "Sub"):
        scaled = f"{out}.alpha"
        b.tensor(scaled, b.tensors[y].shape, b.tensors[y].dtype, "activation")
        b.add(scaled, "Mul", [y, b.const(out, float(alpha))], [scaled])
        y = scaled
    b.add(out, op, [x, y], [out])


@converts("aten.cat.default", "aten.concat.default")
def _cat(b: Builder, node: Node, out: str) -> None:
    dim = int(_arg(node, 1, "dim", 0))
    rank = len(b.tensors[out].shape or ())
    b.add(out, "Concat", [b.name(a) for a in node.args[0]], [out], axis=dim % rank if rank else dim)


@converts("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default")
def _split(b: Builder, node: Node, out: str) -> None:
    x = b.name(node.args[0])
    n_out = len(node.meta["val"])
    outs = [f"{out}.{i}" for i in range(n_out)]
    dim = int(_arg(node, 2, "dim", 0))
    rank = len(b.tensors[x].shape or ())
    sizes = [int(b.tensors[o].shape[dim]) for o in outs]  # type: ignore[index]
    b.add(out, "Split", [x, b.const(out, sizes, np.int64)], outs, axis=dim % rank)


@converts("aten.flatten.using_ints", "aten.unflatten.int", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
def _reshape(b: Builder, node: Node, out: str) -> None:
    b.add(out, "Reshape", [b.name(node.args[0]), _shape_const(b, node, out)], [out])


@converts("aten.permute.default")
def _permute(b: Builder, node: Node, out: str) -> None:
    rank = len(b.tensors[out].shape or ())
    b.add(out, "Transpose", [b.name(node.args[0])], [out], perm=tuple(int(d) % rank for d in node.args[1]))


@converts("aten.transpose.int")
def _transpose(b: Builder, node: Node, out: str) -> None:
    rank = len(b.tensors[out].shape or ())
    perm = list(range(rank))
    i, j = int(node.args[1]) % rank, int(node.args[2]) % rank
    perm[i], perm[j] = perm[j], perm[i]
    b.add(out, "Transpose", [b.name(node.args[0])], [out], perm=tuple(perm))


@converts("aten.matmul.default", "aten.mm.default", "aten.bmm.default")
def _matmul(b: Builder, node: Node, out: str) -> None:
    b.add(out, "MatMul", [b.name(node.args[0]), b.name(node.args[1])], [out])


@converts("aten.scaled_dot_product_attention.default")
def _sdpa(b: Builder, node: Node, out: str) -> None:
    mask = _arg(node, 3, "attn_mask", None)
    scale = _arg(node, 6, "scale", None)
    attrs: dict[str, Any] = {"is_causal": int(bool(_arg(node, 5, "is_causal", False)))}
    if scale is not None:
        attrs["scale"] = float(scale)
    inputs = [b.name(a) for a in node.args[:3]] + ([b.name(mask)] if mask is not None else [])
    b.add(out, "Attention", inputs, [out], **attrs)


@converts("aten.softmax.int", "aten._softmax.default")
def _softmax(b: Builder, node: Node, out: str) -> None:
    b.add(out, "Softmax", [b.name(node.args[0])], [out], axis=int(node.args[1]))


@converts("aten.mean.dim", "aten.sum.dim_IntList")
def _reduce(b: Builder, node: Node, out: str) -> None:
    op = "ReduceMean" if str(node.target).startswith("aten.mean") else "ReduceSum"
    x = b.name(node.args[0])
    rank = len(b.tensors[x].shape or ())
    axes = [int(a) % rank for a in (node.args[1] if node.args[1] is not None else range(rank))]
    keep = int(bool(_arg(node, 2, "keepdim", False)))
    b.add(out, op, [x, b.const(out, axes, np.int64)], [out], keepdims=keep)


@converts("aten.adaptive_avg_pool2d.default", "aten.adaptive_avg_pool1d.default")
def _adaptive(b: Builder, node: Node, out: str) -> None:
    x = b.name(node.args[0])
    size = _pair(node.args[1], len(b.tensors[x].shape or ()) - 2)
    if all(s == 1 for s in size):
        b.add(out, "GlobalAveragePool", [x], [out])
    else:  # not in the table: the channels freeze
        b.nodes.append(OpNode(out, "aten", str(node.target), (x,), (out,), {}, 1))


@converts("aten.max_pool2d.default", "aten.max_pool1d.default", "aten.avg_pool2d.default", "aten.avg_pool1d.default")
def _pool(b: Builder, node: Node, out: str) -> None:
    x = b.name(node.args[0])
    n = len(b.tensors[x].shape or ()) - 2
    kernel = _pair(node.args[1], n)
    stride_arg = _arg(node, 2, "stride", None)
    stride = _pair(stride_arg, n) if stride_arg not in (None, []) else kernel
    pad = _pair(_arg(node, 3, "padding", 0), n)
    if "max_pool" in str(node.target):
        dilation, ceil = _pair(_arg(node, 4, "dilation", 1), n), bool(_arg(node, 5, "ceil_mode", False))
        b.add(out, "MaxPool", [x], [out], kernel_shape=kernel, strides=stride, pads=pad + pad, dilations=dilation, ceil_mode=int(ceil))
    else:
        ceil, include = bool(_arg(node, 4, "ceil_mode", False)), bool(_arg(node, 5, "count_include_pad", True))
        b.add(out, "AveragePool", [x], [out], kernel_shape=kernel, strides=stride, pads=pad + pad, ceil_mode=int(ceil),
              count_include_pad=int(include))

