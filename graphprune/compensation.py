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
best. Activations are streamed into per-edge Gram matrices (memory
O(C_g^2) per edge). Grouped and depthwise consumers, element maps with more
than one element per channel, and consumers without a constant weight are
skipped and reported.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import numpy as np
import torch

from graphprune.coupling import Coupling
from graphprune.data import Calibration
from graphprune.gates import GateEdge, compose, plan_gates
from graphprune.graph import ChannelGraph, OpNode
from graphprune.interpreter import GraphInterpreter
from graphprune.plan import Plan

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
    """Where to fold: the consumer's weight (input axis) and bias."""

    edge: GateEdge
    weight: str
    in_axis: int
    bias: str | None


def _target(node: OpNode, edge: GateEdge, graph: ChannelGraph) -> _Target | str:
    if edge.index.shape[1] != 1:
        return f"{node.name}: channels map to several elements"
    if edge.input_index != 0 or len(node.inputs) < 2 or graph.const(node.inputs[1]) is None:
        return f"{node.name}: the channels do not enter a constant weight"
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] and graph.const(node.inputs[2]) is not None else None
    if node.op_type == "Conv":
        if int(node.attrs.get("group", 1)) != 1:
            return f"{node.name}: grouped or depthwise consumer"
        return _Target(edge, node.inputs[1], 1, bias) if edge.axis == 1 else f"{node.name}: not the channel axis"
    if node.op_type == "Gemm" and not int(node.attrs.get("transA", 0)) and edge.axis == 1:
        return _Target(edge, node.inputs[1], 1 if int(node.attrs.get("transB", 0)) else 0, bias)
    if node.op_type == "MatMul":
        rank = graph.tensors[node.inputs[0]].rank or 0
        w = graph.shape(node.inputs[1]) or ()
        if len(w) == 2 and edge.axis == rank - 1:
            return _Target(edge, node.inputs[1], 0, None)
    return f"{node.name}: {node.op_type} consumer is not compensated"


class _Stats:
    """Streamed sums of x, x x^T over samples and positions for one edge's channels."""

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
    stats = [_Stats(t.edge.index.shape[0]) for t in targets]
    per_edge: dict[tuple[str, int], list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    for t, st in zip(targets, stats):
        def tap(x: torch.Tensor, t: _Target = t, st: _Stats = st) -> torch.Tensor:
            st.add(x, t.edge.axis, t.edge.index[:, 0])
            return x
        per_edge.setdefault((t.edge.node, t.edge.input_index), []).append(tap)
    taps = {key: compose(fns) for key, fns in per_edge.items()}
    with torch.no_grad():
        for _, inputs, _ in data.batches(batch_size):
            interp(*(torch.from_numpy(a) for a in inputs), edge_taps=taps)
    return stats


def _coefficients(st: _Stats, keep: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """B (|K| x |D|) and c (|D|) minimising ||x_D - B^T x_K - c||^2."""
    mean = st.s1 / max(st.n, 1.0)
    cov = st.s2 / max(st.n, 1.0) - np.outer(mean, mean)
    ckk = cov[np.ix_(keep, keep)]
    ckk = ckk + RIDGE * max(float(np.trace(ckk)) / max(len(keep), 1), 1e-12) * np.eye(len(keep))
    b = np.linalg.solve(ckk, cov[np.ix_(keep, drop)])
    c = mean[drop] - b.T @ mean[keep]
    return b, c


def _fold(values: dict[str, np.ndarray], graph: ChannelGraph, t: _Target, keep: np.ndarray, drop: np.ndarray,
          b: np.ndarray, c: np.ndarray) -> None:
    w = values.get(t.weight)
    if w is None:
        w = np.array(graph.const(t.weight), dtype=np.float64)
    w = np.moveaxis(w, t.in_axis, 0)  # (C_in, ...): row e is input element e
    el = t.edge.index[:, 0]
    rows_k, rows_d = el[keep], el[drop]
    wd = w[rows_d].copy()
    w[rows_k] += np.tensordot(b, wd, axes=(1, 0))
    out_axis_sums = wd.reshape(len(drop), wd.shape[1], -1).sum(-1) if wd.ndim > 2 else wd
    if t.bias is not None and wd.ndim >= 2:
        bias = values.get(t.bias)
        if bias is None:
            bias = np.array(graph.const(t.bias), dtype=np.float64)
        values[t.bias] = bias + c @ out_axis_sums
    values[t.weight] = np.moveaxis(w, 0, t.in_axis)


def compensate(graph: ChannelGraph, coupling: Coupling, plan: Plan, data: Calibration, batch_size: int = 64) -> Compensation:
    """Weights and biases that compensate ``plan``'s dropped channels (original graph names, full shapes).

    Apply the values to the unpruned model, then rewrite with the same plan.
    """
    gates = plan_gates(coupling, graph)
    nodes = {n.name: n for n in graph.nodes}
    targets: list[_Target] = []
    plans: list[tuple[np.ndarray, np.ndarray]] = []
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
            plans.append((keep, drop))
        if gp.group in gates.skipped:
            skipped.append(f"group {gp.group}: {gates.skipped[gp.group]}")
    if not targets:
        return Compensation({}, 0, tuple(skipped))
    stats = _collect(graph, targets, data, batch_size)
    values: dict[str, np.ndarray] = {}
    for t, st, (keep, drop) in zip(targets, stats, plans):
        b, c = _coefficients(st, keep, drop)
        _fold(values, graph, t, keep, drop, b, c)
    dtypes = {name: graph.const(name).dtype for name in values}  # type: ignore[union-attr]
    return Compensation({k: v.astype(dtypes[k]) for k, v in values.items()}, len(targets), tuple(skipped))
