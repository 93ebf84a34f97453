"""Torch implementations of element-wise, shape and index ops (ONNX semantics).

Registered on the op semantics table with ``register_run``; the interpreter
(:mod:`graphprune.execution.interpreter`) dispatches on it. Integer tensors (shapes,
indices) stay torch tensors so shape arithmetic runs as in onnxruntime.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from graphprune.ir.graph import OpNode
from graphprune.ops.registry import register_run

__all__ = ["ONNX_TO_TORCH_DTYPE", "ints"]

Args = list[Any]

ONNX_TO_TORCH_DTYPE: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
}


def ints(t: Any) -> list[int]:
    """A constant or tensor operand as a list of Python ints."""
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(t).reshape(-1)]


def _opt(args: Args, i: int) -> Any:
    return args[i] if i < len(args) else None


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[OpNode, Args], tuple[Any, ...]]:
    return lambda _node, args: (fn(args[0]),)


_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Identity": lambda x: x,
    "Softsign": F.softsign, "Mish": F.mish, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan,
    "Not": torch.logical_not, "IsNaN": torch.isnan, "IsInf": torch.isinf,
}
for _name, _fn in _UNARY.items():
    register_run(_name)(_unary(_fn))


@register_run("LeakyRelu")
def _leaky_relu(node: OpNode, args: Args) -> tuple[Any, ...]:
    return (F.leaky_relu(args[0], float(node.attrs.get("alpha", 0.01))),)


@register_run("Elu")
def _elu(node: OpNode, args: Args) -> tuple[Any, ...]:
    return (F.elu(args[0], float(node.attrs.get("alpha", 1.0))),)


@register_run("Selu")
def _selu(node: OpNode, args: Args) -> tuple[Any, ...]:
    alpha = float(node.attrs.get("alpha", 1.67326319217681884765625))
    gamma = float(node.attrs.get("gamma", 1.05070102214813232421875))
    x = args[0]
    return (gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1)),)


@register_run("Celu")
def _celu(node: OpNode, args: Args) -> tuple[Any, ...]:
    return (F.celu(args[0], float(node.attrs.get("alpha", 1.0))),)


@register_run("Softplus")
def _softplus(_node: OpNode, args: Args) -> tuple[Any, ...]:
    return (torch.log1p(torch.exp(args[0])),)


@register_run("HardSigmoid")
def _hard_sigmoid(node: OpNode, args: Args) -> tuple[Any, ...]:
    alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    return (torch.clamp(alpha * args[0] + beta, 0.0, 1.0),)


@register_run("HardSwish")
def _hard_swish(_node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    return (x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0),)


@register_run("Gelu")
def _gelu(node: OpNode, args: Args) -> tuple[Any, ...]:
    return (F.gelu(args[0], approximate=str(node.attrs.get("approximate", "none"))),)


@register_run("ThresholdedRelu")
def _thresholded_relu(node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    return (torch.where(x > float(node.attrs.get("alpha", 1.0)), x, torch.zeros_like(x)),)


@register_run("Clip")
def _clip(node: OpNode, args: Args) -> tuple[Any, ...]:
    lo = _opt(args, 1) if node.opset >= 11 else node.attrs.get("min")
    hi = _opt(args, 2) if node.opset >= 11 else node.attrs.get("max")
    x = args[0]
    if lo is None and hi is None:
        return (x,)
    return (torch.clamp(x, _bound(lo), _bound(hi)),)


def _bound(v: Any) -> Any:
    """A Clip bound as clamp takes it: a Python number for a scalar (the fast path), else None or a tensor."""
    if v is None or isinstance(v, (int, float)):
        return v
    t = torch.as_tensor(v)
    return t.item() if t.numel() == 1 else t


@register_run("Dropout")
def _dropout(_node: OpNode, args: Args) -> tuple[Any, ...]:
    return (args[0], torch.ones_like(args[0], dtype=torch.bool))


@register_run("Cast")
def _cast(node: OpNode, args: Args) -> tuple[Any, ...]:
    to = int(node.attrs["to"])
    if to not in ONNX_TO_TORCH_DTYPE:
        raise NotImplementedError(f"Cast to ONNX type {to}")
    return (args[0].to(ONNX_TO_TORCH_DTYPE[to]),)


@register_run("CastLike")
def _cast_like(_node: OpNode, args: Args) -> tuple[Any, ...]:
    return (args[0].to(args[1].dtype),)


def _int_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _int_div, "Pow": torch.pow,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or, "BitwiseXor": torch.bitwise_xor,
}


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[OpNode, Args], tuple[Any, ...]]:
    return lambda _node, args: (fn(args[0], args[1]),)


for _name, _bfn in _BINARY.items():
    register_run(_name)(_binary(_bfn))


@register_run("Mod")
def _mod(node: OpNode, args: Args) -> tuple[Any, ...]:
    fn = torch.fmod if int(node.attrs.get("fmod", 0)) else torch.remainder
    return (fn(args[0], args[1]),)


@register_run("PRelu")
def _prelu(_node: OpNode, args: Args) -> tuple[Any, ...]:
    x, slope = args
    return (torch.where(x >= 0, x, x * slope),)


@register_run("Max", "Min", "Sum", "Mean")
def _variadic(node: OpNode, args: Args) -> tuple[Any, ...]:
    op = node.op_type
    out = args[0]
    for a in args[1:]:
        out = torch.maximum(out, a) if op == "Max" else torch.minimum(out, a) if op == "Min" else out + a
    return (out / len(args) if node.op_type == "Mean" else out,)


@register_run("Where")
def _where(_node: OpNode, args: Args) -> tuple[Any, ...]:
    return (torch.where(args[0].bool(), args[1], args[2]),)


@register_run("Constant")
def _constant(node: OpNode, _args: Args) -> tuple[Any, ...]:
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in node.attrs:
            return (torch.as_tensor(np.asarray(node.attrs[key])),)
    raise NotImplementedError("Constant without a numeric value")


@register_run("ConstantOfShape")
def _constant_of_shape(node: OpNode, args: Args) -> tuple[Any, ...]:
    value = torch.as_tensor(np.asarray(node.attrs.get("value", np.zeros(1, np.float32))))
    return (torch.full(ints(args[0]), value.reshape(-1)[0].item(), dtype=value.dtype, device=args[0].device),)


@register_run("Shape")
def _shape(node: OpNode, args: Args) -> tuple[Any, ...]:
    dims = list(args[0].shape)
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    dims = dims[start:] if end is None else dims[start:int(end)]
    return (torch.tensor(dims, dtype=torch.int64, device=args[0].device),)


@register_run("Size")
def _size(_node: OpNode, args: Args) -> tuple[Any, ...]:
    return (torch.tensor(args[0].numel(), dtype=torch.int64, device=args[0].device),)


@register_run("Reshape")
def _reshape(node: OpNode, args: Args) -> tuple[Any, ...]:
    x, shape = args[0], ints(args[1])
    if not int(node.attrs.get("allowzero", 0)):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return (x.reshape(shape),)


@register_run("Flatten")
def _flatten(node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    axis = int(node.attrs.get("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return (x.reshape(int(np.prod(x.shape[:axis])), -1),)


def _axes(node: OpNode, args: Args, index: int) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    value = _opt(args, index)
    return None if value is None else ints(value)


@register_run("Squeeze")
def _squeeze(node: OpNode, args: Args) -> tuple[Any, ...]:
    x, axes = args[0], _axes(node, args, 1)
    if axes is None:
        return (x.squeeze(),)
    keep = [d for i, d in enumerate(x.shape) if i not in {a % x.dim() for a in axes}]
    return (x.reshape(keep),)


@register_run("Unsqueeze")
def _unsqueeze(node: OpNode, args: Args) -> tuple[Any, ...]:
    x, axes = args[0], _axes(node, args, 1)
    rank = x.dim() + len(axes or [])
    shape = list(x.shape)
    for a in sorted(a % rank for a in axes or []):
        shape.insert(a, 1)
    return (x.reshape(shape),)


@register_run("Transpose")
def _transpose(node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    perm = node.attrs.get("perm") or tuple(reversed(range(x.dim())))
    return (x.permute(*[int(p) for p in perm]),)


@register_run("Concat")
def _concat(node: OpNode, args: Args) -> tuple[Any, ...]:
    parts = [a for a in args if a is not None and (a.dim() == 0 or a.numel() or a.dim() > 1)]
    return (torch.cat(parts, dim=int(node.attrs["axis"])),)


@register_run("Split")
def _split(node: OpNode, args: Args) -> tuple[Any, ...]:
    x, axis = args[0], int(node.attrs.get("axis", 0))
    sizes = node.attrs.get("split") or (ints(args[1]) if _opt(args, 1) is not None else None)
    if not sizes:
        n = int(node.attrs.get("num_outputs", len(node.outputs)))
        dim = x.shape[axis]
        step = -(-dim // n)
        sizes = [min(step, dim - i * step) for i in range(n)]
    return tuple(torch.split(x, [int(s) for s in sizes], dim=axis))


@register_run("Slice")
def _slice(node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    if node.opset < 10:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = ints(args[1]), ints(args[2])
        axes = ints(args[3]) if _opt(args, 3) is not None else list(range(len(starts)))
        steps = ints(args[4]) if _opt(args, 4) is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    flips: list[tuple[int, list[int]]] = []
    for s, e, axis, st in zip(starts, ends, axes, steps):
        a = axis % x.dim()
        rng = range(*slice(s, e, st).indices(x.shape[a]))
        if st > 0:
            index[a] = slice(rng.start, max(rng.stop, rng.start), st)
        else:
            flips.append((a, list(rng)))
    y = x[tuple(index)]
    for a, positions in flips:
        y = y.index_select(a, torch.tensor(positions, dtype=torch.int64, device=x.device))
    return (y,)


@register_run("Gather")
def _gather(node: OpNode, args: Args) -> tuple[Any, ...]:
    x, idx = args
    axis = int(node.attrs.get("axis", 0)) % x.dim()
    idx = torch.as_tensor(idx, device=x.device).long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    flat = x.index_select(axis, idx.reshape(-1))
    return (flat.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])),)


@register_run("Expand")
def _expand(_node: OpNode, args: Args) -> tuple[Any, ...]:
    x, shape = args[0], ints(args[1])
    target = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return (x.expand(target),)


@register_run("Tile")
def _tile(_node: OpNode, args: Args) -> tuple[Any, ...]:
    return (args[0].repeat(*ints(args[1])),)


@register_run("Range")
def _range(_node: OpNode, args: Args) -> tuple[Any, ...]:
    start, limit, delta = (a.item() for a in args)
    return (torch.arange(start, limit, delta, dtype=args[0].dtype, device=args[0].device),)


@register_run("Pad")
def _pad(node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    mode = str(node.attrs.get("mode", "constant"))
    if node.opset < 11:
        pads, value, axes = list(node.attrs["pads"]), float(node.attrs.get("value", 0.0)), None
    else:
        pads = ints(args[1])
        cv = _opt(args, 2)
        value = float(cv.reshape(-1)[0].item()) if cv is not None and cv.numel() else 0.0
        axes = ints(args[3]) if _opt(args, 3) is not None else None
    axes = [a % x.dim() for a in axes] if axes is not None else list(range(x.dim()))
    n = len(axes)
    torch_pads: list[int] = [0] * (2 * x.dim())
    for k, a in enumerate(axes):
        back = x.dim() - 1 - a
        torch_pads[2 * back], torch_pads[2 * back + 1] = pads[k], pads[k + n]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        return (F.pad(x, torch_pads, value=value),)
    return (F.pad(x, torch_pads, mode={"edge": "replicate"}.get(mode, mode)),)
