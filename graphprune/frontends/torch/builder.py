"""The builder the torch converters write into, and the converter registry.

Converters are registered by aten target together with the table ops they
write (:func:`converts`); that registration is what fills the op table's
``torch_targets``, so the two cannot disagree.
:mod:`graphprune.frontends.torch.trace` walks a traced graph and calls them,
:mod:`graphprune.frontends.torch.converters` defines them. Every op a
converter adds carries an :class:`~graphprune.ir.graph.Origin`: the call it
came from, the module state that call reads, and which call argument each of
its attributes and constant inputs came from (what the ``.pt2`` backend
patches).
"""
from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from graphprune.ir.dtypes import onnx_name_of_numpy, torch_to_onnx_names
from graphprune.ir.graph import ArgRef, Dim, OpNode, Origin, TensorInfo, TensorKind
from graphprune.ops import add_torch_targets

__all__ = [
    "CONVERTERS",
    "HEAD_COUNT_ATTRIBUTES",
    "Builder",
    "Converter",
    "NotConverted",
    "arg",
    "arg_ref",
    "call_tensors",
    "converts",
    "dims",
    "dtype_name",
    "float_arg",
    "int_arg",
    "ints_arg",
    "pair",
]


_DTYPES = torch_to_onnx_names()  # the one table: graphprune.ir.dtypes

HEAD_COUNT_ATTRIBUTES = ("num_heads", "heads", "n_head", "n_heads", "num_attention_heads", "num_key_value_heads")
"""Module attributes a forward reads head counts from (PyTorch, timm, Hugging Face spellings). A literal size
equal to one is taken to be read from it (every one holding the value is set with the plan); a wrong match cannot
pass: the pruned module is checked against the original."""


class NotConverted(Exception):
    """Raised by a converter, before it adds anything, for a call it cannot express: the call stays an aten op."""


def call_tensors(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The fx nodes among a call's arguments, in order (one level of lists, then kwargs)."""
    found: list[torch.fx.Node] = []
    for a in (*node.args, *node.kwargs.values()):
        for item in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(item, torch.fx.Node):
                found.append(item)
    return found


class Builder:
    """Accumulates ONNX-form nodes, tensors and constants while walking the aten graph."""

    def __init__(self, module: torch.nn.Module | None = None) -> None:
        self.tensors: dict[str, TensorInfo] = {}
        self.nodes: list[OpNode] = []
        self.consts: dict[str, np.ndarray] = {}
        self.alias: dict[str, str] = {}
        self.module = module
        self._call: torch.fx.Node | None = None
        self._state: tuple[str, ...] = ()

    def name(self, arg: Any) -> str:
        """The graph tensor an fx argument stands for."""
        n = arg.name if isinstance(arg, torch.fx.Node) else str(arg)
        return self.alias.get(n, n)

    def tensor(self, name: str, shape: tuple[Dim, ...] | None, dtype: str, kind: TensorKind) -> None:
        self.tensors[name] = TensorInfo(name, shape, dtype, kind)

    def const(self, base: str, value: Any, dtype: Any = np.float32) -> str:
        """A new constant tensor; returns its name."""
        arr = np.asarray(value, dtype=dtype)
        name = f"{base}.c{len(self.consts)}"
        self.consts[name] = arr
        self.tensor(name, tuple(arr.shape), onnx_name_of_numpy(arr.dtype), "param")
        return name

    def converting(self, call: torch.fx.Node | None, state: Container[str] = ()) -> None:
        """Start the ops of ``call`` (None: ops without a call); ``state`` names the module state tensors."""
        self._call = call
        names = [self.name(a) for a in call_tensors(call)] if call is not None else []
        self._state = tuple(dict.fromkeys(n for n in names if n in state))

    def caller(self) -> str | None:
        """Qualified name of the innermost module whose ``forward`` made the current call (torch.export's
        ``nn_module_stack``), or None when the trace does not say."""
        stack = list((self._call.meta.get("nn_module_stack") or {}).values()) if self._call is not None else []
        return str(stack[-1][0]) if stack else None

    def size_attributes(self, values: Sequence[Any]) -> tuple[tuple[int, str], ...]:
        """(entry, attribute) for literal sizes the calling module holds as head-count attributes
        (:data:`HEAD_COUNT_ATTRIBUTES`; every one holding the value), when the traced module is known."""
        name = self.caller()
        if self.module is None or name is None:
            return ()
        try:
            owner = self.module.get_submodule(name)
        except AttributeError:
            return ()
        held = [(attr, v) for attr in HEAD_COUNT_ATTRIBUTES
                if isinstance(v := getattr(owner, attr, None), int) and not isinstance(v, bool) and v > 1]
        return tuple((j, attr) for j, v in enumerate(values) for attr, held_v in held if v == held_v)

    def origin(self, attr_args: Mapping[str, ArgRef] | None = None,
               input_args: Mapping[int, ArgRef] | None = None) -> Origin | None:
        """The provenance of an op of the current call."""
        if self._call is None:
            return None
        return Origin(self._call.name, str(self._call.target), self._state, dict(attr_args or {}), dict(input_args or {}),
                      self.caller())

    def add(self, name: str, op: str, inputs: Sequence[str], outputs: Sequence[str], *,
            attr_args: Mapping[str, ArgRef] | None = None, input_args: Mapping[int, ArgRef] | None = None,
            **attrs: Any) -> None:
        """Append an op of the default domain (opset 18).

        Args:
            attr_args: ONNX attribute -> the call argument it came from.
            input_args: Constant input index -> the call argument it came from.
            attrs: ONNX attributes.
        """
        origin = self.origin(attr_args, input_args)
        self.nodes.append(OpNode(name, "", op, tuple(inputs), tuple(outputs), attrs, 18, origin=origin))


def dims(val: Any, batch: dict[str, str]) -> tuple[Dim, ...] | None:
    """The dims of a traced value; symbolic sizes become their names."""
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
    """The ONNX element type name of a traced value."""
    dtype = getattr(val, "dtype", None)
    return _DTYPES.get(dtype, "UNDEFINED") if isinstance(dtype, torch.dtype) else "UNDEFINED"


Converter = Callable[[Builder, torch.fx.Node, str], None]
CONVERTERS: dict[str, Converter] = {}


def converts(*targets: str, emits: Sequence[str]) -> Callable[[Converter], Converter]:
    """Decorator: register a converter for aten targets; ``emits`` names the table ops it writes.

    The targets become those ops' ``torch_targets`` in the op table.

    Raises:
        ValueError: When a target gets two converters or an op is not in the table.
    """

    def deco(fn: Converter) -> Converter:
        for t in targets:
            if t in CONVERTERS:
                raise ValueError(f"{t} has two converters")
            CONVERTERS[t] = fn
        add_torch_targets(emits, targets)
        return fn

    return deco


def arg_ref(node: torch.fx.Node, key: str, offset: int = 0, first: bool = False) -> ArgRef:
    """Where argument ``key`` of a call sits, read from the target's schema.

    Raises:
        ValueError: When the target has no argument of that name.
    """
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    if key not in names:
        raise ValueError(f"{node.target} has no argument '{key}'")
    return ArgRef(names.index(key), key, offset, first)


def arg(node: torch.fx.Node, i: int, key: str, default: Any) -> Any:
    """Argument ``i`` of a call (or its keyword ``key``, or ``default``)."""
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(key, default)


def int_arg(node: torch.fx.Node, i: int, key: str, default: int = 0) -> int:
    """An int argument (a bool counts as 0 / 1)."""
    return int(arg(node, i, key, default))


def float_arg(node: torch.fx.Node, i: int, key: str, default: float = 0.0) -> float:
    return float(arg(node, i, key, default))


def ints_arg(node: torch.fx.Node, i: int, key: str) -> list[int]:
    """A list-of-ints argument (a single int is one entry)."""
    value = arg(node, i, key, [])
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def pair(v: Any, n: int) -> list[int]:
    """``v`` as ``n`` ints (an int repeats)."""
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)] * n
