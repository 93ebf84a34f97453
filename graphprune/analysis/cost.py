"""Cost model: parameters and multiply-accumulates, from the op table."""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from graphprune.coupling.groups import Coupling
from graphprune.ir.dtypes import WEIGHT_TYPES
from graphprune.ir.graph import ChannelGraph, TensorInfo
from graphprune.ops import lookup

__all__ = ["Cost", "cost_label", "cost_with_keep", "data_dims", "model_cost", "param_bytes", "resolve_dims", "sequence_dims", "unset_dims"]

_BITS = {"FLOAT": 32, "FLOAT16": 16, "BFLOAT16": 16, "DOUBLE": 64, "INT8": 8, "UINT8": 8, "INT4": 4, "UINT4": 4,
         "INT16": 16, "UINT16": 16, "INT32": 32, "UINT32": 32, "INT64": 64, "UINT64": 64, "BOOL": 8}


@dataclasses.dataclass(frozen=True)
class Cost:
    """Parameters (float and quantized weight constants) and MACs for one sample."""

    params: int
    macs: int


def model_cost(graph: ChannelGraph) -> Cost:
    """Count parameters and per-sample MACs: the batch counts as 1, other symbolic dims take ``graph.dims``
    (expressions of them too, e.g. ``4*seq``), unset ones count as 1 (:func:`unset_dims` names them)."""
    if graph.dims:
        graph = _with_dims(graph)
    params = sum(
        math.prod(d for d in info.shape if isinstance(d, int))
        for info in graph.tensors.values()
        if info.kind == "param" and info.dtype in WEIGHT_TYPES and info.shape is not None and not _same_copy(graph, info)
    )
    macs = 0
    for node in graph.nodes:
        spec = lookup(node.domain, node.op_type)
        if spec is not None and spec.macs is not None:
            macs += spec.macs(node, graph)
    return Cost(params, macs)


def param_bytes(graph: ChannelGraph) -> int:
    """Bytes of every constant of the graph (weights, scales, shape constants): the model's size without its structure."""
    bits = sum(
        math.prod(d for d in info.shape if isinstance(d, int)) * _BITS.get(info.dtype, 32)
        for info in graph.tensors.values()
        if info.kind == "param" and info.shape is not None and not _same_copy(graph, info)
    )
    return (bits + 7) // 8


def _same_copy(graph: ChannelGraph, info: TensorInfo) -> bool:
    """A load-time copy of a shared constant that still has its original's shape (the rewrite merges them back)."""
    original = graph.copies.get(info.name)
    return original is not None and graph.tensors[original].shape == info.shape


def cost_with_keep(graph: ChannelGraph, coupling: Coupling, keep: Mapping[int, int]) -> Cost:
    """Cost of the model after keeping ``keep[g]`` channels of group ``g`` (no rewrite).

    Only counts matter, not which channels: every member axis shrinks by the
    dropped channels times their element multiplicity.
    """
    shrink: dict[tuple[str, int], int] = {}
    for gid, k in keep.items():
        group = coupling.by_id(gid)
        dropped = group.channels - k
        if dropped <= 0:
            continue
        for m in group.members:
            key = (m.tensor, m.axis)
            shrink[key] = shrink.get(key, 0) + dropped * int(m.indices.shape[1])
    tensors = dict(graph.tensors)
    for (name, axis), n in shrink.items():
        info = tensors[name]
        assert info.shape is not None
        shape = list(info.shape)
        dim = shape[axis]
        if isinstance(dim, int):
            shape[axis] = dim - n
        tensors[name] = TensorInfo(info.name, tuple(shape), info.dtype, info.kind, info.is_output)
    view = ChannelGraph(tensors, graph.nodes, graph.inputs, graph.outputs, graph.constant_loader, dict(graph.dims),
                        dict(graph.copies))
    return model_cost(view)


def sequence_dims(graph: ChannelGraph) -> list[str]:
    """Symbolic input dims other than the leading (batch) one: the sequence axes a transformer's MACs scale with."""
    out: list[str] = []
    for name in graph.inputs:
        for d in (graph.tensors[name].shape or ())[1:]:
            if isinstance(d, str) and d not in out:
                out.append(d)
    return out


def data_dims(graph: ChannelGraph, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Values of the sequence dims read from calibration arrays' shapes (input name -> shape with the batch first)."""
    found: dict[str, int] = {}
    for name in graph.inputs:
        shape = shapes.get(name)
        for d, n in zip((graph.tensors[name].shape or ())[1:], (shape or ())[1:]):
            if isinstance(d, str):
                found.setdefault(d, int(n))
    return found


def resolve_dims(graph: ChannelGraph, seq_len: int | None, inputs: Sequence[np.ndarray] | None) -> None:
    """Set ``graph.dims`` for the cost model: every sequence dim to ``seq_len`` when given, else from the calibration arrays."""
    seq = sequence_dims(graph)
    if seq_len is not None:
        graph.dims.update(dict.fromkeys(seq, int(seq_len)))
    elif inputs is not None:
        graph.dims.update(data_dims(graph, {n: a.shape for n, a in zip(graph.inputs, inputs)}))


def cost_label(graph: ChannelGraph) -> str:
    """What a MACs figure counted: ``MACs / sample (seq = 32)``, or which sequence dims counted as 1."""
    seq = sequence_dims(graph)
    if not seq:
        return "MACs / sample"
    unset = unset_dims(graph)
    if unset:
        return f"MACs / sample ({', '.join(unset)} counted as 1: give --seq-len)"
    return "MACs / sample (" + ", ".join(f"{d} = {graph.dims[d]}" for d in seq) + ")"


def unset_dims(graph: ChannelGraph) -> list[str]:
    """Sequence dims the cost model counts as 1 (no value in ``graph.dims``)."""
    return [d for d in sequence_dims(graph) if d not in graph.dims]


def _dim_value(d: object, dims: Mapping[str, int]) -> object:
    """A symbolic dim (or an expression of dims, from symbolic inference) evaluated with ``dims``; else unchanged."""
    if not isinstance(d, str):
        return d
    if d in dims:
        return dims[d]
    names = _NAME.findall(d)
    if not names or any(n not in dims for n in names) or not _EXPR.fullmatch(d):
        return d
    try:
        value = eval(_NAME.sub(lambda m: str(dims[m.group(0)]), d), {"__builtins__": {}}, {})
    except (SyntaxError, ZeroDivisionError, TypeError):
        return d
    return int(value) if isinstance(value, (int, float)) else d


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPR = re.compile(r"[A-Za-z0-9_+\-*/() ]+")


def _with_dims(graph: ChannelGraph) -> ChannelGraph:
    dims = graph.dims
    tensors = {
        name: TensorInfo(info.name, tuple(_dim_value(d, dims) for d in info.shape), info.dtype, info.kind, info.is_output)  # type: ignore[misc]
        if info.shape is not None else info
        for name, info in graph.tensors.items()
    }
    return ChannelGraph(tensors, graph.nodes, graph.inputs, graph.outputs, graph.constant_loader, copies=dict(graph.copies))
