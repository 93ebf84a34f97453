"""The op semantics table: how each op maps channels between its tensors.

One entry per op, keyed by ONNX ``(domain, op_type)``; the torch frontend maps
its targets onto the same entries. A handler is a stateless function that
states, for one node, which axes are linked (with an element map), which are
frozen (and why), and which are split or merged by a reshape. Ops without an
entry freeze every axis they touch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from graphprune.ir.graph import Axis, ChannelGraph, OpNode

__all__ = [
    "AdjustContext",
    "Adjustment",
    "Factor",
    "Freeze",
    "Link",
    "OpSpec",
    "Semantics",
    "attr_or_input",
    "lookup",
    "register",
    "register_run",
    "registered_ops",
]


@dataclasses.dataclass(frozen=True)
class Link:
    """Element ``a_idx[i]`` of axis ``a`` is the same channel as ``b_idx[i]`` of ``b``.

    ``a_idx``/``b_idx`` of None mean the identity over the whole axis (both
    axes then have the same size, or at least one is dynamic).
    """

    a: Axis
    b: Axis
    a_idx: np.ndarray | None = None
    b_idx: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Freeze:
    """Axis that must keep every element, with the reason shown to users."""

    axis: Axis
    reason: str


@dataclasses.dataclass(frozen=True)
class Factor:
    """A reshape merges ``parts`` (row-major) into ``whole``, or splits it.

    The coupling analysis links ``whole`` to at most one part and freezes the
    other parts (pruning two factors of one axis at once is not expressible).
    """

    whole: Axis
    parts: tuple[Axis, ...]
    part_sizes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Semantics:
    """What one node says about its axes."""

    links: tuple[Link, ...] = ()
    freezes: tuple[Freeze, ...] = ()
    factors: tuple[Factor, ...] = ()


@dataclasses.dataclass(frozen=True)
class AdjustContext:
    """What a rewrite hook may ask about a plan: kept elements per axis."""

    kept: Mapping[Axis, np.ndarray]
    graph: ChannelGraph

    def kept_of(self, axis: Axis) -> np.ndarray | None:
        """Sorted kept element indices of ``axis``, or None when untouched."""
        return self.kept.get(axis)

    def new_size(self, axis: Axis) -> int | None:
        kept = self.kept.get(axis)
        if kept is not None:
            return int(kept.size)
        return self.graph.tensors[axis.tensor].size(axis.axis)


@dataclasses.dataclass(frozen=True)
class Adjustment:
    """Format-agnostic edits of one node after its tensors were sliced.

    Attributes:
        attrs: Attribute values to set.
        const_inputs: Input index -> new constant value for that input.
        shape_overrides: Input index (a shape vector) -> {entry: new value};
            backends patch a constant or compute the entry at run time.
    """

    attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    const_inputs: Mapping[int, np.ndarray] = dataclasses.field(default_factory=dict)
    shape_overrides: Mapping[int, Mapping[int, int]] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.attrs or self.const_inputs or self.shape_overrides)


CoupleFn = Callable[[OpNode, ChannelGraph], Semantics]
AdjustFn = Callable[[OpNode, AdjustContext], Adjustment]
MacsFn = Callable[[OpNode, ChannelGraph], int]
RunFn = Callable[[OpNode, list[Any]], tuple[Any, ...]]
"""Torch execution of one node: (node, input tensors or None) -> output tensors."""


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One row of the op semantics table.

    ``couple`` of None means the op is executable (``run``) but has no channel
    semantics: its axes freeze, as for an unknown op.
    """

    domain: str
    op_type: str
    couple: CoupleFn | None
    adjust: AdjustFn | None = None
    macs: MacsFn | None = None
    torch_targets: tuple[str, ...] = ()
    run: RunFn | None = None


_TABLE: dict[tuple[str, str], OpSpec] = {}


def register(
    *op_types: str,
    domain: str = "",
    adjust: AdjustFn | None = None,
    macs: MacsFn | None = None,
    torch_targets: tuple[str, ...] = (),
) -> Callable[[CoupleFn], CoupleFn]:
    """Decorator: register a coupling handler for one or more ONNX op types.

    Raises:
        ValueError: When an op type is registered twice.
    """

    def deco(fn: CoupleFn) -> CoupleFn:
        for op_type in op_types:
            key = (domain, op_type)
            old = _TABLE.get(key)
            if old is not None and old.couple is not None:
                raise ValueError(f"op {key} registered twice")
            run = old.run if old is not None else None
            _TABLE[key] = OpSpec(domain, op_type, fn, adjust, macs, torch_targets, run)
        return fn

    return deco


def register_run(*op_types: str, domain: str = "") -> Callable[[RunFn], RunFn]:
    """Decorator: attach a torch implementation to ops of the table.

    An op without channel semantics gets a row whose axes freeze.

    Raises:
        ValueError: When an op gets two implementations.
    """

    def deco(fn: RunFn) -> RunFn:
        for op_type in op_types:
            key = (domain, op_type)
            old = _TABLE.get(key) or OpSpec(domain, op_type, None)
            if old.run is not None:
                raise ValueError(f"op {key} has two torch implementations")
            _TABLE[key] = dataclasses.replace(old, run=fn)
        return fn

    return deco


def lookup(domain: str, op_type: str) -> OpSpec | None:
    """The table entry for an op, or None (the op then freezes its axes)."""
    if domain == "ai.onnx":
        domain = ""
    return _TABLE.get((domain, op_type))


def registered_ops() -> tuple[OpSpec, ...]:
    return tuple(_TABLE.values())


def attr_or_input(
    node: OpNode, graph: ChannelGraph, attr: str, index: int
) -> np.ndarray | None:
    """Read an operand that moved from an attribute to an input across opsets."""
    if attr in node.attrs:
        return np.asarray(node.attrs[attr])
    if index < len(node.inputs) and node.inputs[index]:
        return graph.const(node.inputs[index])
    return None
