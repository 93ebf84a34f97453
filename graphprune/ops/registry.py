"""The op semantics table: how each op maps channels between its tensors.

One entry per op, keyed by ONNX ``(domain, op_type)``; the torch frontend's
converters register their aten targets onto the same entries
(:func:`add_torch_targets`), so ``torch_targets`` is filled by them, never by
hand. A handler is a stateless function that states, for one node, which axes
are linked (with an element map), which are frozen (and why), and which are
split or merged by a reshape. Ops without an entry freeze every axis they touch.

The entry also says, once, how the op follows a plan: ``adjust`` returns the
:class:`Adjustment` (attributes, constant inputs, shape vectors) every backend
applies, and ``module`` (a :class:`ModuleRule`) says which ``nn.Module``
attributes hold those attributes and which follow the new sizes of its axes.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from graphprune.errors import ValidationError
from graphprune.ir.graph import Axis, ChannelGraph, OpNode

__all__ = [
    "AdjustContext",
    "Adjustment",
    "AxisOf",
    "Factor",
    "Freeze",
    "Link",
    "ModuleRule",
    "OpSpec",
    "Semantics",
    "add_torch_targets",
    "adjustments",
    "attr_or_input",
    "lookup",
    "register",
    "register_module_rule",
    "register_run",
    "registered_ops",
]

log = logging.getLogger(__name__)


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
    other parts (pruning two factors of one axis at once is not expressible);
    ``prefer`` names the part to choose when nothing else decides (attention
    heads rather than the head size).
    """

    whole: Axis
    parts: tuple[Axis, ...]
    part_sizes: tuple[int, ...]
    prefer: int | None = None


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

    def old_size(self, axis: Axis) -> int | None:
        """Static size of ``axis`` before pruning."""
        return self.graph.tensors[axis.tensor].size(axis.axis)

    def new_size(self, axis: Axis) -> int | None:
        """Size of ``axis`` after pruning (its old size when untouched)."""
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


Size = int | tuple[int, ...]
"""A module size attribute: one axis's size, or a whole shape."""


@dataclasses.dataclass(frozen=True)
class AxisOf:
    """One axis (or, ``axis`` None, the whole shape) of one of an op's tensors.

    Attributes:
        index: Input index, or output index when ``output``.
        axis: Axis (negative counts from the end), or None for every axis.
        output: Whether ``index`` counts outputs.
        axis_attr: The op attribute holding the axis instead (Split's ``axis``; absent means 0).
    """

    index: int
    axis: int | None = None
    output: bool = False
    axis_attr: str | None = None

    def sizes(self, node: OpNode, ctx: AdjustContext) -> tuple[Size, Size] | None:
        """(old, new) size, or None when the tensor is absent or a size is not static."""
        names = node.outputs if self.output else node.inputs
        name = names[self.index] if self.index < len(names) else ""
        shape = ctx.graph.shape(name)
        if shape is None:
            return None
        axis = int(node.attrs.get(self.axis_attr, 0)) if self.axis_attr is not None else self.axis
        axes = range(len(shape)) if axis is None else (axis % len(shape),)
        old = [ctx.old_size(Axis(name, a)) for a in axes]
        new = [ctx.new_size(Axis(name, a)) for a in axes]
        if any(v is None for v in (*old, *new)):
            return None
        o, n = tuple(int(v) for v in old if v is not None), tuple(int(v) for v in new if v is not None)
        return (o, n) if axis is None else (o[0], n[0])


ModuleHook = Callable[[Any], None]
"""Fixes one pruned module of a class after its tensors were sliced (raises ValueError when it cannot)."""


@dataclasses.dataclass(frozen=True)
class ModuleRule:
    """How the ``nn.Module`` that owns an op's parameters follows a plan.

    The torch module backend applies it to the module owning the state of the
    call the op was converted from; an attribute is only set when the module
    has it with the op's old value (so a rule never writes into an unrelated
    module).

    Attributes:
        attrs: ONNX attribute -> module attribute holding it (Conv ``group``
            -> ``groups``); the new value comes from the op's Adjustment.
        sizes: Module attribute -> the op axis whose new size it holds (Conv
            ``out_channels`` -> the weight's axis 0).
        hook: A per-class fix for modules the attributes cannot describe.
        hook_class: The class ``hook`` applies to (every pruned instance).
        call_sizes: The input whose call argument names module attributes per entry
            (:attr:`~graphprune.ir.graph.ArgRef.attributes`, ``view(*s, self.heads, d)``): each is set to the
            new size of the output axis at its entry.
    """

    attrs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    sizes: Mapping[str, AxisOf] = dataclasses.field(default_factory=dict)
    hook: ModuleHook | None = None
    hook_class: type | None = None
    call_sizes: int | None = None

    def edits(self, node: OpNode, ctx: AdjustContext, adj: Adjustment) -> dict[str, tuple[Any, Any]]:
        """Module attribute -> (old value, new value) for one op."""
        out: dict[str, tuple[Any, Any]] = {}
        for onnx_attr, attr in self.attrs.items():
            if onnx_attr in adj.attrs and onnx_attr in node.attrs:
                out[attr] = (node.attrs[onnx_attr], adj.attrs[onnx_attr])
        named = [(attr, AxisOf(0, j, output=True)) for j, attr in self._call_attributes(node)]
        for attr, ref in (*self.sizes.items(), *named):
            found = ref.sizes(node, ctx)
            if found is not None:
                out[attr] = found
        return out

    def _call_attributes(self, node: OpNode) -> tuple[tuple[int, str], ...]:
        ref = node.origin.inputs.get(self.call_sizes) if node.origin is not None and self.call_sizes is not None else None
        return ref.attributes if ref is not None else ()

    def fix(self, module: Any) -> None:
        """Run the per-class hook when ``module`` is of its class."""
        if self.hook is not None and self.hook_class is not None and isinstance(module, self.hook_class):
            self.hook(module)


CoupleFn = Callable[[OpNode, ChannelGraph], Semantics]
AdjustFn = Callable[[OpNode, AdjustContext], Adjustment]
MacsFn = Callable[[OpNode, ChannelGraph], int]
RunFn = Callable[[OpNode, list[Any]], tuple[Any, ...]]
"""Torch execution of one node: (node, input tensors or None) -> output tensors."""


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One row of the op semantics table.

    ``couple`` of None means the op is executable (``run``) but has no channel
    semantics: its axes freeze, as for an unknown op. ``torch_targets`` are
    the aten targets the torch frontend converts into this op (filled by the
    converters' registration). ``module`` says how an ``nn.Module`` owning the
    op follows a plan. ``zero_point`` is, for a quantized op, the input
    index of its output's zero point: the value that stands for 0 there
    (the masked reference fills removed channels with it).
    """

    domain: str
    op_type: str
    couple: CoupleFn | None
    adjust: AdjustFn | None = None
    macs: MacsFn | None = None
    torch_targets: tuple[str, ...] = ()
    run: RunFn | None = None
    module: ModuleRule | None = None
    zero_point: int | None = None


_TABLE: dict[tuple[str, str], OpSpec] = {}


def register(
    *op_types: str,
    domain: str = "",
    adjust: AdjustFn | None = None,
    macs: MacsFn | None = None,
    module: ModuleRule | None = None,
    zero_point: int | None = None,
) -> Callable[[CoupleFn], CoupleFn]:
    """Decorator: register a coupling handler for one or more ONNX op types.

    Args:
        op_types: ONNX op types sharing the handler.
        domain: Their ONNX domain.
        adjust: Rewrite hook: the node's edits for a plan.
        macs: Cost hook.
        module: How a torch module owning the op follows a plan.
        zero_point: Input index of the output's zero point (quantized ops).

    Raises:
        ValueError: When an op type is registered twice.
    """

    def deco(fn: CoupleFn) -> CoupleFn:
        for op_type in op_types:
            key = (domain, op_type)
            old = _TABLE.get(key) or OpSpec(domain, op_type, None)
            if old.couple is not None:
                raise ValueError(f"op {key} registered twice")
            _TABLE[key] = dataclasses.replace(
                old, couple=fn, adjust=adjust, macs=macs, module=module or old.module, zero_point=zero_point
            )
        return fn

    return deco


def add_torch_targets(op_types: Sequence[str], targets: Sequence[str], domain: str = "") -> None:
    """Record that the torch frontend converts ``targets`` into ``op_types`` (called by its converter registry).

    Raises:
        ValueError: When an op is not in the table (a converter must write ops the table knows).
    """
    for op_type in op_types:
        old = _TABLE.get((domain, op_type))
        if old is None or old.couple is None:
            raise ValueError(f"converters for {list(targets)} write {op_type}, which the op table does not know")
        merged = old.torch_targets + tuple(t for t in targets if t not in old.torch_targets)
        _TABLE[(domain, op_type)] = dataclasses.replace(old, torch_targets=merged)


def register_module_rule(op_type: str, rule: ModuleRule, domain: str = "") -> None:
    """Attach a module rule to an entry (for rules whose class lives in a frontend, e.g. a hook).

    Raises:
        ValueError: When the op is not in the table or already has a module rule.
    """
    old = _TABLE.get((domain, op_type))
    if old is None or old.module is not None:
        raise ValueError(f"op {(domain, op_type)}: unknown or already has a module rule")
    _TABLE[(domain, op_type)] = dataclasses.replace(old, module=rule)


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
    """Every entry of the table."""
    return tuple(_TABLE.values())


def adjustments(graph: ChannelGraph, kept: Mapping[Axis, np.ndarray]) -> Iterator[tuple[OpNode, OpSpec, Adjustment]]:
    """Every known node with its table entry and its edits for a plan (empty without an ``adjust`` hook).

    This is the one place the table's rewrite rules are evaluated; backends
    only apply what it yields.

    Raises:
        ValidationError: When a hook finds the plan and the node inconsistent.
    """
    ctx = AdjustContext(kept, graph)
    for node in graph.nodes:
        spec = lookup(node.domain, node.op_type)
        if spec is None:
            continue
        if spec.adjust is None:
            yield node, spec, Adjustment()
            continue
        try:
            adj = spec.adjust(node, ctx)
        except (ValueError, IndexError, KeyError, TypeError) as exc:  # an inconsistent model: shapes contradict the graph
            log.debug("adjust hook of %s failed on %s", node.op_type, node.name, exc_info=True)
            raise ValidationError(f"cannot rewrite {node.op_type} node '{node.name}': {exc}") from None
        yield node, spec, adj


def attr_or_input(
    node: OpNode, graph: ChannelGraph, attr: str, index: int
) -> np.ndarray | None:
    """Read an operand that moved from an attribute to an input across opsets."""
    if attr in node.attrs:
        return np.asarray(node.attrs[attr])
    if index < len(node.inputs) and node.inputs[index]:
        return graph.const(node.inputs[index])
    return None
