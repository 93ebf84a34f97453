"""aten -> ONNX-form converters for the torch frontend (one per aten target family).

Each converter appends the op-table ops that compute the same thing, so the
coupling handlers, the cost model and the interpreter need no torch variant.
Each registration names the table ops it writes (they list its targets as
their ``torch_targets``), and each converted op records which aten argument
its attributes and constant inputs came from (``attr_args`` / ``input_args``),
so the ``.pt2`` backend can apply the table's adjustments to the call.
The attention stand-in's module hook is registered on the table's
``Attention`` entry here, next to the converter that writes that op.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from graphprune.frontends.torch.attention import HeadPrunableAttention
from graphprune.frontends.torch.builder import (
    Builder,
    Converter,
    NotConverted,
    arg,
    arg_ref,
    converts,
    float_arg,
    int_arg,
    ints_arg,
    pair,
)
from graphprune.ir.dtypes import by_name, numpy_dtype
from graphprune.ir.graph import OpNode
from graphprune.ops import ModuleRule, register_module_rule

__all__: list[str] = []

Node = torch.fx.Node


def _rank(b: Builder, name: str) -> int:
    return len(b.tensors[name].shape or ())


def _shape_const(b: Builder, node: Node, out: str) -> str:
    """A Reshape target for ``node``'s output: a leading batch dim copied (0), other dims static."""
    shape = b.tensors[out].shape or ()
    src = b.tensors.get(b.name(node.args[0]))
    dims: list[int] = []
    for i, d in enumerate(shape):
        if i == 0 and src is not None and src.shape and src.shape[0] == d:
            dims.append(0)
        elif isinstance(d, int):
            dims.append(d)
        else:
            dims.append(-1)
    return b.const(out, dims, np.int64)


@converts("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", emits=("Conv",))
def _conv(b: Builder, node: Node, out: str) -> None:
    x, w = b.name(node.args[0]), b.name(node.args[1])
    bias = arg(node, 2, "bias", None)
    n = _rank(b, w) - 2
    stride, padding = pair(arg(node, 3, "stride", 1), n), arg(node, 4, "padding", 0)
    dilation, groups = pair(arg(node, 5, "dilation", 1), n), int_arg(node, 6, "groups", 1)
    attrs: dict[str, Any] = {"strides": stride, "dilations": dilation, "group": groups}
    if isinstance(padding, str):
        attrs["auto_pad"] = {"same": "SAME_UPPER", "valid": "VALID"}[padding]
    else:
        p = pair(padding, n)
        attrs["pads"] = p + p
    inputs = [x, w] + ([b.name(bias)] if bias is not None else [])
    b.add(out, "Conv", inputs, [out], attr_args={"group": arg_ref(node, "groups")}, **attrs)


@converts("aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.conv_transpose3d.input",
          emits=("ConvTranspose",))
def _conv_transpose(b: Builder, node: Node, out: str) -> None:
    x, w = b.name(node.args[0]), b.name(node.args[1])
    bias = arg(node, 2, "bias", None)
    n = _rank(b, w) - 2
    pads = pair(arg(node, 4, "padding", 0), n)
    attrs: dict[str, Any] = {"strides": pair(arg(node, 3, "stride", 1), n), "pads": pads + pads,
             "output_padding": pair(arg(node, 5, "output_padding", 0), n), "group": int_arg(node, 6, "groups", 1),
             "dilations": pair(arg(node, 7, "dilation", 1), n)}
    inputs = [x, w] + ([b.name(bias)] if bias is not None else [])
    b.add(out, "ConvTranspose", inputs, [out], attr_args={"group": arg_ref(node, "groups")}, **attrs)


@converts("aten.group_norm.default", emits=("GroupNormalization",))
def _group_norm(b: Builder, node: Node, out: str) -> None:
    x, groups = b.name(node.args[0]), int_arg(node, 1, "num_groups")
    w, bias = arg(node, 2, "weight", None), arg(node, 3, "bias", None)
    c = (b.tensors[x].shape or (0, 0))[1]
    channels = c if isinstance(c, int) else 0
    scale = b.name(w) if w is not None else b.const(out, np.ones(channels, np.float32))
    shift = b.name(bias) if bias is not None else b.const(out, np.zeros(channels, np.float32))
    b.add(out, "GroupNormalization", [x, scale, shift], [out], attr_args={"num_groups": arg_ref(node, "num_groups")},
          num_groups=groups, epsilon=float_arg(node, 4, "eps", 1e-5))


@converts("aten.linear.default", emits=("Transpose", "MatMul", "Add"))
def _linear(b: Builder, node: Node, out: str) -> None:
    x, w = b.name(node.args[0]), b.name(node.args[1])
    bias = arg(node, 2, "bias", None)
    wshape = b.tensors[w].shape or ()
    b.tensor(f"{out}.wT", tuple(reversed(wshape)), b.tensors[w].dtype, "activation")
    b.add(f"{out}.t", "Transpose", [w], [f"{out}.wT"], perm=(1, 0))
    if bias is None:
        b.add(out, "MatMul", [x, f"{out}.wT"], [out])
        return
    b.tensor(f"{out}.mm", b.tensors[out].shape, b.tensors[out].dtype, "activation")
    b.add(f"{out}.matmul", "MatMul", [x, f"{out}.wT"], [f"{out}.mm"])
    b.add(out, "Add", [f"{out}.mm", b.name(bias)], [out])


@converts("aten.addmm.default", emits=("MatMul", "Add"))
def _addmm(b: Builder, node: Node, out: str) -> None:
    """``bias + x @ w`` (``torch.addmm``, as in Hugging Face's GPT-2 ``Conv1D``, whose weight is ``[in, out]``).

    Raises:
        NotConverted: For ``beta`` or ``alpha`` other than 1.
    """
    if arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
        raise NotConverted("addmm with beta or alpha other than 1")
    bias, x, w = (b.name(a) for a in node.args[:3])
    b.tensor(f"{out}.mm", b.tensors[out].shape, b.tensors[out].dtype, "activation")
    b.add(f"{out}.matmul", "MatMul", [x, w], [f"{out}.mm"])
    b.add(out, "Add", [f"{out}.mm", bias], [out])


@converts("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default",
          emits=("BatchNormalization",))
def _batch_norm(b: Builder, node: Node, out: str) -> None:
    x, w, bias, mean, var = (b.name(a) for a in node.args[:5])
    eps = float_arg(node, 7, "eps") if str(node.target) == "aten.batch_norm.default" else float_arg(node, 6, "eps")
    outs = [out] if out in b.tensors else [f"{out}.0"]
    b.add(out, "BatchNormalization", [x, w, bias, mean, var], outs, epsilon=eps)


@converts("aten.layer_norm.default", emits=("LayerNormalization",))
def _layer_norm(b: Builder, node: Node, out: str) -> None:
    """The normalised shape is implicit in ONNX (the scale's shape); those axes are frozen, so nothing follows them."""
    x, shape = b.name(node.args[0]), ints_arg(node, 1, "normalized_shape")
    w, bias = arg(node, 2, "weight", None), arg(node, 3, "bias", None)
    eps = float_arg(node, 4, "eps", 1e-5)
    w_name = b.const(out, np.ones(shape, np.float32)) if w is None else b.name(w)
    inputs = [x, w_name] + ([b.name(bias)] if bias is not None else [])
    b.add(out, "LayerNormalization", inputs, [out], axis=-len(shape), epsilon=eps)


def _unary(op: str) -> Converter:
    def conv(b: Builder, node: Node, out: str) -> None:
        b.add(out, op, [b.name(node.args[0])], [out])
    return conv


_UNARY = {"relu": "Relu", "relu_": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "clone": "Identity",
          "contiguous": "Identity", "dropout": "Identity", "erf": "Erf", "exp": "Exp", "sqrt": "Sqrt", "neg": "Neg",
          "abs": "Abs", "alias": "Identity", "detach": "Identity", "cos": "Cos", "sin": "Sin",
          "reciprocal": "Reciprocal", "hardswish": "HardSwish", "hardswish_": "HardSwish", "mish": "Mish",
          "mish_": "Mish"}
for _target, _op in _UNARY.items():
    converts(f"aten.{_target}.default", emits=(_op,))(_unary(_op))


@converts("aten.rsqrt.default", emits=("Sqrt", "Reciprocal"))
def _rsqrt(b: Builder, node: Node, out: str) -> None:
    root = f"{out}.sqrt"
    b.tensor(root, b.tensors[out].shape, b.tensors[out].dtype, "activation")
    b.add(root, "Sqrt", [b.name(node.args[0])], [root])
    b.add(out, "Reciprocal", [root], [out])


@converts("aten.pow.Tensor_Scalar", emits=("Pow",))
def _pow(b: Builder, node: Node, out: str) -> None:
    x = b.name(node.args[0])
    b.add(out, "Pow", [x, _scalar_operand(b, node.args[1], x, out)], [out])


@converts("aten.slice.Tensor", emits=("Slice",))
def _slice(b: Builder, node: Node, out: str) -> None:
    """``x[..., a:b:s]`` with static bounds (the ``.pt2`` rewrite sets the call's start and end as the plan moves them)."""
    x = b.name(node.args[0])
    dim = int_arg(node, 1, "dim") % _rank(b, x)
    bounds = [arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)]
    if any(isinstance(v, Node) for v in bounds):
        raise NotConverted("slice bounds read at run time")
    start, end, step = (0 if bounds[0] is None else int(bounds[0]), (1 << 63) - 1 if bounds[1] is None else int(bounds[1]),
                        int(bounds[2]))
    consts = [b.const(out, [v], np.int64) for v in (start, end, dim, step)]
    refs = {1: arg_ref(node, "start", first=True), 2: arg_ref(node, "end", first=True)}
    b.add(out, "Slice", [x, *consts], [out], input_args=refs)


@converts("aten.rms_norm.default", emits=("RMSNormalization",))
def _rms_norm(b: Builder, node: Node, out: str) -> None:
    """``nn.RMSNorm`` / ``F.rms_norm``: ONNX's RMSNormalization over the trailing normalised axes (no eps: the input
    type's machine epsilon, as torch takes it)."""
    x, shape = b.name(node.args[0]), ints_arg(node, 1, "normalized_shape")
    w, eps = arg(node, 2, "weight", None), arg(node, 3, "eps", None)
    if eps is None:
        source = node.args[0]
        assert isinstance(source, Node)
        eps = float(torch.finfo(source.meta["val"].dtype).eps)
    w_name = b.const(out, np.ones(shape, _scalar_dtype(b.tensors[out].dtype))) if w is None else b.name(w)
    b.add(out, "RMSNormalization", [x, w_name], [out], axis=-len(shape), epsilon=float(eps))


@converts("aten.select.int", emits=("Gather",))
def _select(b: Builder, node: Node, out: str) -> None:
    """``x[:, i]`` with a literal index: a Gather of one element that drops the axis (a class token's row)."""
    x = b.name(node.args[0])
    dim = int_arg(node, 1, "dim") % _rank(b, x)
    index = arg(node, 2, "index", None)
    if not isinstance(index, int):
        raise NotConverted("select index read at run time")
    b.add(out, "Gather", [x, b.const(out, index, np.int64)], [out], axis=dim)


@converts("aten.silu.default", "aten.silu_.default", emits=("Sigmoid", "Mul"))
def _silu(b: Builder, node: Node, out: str) -> None:
    x = b.name(node.args[0])
    b.tensor(f"{out}.sig", b.tensors[out].shape, b.tensors[out].dtype, "activation")
    b.add(f"{out}.sigmoid", "Sigmoid", [x], [f"{out}.sig"])
    b.add(out, "Mul", [x, f"{out}.sig"], [out])


@converts("aten.embedding.default", emits=("Gather",))
def _embedding(b: Builder, node: Node, out: str) -> None:
    """A table lookup: the table's rows are gathered, its columns are the output's last axis."""
    b.add(out, "Gather", [b.name(node.args[0]), b.name(node.args[1])], [out], axis=0)


@converts("aten.gelu.default", emits=("Gelu",))
def _gelu(b: Builder, node: Node, out: str) -> None:
    b.add(out, "Gelu", [b.name(node.args[0])], [out], approximate=str(node.kwargs.get("approximate", "none")))


@converts("aten.hardtanh.default", "aten.hardtanh_.default", emits=("Clip",))
def _hardtanh(b: Builder, node: Node, out: str) -> None:
    lo, hi = float_arg(node, 1, "min_val", -1.0), float_arg(node, 2, "max_val", 1.0)
    b.add(out, "Clip", [b.name(node.args[0]), b.const(out, lo), b.const(out, hi)], [out])


@converts("aten.hardsigmoid.default", "aten.hardsigmoid_.default", emits=("HardSigmoid",))
def _hardsigmoid(b: Builder, node: Node, out: str) -> None:
    """torch's ``relu6(x + 3) / 6``: ONNX HardSigmoid with alpha 1/6, beta 0.5."""
    b.add(out, "HardSigmoid", [b.name(node.args[0])], [out], alpha=1.0 / 6.0, beta=0.5)


@converts("aten.leaky_relu.default", "aten.leaky_relu_.default", emits=("LeakyRelu",))
def _leaky_relu(b: Builder, node: Node, out: str) -> None:
    b.add(out, "LeakyRelu", [b.name(node.args[0])], [out], alpha=float_arg(node, 1, "negative_slope", 0.01))


@converts("aten.elu.default", "aten.elu_.default", emits=("Elu",))
def _elu(b: Builder, node: Node, out: str) -> None:
    if float_arg(node, 2, "scale", 1.0) != 1.0 or float_arg(node, 3, "input_scale", 1.0) != 1.0:
        raise NotConverted("elu with a scale (SELU-like)")
    b.add(out, "Elu", [b.name(node.args[0])], [out], alpha=float_arg(node, 1, "alpha", 1.0))


@converts("aten.softplus.default", emits=("Softplus",))
def _softplus(b: Builder, node: Node, out: str) -> None:
    """``log(1 + exp(x))`` (torch's linear branch above its threshold agrees to float precision)."""
    if float_arg(node, 1, "beta", 1.0) != 1.0:
        raise NotConverted("softplus with beta other than 1")
    b.add(out, "Softplus", [b.name(node.args[0])], [out])


@converts("aten.clamp.default", "aten.clamp_.default", emits=("Clip",))
def _clamp(b: Builder, node: Node, out: str) -> None:
    """``x.clamp(min, max)`` with literal bounds (an absent bound is an absent Clip input)."""
    x = b.name(node.args[0])
    bounds = [arg(node, 1, "min", None), arg(node, 2, "max", None)]
    if any(isinstance(v, Node) for v in bounds):
        raise NotConverted("clamp bounds read at run time")
    inputs = [x, *("" if v is None else _scalar_operand(b, v, out, out) for v in bounds)]
    while inputs[-1] == "":
        inputs.pop()
    b.add(out, "Clip", inputs, [out])


@converts("aten.log_softmax.int", "aten._log_softmax.default", emits=("LogSoftmax",))
def _log_softmax(b: Builder, node: Node, out: str) -> None:
    b.add(out, "LogSoftmax", [b.name(node.args[0])], [out], axis=int_arg(node, 1, "dim"))


@converts("aten.constant_pad_nd.default", "aten.pad.default", emits=("Pad",))
def _constant_pad(b: Builder, node: Node, out: str) -> None:
    """``F.pad(x, pad, value=v)``: torch lists (begin, end) pairs from the last axis; ONNX all begins, then all ends.
    Reflect and replicate padding stay aten ops."""
    x = b.name(node.args[0])
    rank, pad = _rank(b, x), ints_arg(node, 1, "pad")
    is_pad = str(node.target) == "aten.pad.default"
    if is_pad and arg(node, 2, "mode", "constant") != "constant":
        raise NotConverted("non-constant padding")
    begins, ends = [0] * rank, [0] * rank
    for k in range(len(pad) // 2):
        begins[rank - 1 - k], ends[rank - 1 - k] = pad[2 * k], pad[2 * k + 1]
    value = float(arg(node, 3, "value", None) or 0.0) if is_pad else float_arg(node, 2, "value", 0.0)
    b.add(out, "Pad", [x, b.const(out, begins + ends, np.int64), _scalar_operand(b, value, x, out)], [out], mode="constant")


@converts("aten.upsample_nearest2d.vec", "aten.upsample_bilinear2d.vec", emits=("Resize",))
def _upsample(b: Builder, node: Node, out: str) -> None:
    """``F.interpolate`` (nearest, or bilinear) as a Resize by static scales: batch and channels keep scale 1."""
    x = b.name(node.args[0])
    src, dst = b.tensors[x].shape or (), b.tensors[out].shape or ()
    pairs = [(i, o) for i, o in zip(src[2:], dst[2:]) if isinstance(i, int) and isinstance(o, int)]
    if len(src) != 4 or len(dst) != 4 or len(pairs) != 2:
        raise NotConverted("upsampling with spatial sizes known only at run time")
    scales = [1.0, 1.0, *(o / i for i, o in pairs)]
    if "nearest" in str(node.target):
        attrs: dict[str, Any] = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    else:
        corners = bool(arg(node, 2, "align_corners", False))
        attrs = {"mode": "linear", "coordinate_transformation_mode": "align_corners" if corners else "pytorch_half_pixel"}
    b.add(out, "Resize", [x, "", b.const(out, scales, np.float32)], [out], **attrs)


def _binary(op: str) -> Converter:
    def conv(b: Builder, node: Node, out: str) -> None:
        """A Python scalar operand is a constant of the output's type (``positions + 1`` stays an integer)."""
        x, y = (_scalar_operand(b, a, out, out) for a in node.args[:2])
        alpha: Any = node.kwargs.get("alpha", 1)
        if alpha != 1 and op in ("Add", "Sub"):
            scaled = f"{out}.alpha"
            b.tensor(scaled, b.tensors[y].shape, b.tensors[y].dtype, "activation")
            b.add(scaled, "Mul", [y, _scalar_operand(b, alpha, y, out)], [scaled])
            y = scaled
        b.add(out, op, [x, y], [out])
    return conv


for _targets, _op, _emits in ((("aten.add.Tensor", "aten.add_.Tensor"), "Add", ("Add", "Mul")),
                              (("aten.sub.Tensor",), "Sub", ("Sub", "Mul")),
                              (("aten.mul.Tensor", "aten.mul_.Tensor"), "Mul", ("Mul",)),
                              (("aten.div.Tensor",), "Div", ("Div",))):
    converts(*_targets, emits=_emits)(_binary(_op))


@converts("aten.cat.default", "aten.concat.default", emits=("Concat",))
def _cat(b: Builder, node: Node, out: str) -> None:
    """``torch.cat``; 1-D empty inputs beside higher-rank ones are left out, as torch skips them (an empty
    key/value cache)."""
    dim = int_arg(node, 1, "dim", 0)
    rank = _rank(b, out)
    names = [b.name(a) for a in arg(node, 0, "tensors", [])]
    names = [n for n in names if rank == 1 or b.tensors[n].shape != (0,)]
    b.add(out, "Concat", names, [out], axis=dim % rank if rank else dim)


@converts("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", emits=("Split",))
def _split(b: Builder, node: Node, out: str) -> None:
    """``split_with_sizes`` takes the sizes, ``split`` the first size; ``chunk``'s count does not follow them."""
    x = b.name(node.args[0])
    n_out = len(node.meta["val"])
    outs = [f"{out}.{i}" for i in range(n_out)]
    dim = int_arg(node, 2, "dim", 0)
    rank = _rank(b, x)
    sizes = [int(_static(b, o, dim)) for o in outs]
    key = str(node.target)
    refs = {}
    if key == "aten.split_with_sizes.default":
        refs = {1: arg_ref(node, "split_sizes")}
    elif key == "aten.split.Tensor":
        refs = {1: arg_ref(node, "split_size", first=True)}
    b.add(out, "Split", [x, b.const(out, sizes, np.int64)], outs, input_args=refs, axis=dim % rank)


@converts("aten.unbind.int", emits=("Split", "Squeeze"))
def _unbind(b: Builder, node: Node, out: str) -> None:
    """``q, k, v = qkv.unbind(0)`` (timm's attention): a Split into ones along ``dim``, each part squeezed."""
    x = b.name(node.args[0])
    rank = _rank(b, x)
    dim = int_arg(node, 1, "dim", 0) % rank
    shape = list(b.tensors[x].shape or ())
    n_out = len(node.meta["val"])
    parts = [f"{out}.part{i}" for i in range(n_out)]
    for part in parts:
        b.tensor(part, (*shape[:dim], 1, *shape[dim + 1:]), b.tensors[x].dtype, "activation")
    b.add(f"{out}.split", "Split", [x, b.const(out, [1] * n_out, np.int64)], parts, axis=dim)
    for i, part in enumerate(parts):
        b.add(f"{out}.squeeze{i}", "Squeeze", [part, b.const(out, [dim], np.int64)], [f"{out}.{i}"])


@converts("aten.stack.default", emits=("Unsqueeze", "Concat"))
def _stack(b: Builder, node: Node, out: str) -> None:
    """``torch.stack(xs, dim)``: each input unsqueezed at ``dim``, then concatenated there."""
    rank = _rank(b, out)
    dim = int_arg(node, 1, "dim", 0) % rank
    names = []
    for i, a in enumerate(arg(node, 0, "tensors", [])):
        x = b.name(a)
        shape = list(b.tensors[x].shape or ())
        part = f"{out}.unsqueezed{i}"
        b.tensor(part, (*shape[:dim], 1, *shape[dim:]), b.tensors[x].dtype, "activation")
        b.add(part, "Unsqueeze", [x, b.const(out, [dim], np.int64)], [part])
        names.append(part)
    b.add(out, "Concat", names, [out], axis=dim)


def _static(b: Builder, name: str, axis: int) -> int:
    """A static size of ``name``'s axis.

    Raises:
        ValueError: When it is dynamic.
    """
    d = (b.tensors[name].shape or ())[axis]
    if not isinstance(d, int):
        raise ValueError(f"{name}: axis {axis} is not static")
    return d


_RESHAPE_SIZES = {"aten.view.default": "size", "aten.reshape.default": "shape", "aten._unsafe_view.default": "size",
                  "aten.unflatten.int": "sizes"}
"""The argument holding the target sizes (``flatten`` has none: it follows its input)."""


@converts("aten.flatten.using_ints", "aten.unflatten.int", "aten.view.default", "aten.reshape.default",
          "aten._unsafe_view.default", emits=("Reshape",))
def _reshape(b: Builder, node: Node, out: str) -> None:
    key = str(node.target)
    refs = {}
    if key in _RESHAPE_SIZES:
        # unflatten's sizes start at the unflattened axis
        offset = int_arg(node, 1, "dim") % _rank(b, out) if key == "aten.unflatten.int" else 0
        ref = arg_ref(node, _RESHAPE_SIZES[key], offset=offset)
        sizes = arg(node, ref.index, ref.key, ())
        listed = list(sizes) if isinstance(sizes, (list, tuple)) else []
        inferred = tuple(i + offset for i, v in enumerate(listed) if isinstance(v, int) and v == -1)
        held = tuple((i + offset, name) for i, name in b.size_attributes(listed))
        refs = {1: dataclasses.replace(ref, inferred=inferred, attributes=held)}
    b.add(out, "Reshape", [b.name(node.args[0]), _shape_const(b, node, out)], [out], input_args=refs)


def _run_time_size(b: Builder, size: Node, out: str, i: int) -> str:
    """A size the call reads at run time (``aten.sym_size.int``: ``x.size(d)``) as a one-entry shape slice of ``x``."""
    src, axis = b.name(size.args[0]), int_arg(size, 1, "dim")
    name = f"{out}.size{i}"
    b.tensor(name, (1,), "INT64", "activation")
    b.add(name, "Shape", [src], [name], start=axis, end=axis + 1)
    return name


def _sizes_vector(b: Builder, sizes: list[Any], out: str) -> str:
    """An Expand shape: -1 (keep the input's size) as 1, literal sizes as constants, run-time sizes read by Shape.

    Raises:
        NotConverted: Before adding anything, when a size is other shape arithmetic than ``x.size(d)``.
    """
    if any(isinstance(s, Node) and not _is_size_read(s) for s in sizes):
        raise NotConverted("size arithmetic")
    literal = [1 if isinstance(s, Node) or int(s) == -1 else int(s) for s in sizes]
    if not any(isinstance(s, Node) for s in sizes):
        return b.const(out, literal, np.int64)
    parts = [_run_time_size(b, s, out, i) if isinstance(s, Node) else b.const(out, [literal[i]], np.int64)
             for i, s in enumerate(sizes)]
    name = f"{out}.shape"
    b.tensor(name, (len(sizes),), "INT64", "activation")
    b.add(name, "Concat", parts, [name], axis=0)
    return name


@converts("aten.expand.default", emits=("Expand", "Shape", "Concat"))
def _expand(b: Builder, node: Node, out: str) -> None:
    """``x.expand(sizes)``: ONNX Expand broadcasts the same way (a -1 keeps the input's size, as an entry of 1 does).

    Literal sizes follow the plan through the call's argument (the ``.pt2`` rewrite); -1 entries need none.
    """
    ref = arg_ref(node, "size")
    sizes = list(arg(node, ref.index, ref.key, ()))
    target = _sizes_vector(b, sizes, out)
    inferred = tuple(i for i, v in enumerate(sizes) if isinstance(v, int) and v == -1)
    b.add(out, "Expand", [b.name(node.args[0]), target], [out], input_args={1: dataclasses.replace(ref, inferred=inferred)})


def _scalar_dtype(name: str) -> np.dtype:
    """The numpy type a Python scalar beside a tensor of type ``name`` is written in (bfloat16: a 0-d float32,
    which torch's promotion leaves at the tensor's type).

    Raises:
        NotConverted: For a type the dtype table does not know.
    """
    try:
        by_name(name)
    except KeyError:
        raise NotConverted(f"a scalar beside a {name} tensor") from None
    return numpy_dtype(name)


def _scalar_operand(b: Builder, a: Any, like: str, out: str) -> str:
    """A tensor argument, or a Python scalar as a constant of ``like``'s type.

    Raises:
        NotConverted: For a type the dtype table does not know, or a fractional scalar beside integers (torch
            would compare or compute in floats).
    """
    if isinstance(a, Node):
        return b.name(a)
    dtype = _scalar_dtype(b.tensors[like].dtype)
    if dtype.kind in "iub" and not float(a).is_integer():
        raise NotConverted(f"the fractional scalar {a} beside a {b.tensors[like].dtype} tensor")
    return b.const(out, a, dtype)


@converts("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar", emits=("Where",))
def _where(b: Builder, node: Node, out: str) -> None:
    """``torch.where(cond, a, b)``, either branch possibly a Python scalar (a constant of the output's type)."""
    names = [_scalar_operand(b, a, out, out) for a in node.args[1:3]]
    b.add(out, "Where", [b.name(node.args[0]), *names], [out])


_COMPARISONS = {"eq": "Equal", "lt": "Less", "gt": "Greater", "le": "LessOrEqual", "ge": "GreaterOrEqual"}
for _name, _op in _COMPARISONS.items():
    @converts(f"aten.{_name}.Scalar", f"aten.{_name}.Tensor", emits=(_op,))
    def _compare(b: Builder, node: Node, out: str, op: str = _op) -> None:
        x = b.name(node.args[0])
        b.add(out, op, [x, _scalar_operand(b, node.args[1], x, out)], [out])


@converts("aten.unsqueeze.default", emits=("Unsqueeze",))
def _unsqueeze(b: Builder, node: Node, out: str) -> None:
    b.add(out, "Unsqueeze", [b.name(node.args[0]), b.const(out, [int_arg(node, 1, "dim") % _rank(b, out)], np.int64)], [out])


@converts("aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten._to_copy.default", "aten.type_as.default",
          emits=("Cast",))
def _cast(b: Builder, node: Node, out: str) -> None:
    """A dtype conversion (to the traced output's type; a device move alone is a Cast to the same type)."""
    try:
        to = by_name(b.tensors[out].dtype).code
    except KeyError:
        raise NotConverted(f"cast to {b.tensors[out].dtype}") from None
    b.add(out, "Cast", [b.name(node.args[0])], [out], to=to)


def _is_size_read(v: Any) -> bool:
    """Whether a call argument is ``x.size(d)`` (``aten.sym_size.int`` of a tensor)."""
    return isinstance(v, Node) and str(v.target) == "aten.sym_size.int" and isinstance(v.args[0], Node)


@converts("aten.arange.default", "aten.arange.start", "aten.arange.start_step", emits=("Range", "Shape", "Squeeze"))
def _arange(b: Builder, node: Node, out: str) -> None:
    """``torch.arange`` (position ids) in the traced output's type; an integer bound may be ``x.size(d)``, read by
    Shape at run time (the batch size).

    Raises:
        NotConverted: For other run-time bounds (or run-time bounds of a non-INT64 range).
    """
    bounds = list(node.args)
    start, end, step = (0, bounds[0], 1) if len(bounds) == 1 else (bounds[0], bounds[1], bounds[2] if len(bounds) > 2 else 1)
    dtype = _scalar_dtype(b.tensors[out].dtype)
    run_time = [v for v in (start, end, step) if isinstance(v, Node)]
    if any(not _is_size_read(v) for v in run_time) or (run_time and b.tensors[out].dtype != "INT64"):
        raise NotConverted("arange bounds other than literals and integer x.size(d)")
    names = []
    for i, v in enumerate((start, end, step)):
        if not isinstance(v, Node):
            names.append(b.const(out, v, dtype))
            continue
        scalar = f"{out}.bound{i}"
        b.tensor(scalar, (), "INT64", "activation")
        b.add(scalar, "Squeeze", [_run_time_size(b, v, out, i), b.const(out, [0], np.int64)], [scalar])
        names.append(scalar)
    b.add(out, "Range", names, [out])


@converts("aten.permute.default", emits=("Transpose",))
def _permute(b: Builder, node: Node, out: str) -> None:
    rank = _rank(b, out)
    b.add(out, "Transpose", [b.name(node.args[0])], [out], perm=tuple(d % rank for d in ints_arg(node, 1, "dims")))


@converts("aten.transpose.int", emits=("Transpose",))
def _transpose(b: Builder, node: Node, out: str) -> None:
    rank = _rank(b, out)
    perm = list(range(rank))
    i, j = int_arg(node, 1, "dim0") % rank, int_arg(node, 2, "dim1") % rank
    perm[i], perm[j] = perm[j], perm[i]
    b.add(out, "Transpose", [b.name(node.args[0])], [out], perm=tuple(perm))


@converts("aten.matmul.default", "aten.mm.default", "aten.bmm.default", emits=("MatMul",))
def _matmul(b: Builder, node: Node, out: str) -> None:
    b.add(out, "MatMul", [b.name(node.args[0]), b.name(node.args[1])], [out])


@converts("aten.scaled_dot_product_attention.default", emits=("Attention",))
def _sdpa(b: Builder, node: Node, out: str) -> None:
    mask = arg(node, 3, "attn_mask", None)
    scale = arg(node, 6, "scale", None)
    attrs: dict[str, Any] = {"is_causal": int(bool(arg(node, 5, "is_causal", False)))}
    if scale is not None:
        attrs["scale"] = float(scale)
    inputs = [b.name(a) for a in node.args[:3]] + ([b.name(mask)] if mask is not None else [])
    b.add(out, "Attention", inputs, [out], **attrs)


def _fix_heads(m: HeadPrunableAttention) -> None:
    """Heads and the value head size follow the projections' rows; embedding sizes follow their columns.

    Raises:
        ValueError: When the projections do not keep whole heads.
    """
    v_rows = m.out_proj.weight.shape[1]
    if m._packed:
        qk_rows, m.embed_dim = (m.in_proj_weight.shape[0] - v_rows) // 2, m.in_proj_weight.shape[1]
        m.kdim = m.vdim = m.embed_dim
    else:
        qk_rows, m.embed_dim = m.q_proj_weight.shape
        m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
    if qk_rows < m.head_dim or qk_rows % m.head_dim or v_rows % (qk_rows // m.head_dim):
        raise ValueError(f"attention keeps {qk_rows} query rows and {v_rows} value rows: not whole heads")
    m.num_heads = qk_rows // m.head_dim
    m.v_head_dim = v_rows // m.num_heads


register_module_rule("Attention", ModuleRule(hook=_fix_heads, hook_class=HeadPrunableAttention))


@converts("aten.softmax.int", "aten._softmax.default", emits=("Softmax",))
def _softmax(b: Builder, node: Node, out: str) -> None:
    b.add(out, "Softmax", [b.name(node.args[0])], [out], axis=int_arg(node, 1, "dim"))


def _reduce(op: str) -> Converter:
    def conv(b: Builder, node: Node, out: str) -> None:
        x = b.name(node.args[0])
        rank = _rank(b, x)
        given = arg(node, 1, "dim", None)
        axes = [a % rank for a in (ints_arg(node, 1, "dim") if given is not None else range(rank))]
        keep = int(bool(arg(node, 2, "keepdim", False)))
        b.add(out, op, [x, b.const(out, axes, np.int64)], [out], keepdims=keep)
    return conv


converts("aten.mean.dim", emits=("ReduceMean",))(_reduce("ReduceMean"))
converts("aten.sum.dim_IntList", emits=("ReduceSum",))(_reduce("ReduceSum"))
converts("aten.amax.default", emits=("ReduceMax",))(_reduce("ReduceMax"))
converts("aten.amin.default", emits=("ReduceMin",))(_reduce("ReduceMin"))


@converts("aten.adaptive_avg_pool2d.default", "aten.adaptive_avg_pool1d.default", emits=("GlobalAveragePool",))
def _adaptive(b: Builder, node: Node, out: str) -> None:
    x = b.name(node.args[0])
    size = pair(arg(node, 1, "output_size", 1), _rank(b, x) - 2)
    if all(s == 1 for s in size):
        b.add(out, "GlobalAveragePool", [x], [out])
    else:  # not in the table: the channels freeze
        b.nodes.append(OpNode(out, "aten", str(node.target), (x,), (out,), {}, 1, origin=b.origin()))


def _pool(op: str) -> Converter:
    def conv(b: Builder, node: Node, out: str) -> None:
        x = b.name(node.args[0])
        n = _rank(b, x) - 2
        kernel = pair(arg(node, 1, "kernel_size", 1), n)
        stride_arg = arg(node, 2, "stride", None)
        stride = pair(stride_arg, n) if stride_arg not in (None, []) else kernel
        pad = pair(arg(node, 3, "padding", 0), n)
        attrs: dict[str, Any] = {"kernel_shape": kernel, "strides": stride, "pads": pad + pad}
        if op == "MaxPool":
            attrs.update(dilations=pair(arg(node, 4, "dilation", 1), n), ceil_mode=int(bool(arg(node, 5, "ceil_mode", False))))
        else:
            attrs.update(ceil_mode=int(bool(arg(node, 4, "ceil_mode", False))),
                         count_include_pad=int(bool(arg(node, 5, "count_include_pad", True))))
        b.add(out, op, [x], [out], **attrs)
    return conv


converts("aten.max_pool2d.default", "aten.max_pool1d.default", emits=("MaxPool",))(_pool("MaxPool"))
converts("aten.avg_pool2d.default", "aten.avg_pool1d.default", emits=("AveragePool",))(_pool("AveragePool"))
