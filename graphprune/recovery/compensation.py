"""Least-squares compensation of pruned channels (METHOD.md section 2, step 5; issue 9).

For every pruned group and every consumer where its channels leave the group
(an exit edge into a Conv, Gemm or MatMul with a constant weight), fit each
dropped input channel as a linear combination of the group's kept channels
plus a constant, over calibration activations, and fold the coefficients
into the consumer: ``W[:, k] += sum_d B[k, d] W[:, d]`` and
``bias += sum_d c_d * sum(W[:, d])``. Linear combinations over channels
commute with convolution, so this is exact for a 1x1 or k x k consumer away
from zero-padded borders (the constant term is approximate there) when the
dropped channels are exact combinations; otherwise it is the least-squares
best. A grouped conv consumer is compensated within each of its groups (a
dropped input reaches only its own group's filters, so only kept inputs of
that group stand in for it); a depthwise consumer keeps its channels in the
group, so it is never an exit. Activations are streamed into per-edge Gram
matrices (memory O((C_g m)^2) per edge, m elements per channel). Consumers
whose weight is not a constant (attention products, SE scales) or that are
not Conv, Gemm or MatMul are skipped and reported; a MatMul's constant term
goes into the bias of the Add that follows it, or is dropped when there is none.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import numpy as np
import torch

from graphprune.analysis.gates import GateEdge, compose, plan_gates
from graphprune.coupling.groups import Coupling
from graphprune.execution.interpreter import GraphInterpreter
from graphprune.frontends.data import Calibration
from graphprune.ir.graph import ChannelGraph, OpNode
from graphprune.ir.plan import Plan

__all__ = ["Compensation", "compensate"]

log = logging.getLogger(__name__)

RIDGE = 1e-6
"""Ridge added to the kept channels' covariance, relative to its mean diagonal."""


@dataclasses.dataclass(frozen=True)
class Compensation:
    """New constant values (by graph name) and what could not be compensated."""

    values: Mapping[str, np.ndarray]
    edges: int
    skipped: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Target:
    """Where to fold: the consumer's weight (input axis), bias, and conv group count."""

    edge: GateEdge
    weight: str
    in_axis: int
    bias: str | None
    groups: int = 1


def _target(node: OpNode, edge: GateEdge, graph: ChannelGraph) -> _Target | str:
    if edge.input_index != 0 or len(node.inputs) < 2 or graph.const(node.inputs[1]) is None:
        return f"{node.name}: the channels do not enter a constant weight"
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] and graph.const(node.inputs[2]) is not None else None
    if node.op_type == "Conv":
        groups = int(node.attrs.get("group", 1))
        return _Target(edge, node.inputs[1], 1, bias, groups) if edge.axis == 1 else f"{node.name}: not the channel axis"
    if node.op_type == "Gemm" and not int(node.attrs.get("transA", 0)) and edge.axis == 1:
        return _Target(edge, node.inputs[1], 1 if int(node.attrs.get("transB", 0)) else 0, bias)
    if node.op_type == "MatMul":
        rank = graph.tensors[node.inputs[0]].rank or 0
        w = graph.shape(node.inputs[1]) or ()
        if len(w) == 2 and isinstance(w[1], int) and edge.axis == rank - 1:
            return _Target(edge, node.inputs[1], 0, _bias_after(node, graph, w[1]))
    return f"{node.name}: {node.op_type} consumer is not compensated"


def _bias_after(node: OpNode, graph: ChannelGraph, width: int) -> str | None:
    """The constant bias of the Add that alone consumes a MatMul's output (a Linear layer), if any."""
    users = graph.consumers().get(node.outputs[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    for name in users[0].inputs:
        if name != node.outputs[0] and graph.const(name) is not None and graph.shape(name) == (width,):
            return name
    return None


class _Stats:
    """Streamed sums of x, x x^T over samples and positions for one edge's elements."""

    def __init__(self, c: int) -> None:
        self.s1 = np.zeros(c)
        self.s2 = np.zeros((c, c))
        self.n = 0.0

    def add(self, x: torch.Tensor, axis: int, idx: np.ndarray) -> None:
        ch = x.detach().index_select(axis, torch.as_tensor(idx, device=x.device)).movedim(axis, -1)
        flat = ch.reshape(-1, idx.size).double()
        self.s1 += flat.sum(0).cpu().numpy()
        self.s2 += (flat.T @ flat).cpu().numpy()
        self.n += flat.shape[0]


def _collect(graph: ChannelGraph, targets: list[_Target], data: Calibration, batch_size: int) -> list[_Stats]:
    interp = GraphInterpreter(graph).eval()
    stats = [_Stats(t.edge.index.size) for t in targets]
    per_edge: dict[tuple[str, int], list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    for t, st in zip(targets, stats):
        def tap(x: torch.Tensor, t: _Target = t, st: _Stats = st) -> torch.Tensor:
            st.add(x, t.edge.axis, t.edge.index.ravel())
            return x
        per_edge.setdefault((t.edge.node, t.edge.input_index), []).append(tap)
    taps = {key: compose(fns) for key, fns in per_edge.items()}
    with torch.no_grad():
        for _, inputs, _ in data.batches(batch_size):
            interp(*(torch.from_numpy(a) for a in inputs), edge_taps=taps)
    return stats


def _coefficients(st: _Stats, keep: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """B (|K| x |D|) and c (|D|) minimising ||x_D - B^T x_K - c||^2 (positions into the edge's elements)."""
    mean = st.s1 / max(st.n, 1.0)
    if not keep.size:
        return np.zeros((0, drop.size)), mean[drop]
    cov = st.s2 / max(st.n, 1.0) - np.outer(mean, mean)
    ckk = cov[np.ix_(keep, keep)]
    ckk = ckk + RIDGE * max(float(np.trace(ckk)) / max(len(keep), 1), 1e-12) * np.eye(len(keep))
    b = np.linalg.solve(ckk, cov[np.ix_(keep, drop)])
    c = mean[drop] - b.T @ mean[keep]
    return b, c


@dataclasses.dataclass(frozen=True)
class _Block:
    """Edge element positions that feed the same outputs: kept and dropped, and the conv group they are in."""

    keep: np.ndarray
    drop: np.ndarray
    group: int


def _blocks(t: _Target, weight_shape: tuple[int, ...], keep_ch: np.ndarray, drop_ch: np.ndarray) -> list[_Block]:
    """Split an edge's kept/dropped elements by the consumer's conv group (one block for a dense consumer).

    A dropped input of a grouped conv only reaches its own group's filters, so
    only kept inputs of the same group can stand in for it.
    """
    m = t.edge.index.shape[1]
    pos = np.arange(t.edge.index.size).reshape(-1, m)
    keep, drop = pos[keep_ch].ravel(), pos[drop_ch].ravel()
    if t.groups == 1:
        return [_Block(keep, drop, 0)]
    per_group = weight_shape[1]
    elements = t.edge.index.ravel()
    out = []
    for g in np.unique(elements[drop] // per_group):
        out.append(_Block(keep[elements[keep] // per_group == g], drop[elements[drop] // per_group == g], int(g)))
    return out


def _fold(values: dict[str, np.ndarray], graph: ChannelGraph, t: _Target, block: _Block,
          b: np.ndarray, c: np.ndarray) -> None:
    """``W[:, k] += sum_d B[k, d] W[:, d]`` and ``bias += c . sum(W[:, D])`` on the block's filters."""
    w = values.get(t.weight)
    if w is None:
        w = np.array(graph.const(t.weight), dtype=np.float64)
    bias = None
    if t.bias is not None:
        bias = values.get(t.bias)
        if bias is None:
            bias = np.array(graph.const(t.bias), dtype=np.float64)
    el = t.edge.index.ravel()
    if t.groups == 1:
        view, out_rows = np.moveaxis(w, t.in_axis, 0), slice(None)  # (C_in, ...): row e is input element e
        rows_k, rows_d = el[block.keep], el[block.drop]
    else:
        per_group, out_per_group = w.shape[1], w.shape[0] // t.groups
        out_rows = slice(block.group * out_per_group, (block.group + 1) * out_per_group)
        view = np.moveaxis(w[out_rows], 1, 0)  # (C_in/g, C_out/g, k...): this group's filters
        rows_k, rows_d = el[block.keep] % per_group, el[block.drop] % per_group
    wd = view[rows_d].copy()
    if rows_k.size:
        view[rows_k] += np.tensordot(b, wd, axes=(1, 0))
    if bias is not None and wd.ndim >= 2:
        sums = wd.reshape(len(rows_d), wd.shape[1], -1).sum(-1)
        bias[out_rows] += c @ sums
        if t.bias is not None:
            values[t.bias] = bias
    values[t.weight] = w


def compensate(graph: ChannelGraph, coupling: Coupling, plan: Plan, data: Calibration, batch_size: int = 64) -> Compensation:
    """Weights and biases that compensate ``plan``'s dropped channels (original graph names, full shapes).

    Apply the values to the unpruned model, then rewrite with the same plan.
    """
    gates = plan_gates(coupling, graph)
    nodes = {n.name: n for n in graph.nodes}
    targets: list[_Target] = []
    plans: list[list[_Block]] = []
    skipped: list[str] = []
    for gp in plan.groups:
        keep = np.asarray(gp.keep, dtype=np.int64)
        drop = np.setdiff1d(np.arange(gp.channels), keep)
        for edge in gates.edges.get(gp.group, ()):
            t = _target(nodes[edge.node], edge, graph)
            if isinstance(t, str):
                skipped.append(t)
                continue
            targets.append(t)
            plans.append(_blocks(t, graph.param(t.weight).shape, keep, drop))
        if gp.group in gates.skipped:
            skipped.append(f"group {gp.group}: {gates.skipped[gp.group]}")
    if not targets:
        return Compensation({}, 0, tuple(skipped))
    stats = _collect(graph, targets, data, batch_size)
    values: dict[str, np.ndarray] = {}
    for t, st, blocks in zip(targets, stats, plans):
        for block in blocks:
            b, c = _coefficients(st, block.keep, block.drop)
            _fold(values, graph, t, block, b, c)
    dtypes = {name: graph.param(name).dtype for name in values}
    return Compensation({k: v.astype(dtypes[k]) for k, v in values.items()}, len(targets), tuple(skipped))
