"""The builder the torch converters write into, and the converter registry.

Converters are registered by aten target; :mod:`graphprune.frontends.torch.trace`
walks a traced graph and calls them, :mod:`graphprune.frontends.torch.converters`
defines them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from graphprune.ir.graph import Dim, OpNode, TensorInfo

__all__ = ["CONVERTERS", "Builder", "Converter", "arg", "converts", "dims", "dtype_name", "pair"]


_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16", torch.float64: "DOUBLE",
           torch.int64: "INT64", torch.int32: "INT32", torch.bool: "BOOL", torch.uint8: "UINT8", torch.int8: "INT8"}


class Builder:
    """Accumulates ONNX-form nodes, tensors and constants while walking the aten graph."""

    def __init__(self) -> None:
        self.tensors: dict[str, TensorInfo] = {}
        self.nodes: list[OpNode] = []
        self.consts: dict[str, np.ndarray] = {}
        self.alias: dict[str, str] = {}

    def name(self, arg: Any) -> str:
        n = arg.name if isinstance(arg, torch.fx.Node) else str(arg)
        return self.alias.get(n, n)

    def tensor(self, name: str, shape: tuple[Dim, ...] | None, dtype: str, kind: str) -> None:
        self.tensors[name] = TensorInfo(name, shape, dtype, kind)  # type: ignore[arg-type]

    def const(self, base: str, value: Any, dtype: Any = np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = f"{base}.c{len(self.consts)}"
        self.consts[name] = arr
        self.tensor(name, tuple(arr.shape), "INT64" if arr.dtype == np.int64 else "FLOAT", "param")
        return name

    def add(self, name: str, op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any) -> None:
        self.nodes.append(OpNode(name, "", op, tuple(inputs), tuple(outputs), attrs, 18))


def dims(val: Any, batch: dict[str, str]) -> tuple[Dim, ...] | None:
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    out: list[Dim] = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        else:
            key = str(d)
            out.append(batch.setdefault(key, key))
    return tuple(out)


def dtype_name(val: Any) -> str:
    return _DTYPES.get(getattr(val, "dtype", None), "UNDEFINED")


Converter = Callable[[Builder, torch.fx.Node, str], None]
CONVERTERS: dict[str, Converter] = {}


def converts(*targets: str) -> Callable[[Converter], Converter]:
    def deco(fn: Converter) -> Converter:
        for t in targets:
            CONVERTERS[t] = fn
        return fn
    return deco


def arg(node: torch.fx.Node, i: int, key: str, default: Any) -> Any:
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(key, default)


def pair(v: Any, n: int) -> list[int]:
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)] * n
