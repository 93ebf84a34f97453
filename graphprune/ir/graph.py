"""Format-agnostic channel graph: tensors with shapes, ops with attributes.

Frontends (ONNX, torch) build a :class:`ChannelGraph`; the op semantics table,
the coupling analysis and the cost model read only this.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np

__all__ = ["Axis", "ChannelGraph", "Dim", "OpNode", "TensorInfo", "TensorKind", "input_dependent", "live_nodes"]

Dim = int | str | None
"""A dimension: a known size, a symbolic name (dynamic), or None (unknown)."""

TensorKind = Literal["input", "param", "activation"]


@dataclasses.dataclass(frozen=True, order=True)
class Axis:
    """One axis of one tensor: the unit the coupling analysis links."""

    tensor: str
    axis: int

    def __str__(self) -> str:
        return f"{self.tensor}[{self.axis}]"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Static facts about a tensor.

    Attributes:
        name: Unique name in the graph.
        shape: Dims, or None when even the rank is unknown.
        dtype: Element type name (e.g. ``"FLOAT"``).
        kind: ``input`` (graph input), ``param`` (constant) or ``activation``.
        is_output: Whether the tensor is a graph output.
    """

    name: str
    shape: tuple[Dim, ...] | None
    dtype: str
    kind: TensorKind
    is_output: bool = False

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def size(self, axis: int) -> int | None:
        """Static size of ``axis``, or None when dynamic or unknown."""
        if self.shape is None:
            return None
        dim = self.shape[axis]
        return dim if isinstance(dim, int) else None


@dataclasses.dataclass(frozen=True)
class ArgRef:
    """Where one ONNX attribute or constant input of an op sits in the traced call it came from.

    Attributes:
        index: Position in the call's arguments.
        key: The argument's keyword name (used when it was not passed by position).
        offset: For a vector aligned with the output's axes (a Reshape shape):
            entry ``j`` of the ONNX vector is entry ``j - offset`` of the call's list.
        first: The call takes only the vector's first entry, as an int
            (``aten.split.Tensor``'s split size).
        inferred: Entries of the ONNX vector the call gives as -1 (``x.view(*s, -1, d)``): sizes the traced
            code computes at run time, which therefore follow a pruned axis with no rewrite.
        attributes: (entry, name) for entries that are an int attribute of the module that made the call
            (``x.view(*s, self.heads, d)``): the module backend sets the attribute to the entry's new size.
    """

    index: int
    key: str
    offset: int = 0
    first: bool = False
    inferred: tuple[int, ...] = ()
    attributes: tuple[tuple[int, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Origin:
    """The traced call an op was converted from (plain data: names, no torch objects).

    Attributes:
        call: Name of the call (the fx node).
        target: Its target, e.g. ``aten.conv2d.default``.
        state: Graph tensors of module state among the call's arguments
            (they name the module that owns the call).
        attrs: ONNX attribute -> the call argument it came from.
        inputs: ONNX input index (a constant) -> the call argument it came from.
        module: Qualified name of the innermost module whose ``forward`` made the call (``""``: the root), or
            None when the trace does not say.
    """

    call: str
    target: str
    state: tuple[str, ...] = ()
    attrs: Mapping[str, ArgRef] = dataclasses.field(default_factory=dict)
    inputs: Mapping[int, ArgRef] = dataclasses.field(default_factory=dict)
    module: str | None = None


@dataclasses.dataclass(frozen=True)
class OpNode:
    """One operation, described by its ONNX identity.

    Attributes:
        name: Node name (unique; frontends make one up when absent).
        domain: ONNX domain (``""`` is the default domain).
        op_type: ONNX op type.
        inputs: Input tensor names; ``""`` for an omitted optional input.
        outputs: Output tensor names.
        attrs: Attribute values as plain Python data.
        opset: Opset version of the node's domain.
        subgraph_refs: Outer-scope tensors read by subgraphs; non-empty
            (or ``has_subgraph``) means the node holds control flow.
        has_subgraph: Whether the node carries graph attributes.
        origin: The traced call the node was converted from (torch frontend only).
    """

    name: str
    domain: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any]
    opset: int
    subgraph_refs: tuple[str, ...] = ()
    has_subgraph: bool = False
    origin: Origin | None = None


@dataclasses.dataclass
class ChannelGraph:
    """Tensors and ops in topological order, plus lazy access to constants.

    Attributes:
        tensors: Every known tensor by name.
        nodes: Ops in topological order.
        inputs: Graph input names (non-constant).
        outputs: Graph output names.
        constant_loader: Returns the value of a ``param`` tensor.
    """

    tensors: dict[str, TensorInfo]
    nodes: list[OpNode]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    constant_loader: Callable[[str], np.ndarray]
    _consumers: dict[str, list[OpNode]] | None = dataclasses.field(default=None, init=False, repr=False)
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    """Values of symbolic dims for the cost model (a sequence length); the batch and unnamed dims count as 1."""
    copies: dict[str, str] = dataclasses.field(default_factory=dict)
    """Constants copied at load (copy -> original): each use of a shared constant is its own tensor, so one use's
    channels do not tie another's (the cost model counts a copy once it differs from its original)."""
    memo: dict[str, Any] = dataclasses.field(default_factory=dict, init=False, repr=False)
    """Facts derived from the graph once (e.g. the shape values of ``ops.shape_values``)."""

    def const(self, name: str) -> np.ndarray | None:
        """Value of a constant tensor, or None when ``name`` is not constant."""
        info = self.tensors.get(name)
        if not name or info is None or info.kind != "param":
            return None
        return self.constant_loader(name)

    def param(self, name: str) -> np.ndarray:
        """Value of a tensor the caller has already found to be constant.

        Raises:
            KeyError: When ``name`` is not a constant of this graph.
        """
        value = self.const(name)
        if value is None:
            raise KeyError(f"'{name}' is not a constant of the graph")
        return value

    def info(self, name: str) -> TensorInfo | None:
        return self.tensors.get(name) if name else None

    def shape(self, name: str) -> tuple[Dim, ...] | None:
        info = self.info(name)
        return None if info is None else info.shape

    def producers(self) -> dict[str, OpNode]:
        """Map tensor name -> the op that writes it (computed once)."""
        found = self.memo.get("producers")
        if found is None:
            found = self.memo["producers"] = {o: n for n in self.nodes for o in n.outputs if o}
        return found

    def consumers(self) -> dict[str, list[OpNode]]:
        """Map tensor name -> ops that read it (computed once)."""
        if self._consumers is None:
            out: dict[str, list[OpNode]] = {}
            for node in self.nodes:
                for name in (*node.inputs, *node.subgraph_refs):
                    if name:
                        out.setdefault(name, []).append(node)
            self._consumers = out
        return self._consumers


def input_dependent(graph: ChannelGraph) -> frozenset[str]:
    """Tensors whose value depends on a graph input (computed once); the others are computed from constants only,
    like a quantized weight's DequantizeLinear output."""
    found = graph.memo.get("input_dependent")
    if found is None:
        seen = set(graph.inputs)
        for node in graph.nodes:
            if any(n in seen for n in (*node.inputs, *node.subgraph_refs) if n):
                seen.update(o for o in node.outputs if o)
        found = graph.memo["input_dependent"] = frozenset(seen)
    return found


def live_nodes(nodes: list[OpNode], outputs: tuple[str, ...]) -> list[OpNode]:
    """The ops (in order) whose results reach ``outputs``; dead ones would freeze channels for nothing."""
    needed = set(outputs)
    live: list[OpNode] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.outputs):
            live.append(node)
            needed.update(n for n in (*node.inputs, *node.subgraph_refs) if n)
    return live[::-1]
