"""Small helpers shared by the op handlers."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from graphprune.ir.graph import Axis, ChannelGraph, Dim, OpNode
from graphprune.ops.registry import Freeze, Link, Semantics

__all__ = [
    "axes_of",
    "broadcast_links",
    "freeze_axes",
    "freeze_node",
    "identity_links",
    "needs_shapes",
    "norm_axis",
]


def axes_of(graph: ChannelGraph, name: str) -> list[Axis]:
    """Every axis of a tensor (empty when its rank is unknown)."""
    shape = graph.shape(name)
    return [] if shape is None else [Axis(name, i) for i in range(len(shape))]


def freeze_axes(axes: Iterable[Axis], reason: str) -> tuple[Freeze, ...]:
    return tuple(Freeze(a, reason) for a in axes)


def freeze_node(node: OpNode, graph: ChannelGraph, reason: str) -> Semantics:
    """Freeze every axis of every input and output of ``node``."""
    names = [n for n in (*node.inputs, *node.outputs, *node.subgraph_refs) if n]
    return Semantics(freezes=freeze_axes((a for n in names for a in axes_of(graph, n)), reason))


def needs_shapes(node: OpNode, graph: ChannelGraph, names: Sequence[str]) -> Semantics | None:
    """A freezing result when a needed shape is unknown, else None."""
    for name in names:
        if name and graph.shape(name) is None:
            return freeze_node(node, graph, f"{node.op_type}: shape of '{name}' is unknown")
    return None


def identity_links(a: str, b: str, pairs: Iterable[tuple[int, int]]) -> list[Link]:
    return [Link(Axis(a, i), Axis(b, j)) for i, j in pairs]


def _compatible(d: Dim, o: Dim) -> bool:
    if isinstance(d, int) and isinstance(o, int):
        return d == o
    return True


def broadcast_links(node: OpNode, graph: ChannelGraph, inputs: Sequence[str]) -> Semantics:
    """Numpy-style broadcasting of ``inputs`` to every output (same shape)."""
    missing = needs_shapes(node, graph, [*inputs, *node.outputs])
    if missing is not None:
        return missing
    links: list[Link] = []
    out = node.outputs[0]
    oshape = graph.shape(out)
    assert oshape is not None
    for name in inputs:
        if not name:
            continue
        shape = graph.shape(name)
        assert shape is not None
        off = len(oshape) - len(shape)
        if off < 0:
            return freeze_node(node, graph, f"{node.op_type}: input rank exceeds output rank")
        for i, d in enumerate(shape):
            o = oshape[off + i]
            if d == 1 and o != 1:
                continue  # broadcast along this axis
            if not _compatible(d, o):
                return freeze_node(node, graph, f"{node.op_type}: incompatible broadcast")
            links.append(Link(Axis(name, i), Axis(out, off + i)))
    for extra in node.outputs[1:]:
        shape = graph.shape(extra)
        if extra and shape is not None and len(shape) == len(oshape):
            links += identity_links(out, extra, ((i, i) for i in range(len(oshape))))
    return Semantics(links=tuple(links))


def norm_axis(axis: int, rank: int) -> int:
    """Normalise a possibly negative axis.

    Raises:
        ValueError: When the axis is out of range.
    """
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis % rank
