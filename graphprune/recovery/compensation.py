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
matrices within a memory bound planned before any accumulation
(:mod:`graphprune.recovery.gram_budget`): an edge of C channels x m
positions (Flatten -> Gemm) takes one (C m)^2 Gram when it fits, else m
C x C Grams (per position), else one pooled C x C Gram, else it is skipped
with the reason. Consumers
whose weight is not a constant (attention products, SE scales) or that are
not Conv, Gemm or MatMul are skipped and reported; a MatMul's constant term
goes into the bias of the Add that follows it, a bias-free conv's into the
running mean of the BatchNormalization after it (exact), or is dropped when
there is neither. :mod:`graphprune.recovery.reconstruct` refits the consumers
on the pruned network's own inputs instead (the compensate pass's default).
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
from graphprune.recovery.gram_budget import Consumer, MemoryPlan, default_memory_bytes, plan_memory
from graphprune.recovery.stored import float_const, is_stored, stored_values, weight_shape

__all__ = ["Compensation", "compensate", "compensation_memory"]

log = logging.getLogger(__name__)

RIDGE = 1e-6
"""Ridge added to the kept channels' covariance, relative to its mean diagonal."""
CHUNK_ROWS = 8192
"""Most rows one float32 product of the streamed sums covers before it is added to the float64 totals
(bounds the float32 rounding, about 1e-7 * sqrt(rows) relative, well under the ridge's effect)."""


@dataclasses.dataclass(frozen=True)
class Compensation:
    """New constant values (by graph name) and what could not be compensated."""

    values: Mapping[str, np.ndarray]
    edges: int
    skipped: tuple[str, ...]
    memory: MemoryPlan | None = None
    """The Gram form of every consumer and the bound they were planned in."""
    gram_bytes: int = 0
    """Bytes of the Gram matrices and means actually allocated (at most ``memory.gram_bytes``)."""
    batch_norms: int = 0
    """BatchNormalization nodes whose running statistics the sequential refit corrected (no refit fed them)."""


@dataclasses.dataclass(frozen=True)
class _Target:
    """Where to fold: the consumer's weight (input axis), bias, and conv group count."""

    edge: GateEdge
    weight: str
    in_axis: int
    bias: str | None
    groups: int = 1
    bias_sign: float = 1.0
    """+1: ``bias`` is the consumer's bias; -1: it is the running mean of the BatchNormalization after it."""


def _target(node: OpNode, edge: GateEdge, graph: ChannelGraph) -> _Target | str:
    if edge.input_index != 0 or len(node.inputs) < 2 or not is_stored(graph, node.inputs[1]):
        return f"{node.name}: the channels do not enter a constant weight"
    bias = node.inputs[2] if len(node.inputs) > 2 and is_stored(graph, node.inputs[2]) else None
    if node.op_type == "Conv":
        if edge.axis != 1:
            return f"{node.name}: not the channel axis"
        groups = int(node.attrs.get("group", 1))
        if bias is None and (mean := _mean_after(node, graph)) is not None:
            return _Target(edge, node.inputs[1], 1, mean, groups, -1.0)
        return _Target(edge, node.inputs[1], 1, bias, groups)
    if node.op_type == "Gemm" and not int(node.attrs.get("transA", 0)) and edge.axis == 1:
        return _Target(edge, node.inputs[1], 1 if int(node.attrs.get("transB", 0)) else 0, bias)
    if node.op_type == "MatMul":
        rank = graph.tensors[node.inputs[0]].rank or 0
        w = graph.shape(node.inputs[1]) or ()
        if len(w) == 2 and isinstance(w[1], int) and edge.axis == rank - 1:
            return _Target(edge, node.inputs[1], 0, _bias_after(node, graph, w[1]))
    return f"{node.name}: {node.op_type} consumer is not compensated"


def _mean_after(node: OpNode, graph: ChannelGraph) -> str | None:
    """The running mean of the BatchNormalization that alone consumes a bias-free conv's output, if any.

    ``BN(y + c)`` with mean ``mu - c`` is ``BN(y)`` with mean ``mu``: the constant term folds there exactly.
    """
    users = graph.consumers().get(node.outputs[0], [])
    if len(users) != 1 or users[0].op_type != "BatchNormalization" or users[0].inputs[0] != node.outputs[0]:
        return None
    mean = users[0].inputs[3] if len(users[0].inputs) > 3 else ""
    return mean if mean and graph.const(mean) is not None else None


def _bias_after(node: OpNode, graph: ChannelGraph, width: int) -> str | None:
    """The constant bias of the Add that alone consumes a MatMul's output (a Linear layer), if any."""
    users = graph.consumers().get(node.outputs[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    for name in users[0].inputs:
        if name != node.outputs[0] and is_stored(graph, name) and graph.shape(name) == (width,):
            return name
    return None


def _whole(idx: np.ndarray, size: int) -> bool:
    """``idx`` picks every element of an axis of ``size``, in order (no copy needed)."""
    return idx.size == size and bool(np.array_equal(idx, np.arange(size)))


class _Stats:
    """Streamed sums of x and x x^T over samples and positions for one edge's ``C x m`` elements, in one Gram form.

    ``dense``: one (C m)^2 Gram; ``per-position``: m Grams of C x C; ``shared``:
    one C x C Gram of the positions pooled (see :mod:`graphprune.recovery.gram_budget`). With ``rows``, only the
    rows of the first ``rows`` channels (their elements in the dense form): the fit reads C_KK and C_KD, so when the
    kept channels lead the vector (the sequential refit's joint vector) no other row is needed.
    """

    def __init__(self, channels: int, positions: int, form: str, rows: int | None = None) -> None:
        self.c, self.m, self.form = channels, positions, form
        self.r = channels if rows is None else rows
        shape = {"dense": (self.r * positions, channels * positions), "per-position": (positions, self.r, channels)}
        self.s1 = torch.zeros(channels * positions, dtype=torch.float64)
        self.s2 = torch.zeros(shape.get(form, (self.r, channels)), dtype=torch.float64)
        self.n = 0.0

    @property
    def nbytes(self) -> int:
        return (self.s1.numel() + self.s2.numel()) * 8

    def add(self, x: torch.Tensor, axis: int, idx: np.ndarray, chunk_bytes: int) -> None:
        """Accumulate ``x``'s elements ``idx`` on ``axis``, a chunk of about ``chunk_bytes`` at a time."""
        x, width = x.detach(), idx.size
        index = None if _whole(idx, x.shape[axis]) else torch.as_tensor(idx, device=x.device)
        per_sample = max(1, x[:1].numel() // max(x.shape[axis], 1) * width * 12)
        parts = x.split(max(1, chunk_bytes // per_sample), 0) if axis != 0 and x.dim() > 1 else (x,)
        for part in parts:
            picked = part if index is None else part.index_select(axis, index)
            if (axis == 1 and picked.dim() > 2 and self.m == 1 and self.form != "per-position"
                    and picked[:1].numel() <= CHUNK_ROWS * width):  # a sample's positions: one float32 product
                self._accumulate_channels(picked.reshape(picked.shape[0], width, -1))
                continue
            flat = picked.movedim(axis, -1).reshape(-1, width)
            step = max(1, min(CHUNK_ROWS, chunk_bytes // (width * 12)))
            for rows in flat.split(step, 0):
                self._accumulate(rows.float().cpu())

    def _accumulate_channels(self, x: torch.Tensor) -> None:
        """Add the sums of (samples, channels, positions) ``x``, channels on axis 1 (a conv's input), without moving
        the channels last: one product per sample (positions as rows), accumulated in float64."""
        x = x.float().cpu()
        self.s1 += x.sum((0, 2)).double()
        self.n += x.shape[0] * x.shape[2]
        self.s2 += torch.matmul(x[:, :self.r], x.transpose(1, 2)).double().sum(0)

    def _accumulate(self, flat: torch.Tensor) -> None:
        """Add one chunk's sums: products in float32 (at most ``CHUNK_ROWS`` rows), accumulated in float64."""
        self.s1 += flat.sum(0).double()
        self.n += flat.shape[0]
        if self.form == "dense":
            self.s2 += (flat[:, :self.r * self.m].T @ flat).double()
            return
        v = flat.view(-1, self.c, self.m)
        if self.form == "per-position":
            v = v.permute(2, 0, 1)  # (m, rows, C)
            self.s2 += torch.bmm(v[:, :, :self.r].transpose(1, 2), v).double()
        else:
            v = v.transpose(1, 2).reshape(-1, self.c)  # (rows m, C)
            self.s2 += (v[:, :self.r].T @ v).double()


def _collect(graph: ChannelGraph, targets: list[_Target], stats: list[_Stats], data: Calibration,
             batch_size: int, chunk_bytes: int) -> None:
    interp = GraphInterpreter(graph).eval()
    per_edge: dict[tuple[str, int], list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    for t, st in zip(targets, stats):
        def tap(x: torch.Tensor, t: _Target = t, st: _Stats = st) -> torch.Tensor:
            st.add(x, t.edge.axis, t.edge.index.ravel(), chunk_bytes)
            return x
        per_edge.setdefault((t.edge.node, t.edge.input_index), []).append(tap)
    taps = {key: compose(fns) for key, fns in per_edge.items()}
    with torch.no_grad():
        for _, inputs, _ in data.batches(batch_size):
            interp(*(torch.from_numpy(a) for a in inputs), edge_taps=taps)


def _fit(ckk: np.ndarray, ckd: np.ndarray) -> np.ndarray:
    """B = (C_KK + ridge)^-1 C_KD."""
    k = len(ckk)
    ckk[np.diag_indices(k)] += RIDGE * max(float(np.trace(ckk)) / max(k, 1), 1e-12)
    return np.linalg.solve(ckk, ckd)


def _coefficients(st: _Stats, keep: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense form: B (|K| x |D|) and c (|D|) minimising ||x_D - B^T x_K - c||^2 (positions into the edge's elements)."""
    n = max(st.n, 1.0)
    mean = st.s1.numpy() / n
    if not keep.size:
        return np.zeros((0, drop.size)), mean[drop]
    s2 = st.s2.numpy()
    ckk = s2[np.ix_(keep, keep)] / n - np.outer(mean[keep], mean[keep])
    ckd = s2[np.ix_(keep, drop)] / n - np.outer(mean[keep], mean[drop])
    b = _fit(ckk, ckd)
    return b, mean[drop] - b.T @ mean[keep]


def _channel_coefficients(st: _Stats, keep: np.ndarray, drop: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-position and shared forms: (B, c) for each position, ``keep`` and ``drop`` being channels."""
    n = max(st.n, 1.0)
    means = st.s1.numpy().reshape(st.c, st.m) / n  # (C, m): per-position channel means
    if not keep.size:
        return [(np.zeros((0, drop.size)), means[drop, p]) for p in range(st.m)]
    s2 = st.s2.numpy()
    if st.form == "per-position":
        out = []
        for p in range(st.m):
            mu = means[:, p]
            b = _fit(s2[p][np.ix_(keep, keep)] / n - np.outer(mu[keep], mu[keep]),
                     s2[p][np.ix_(keep, drop)] / n - np.outer(mu[keep], mu[drop]))
            out.append((b, mu[drop] - b.T @ mu[keep]))
        return out
    mk, md = means[keep], means[drop]  # pooled within-position covariance: (S2 - n sum_p mu_p mu_p^T) / (n m)
    b = _fit((s2[np.ix_(keep, keep)] / n - mk @ mk.T) / st.m, (s2[np.ix_(keep, drop)] / n - mk @ md.T) / st.m)
    return [(b, md[:, p] - b.T @ mk[:, p]) for p in range(st.m)]


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
        w = np.array(float_const(graph, t.weight), dtype=np.float64)
    bias = None
    if t.bias is not None:
        bias = values.get(t.bias)
        if bias is None:
            bias = np.array(float_const(graph, t.bias), dtype=np.float64)
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
        bias[out_rows] += t.bias_sign * (c @ sums)
        if t.bias is not None:
            values[t.bias] = bias
    values[t.weight] = w


_Split = tuple[list[_Block], np.ndarray, np.ndarray]
"""An edge's dense blocks (element positions), and the group's kept and dropped channels."""


def _targets(graph: ChannelGraph, coupling: Coupling, plan: Plan) -> tuple[list[_Target], list[Consumer], list[_Split], list[str]]:
    """The compensated edges, their shapes for the memory plan, how they split, and the edges skipped (with reasons)."""
    gates = plan_gates(coupling, graph)
    nodes = {n.name: n for n in graph.nodes}
    targets: list[_Target] = []
    shapes: list[Consumer] = []
    plans: list[_Split] = []
    skipped: list[str] = []
    for gp in plan.groups:
        keep = np.asarray(gp.keep, dtype=np.int64)
        drop = np.setdiff1d(np.arange(gp.channels), keep)
        for edge in gates.edges.get(gp.group, ()):
            t = _target(nodes[edge.node], edge, graph)
            if isinstance(t, str):
                skipped.append(t)
                continue
            blocks = _blocks(t, weight_shape(graph, t.weight), keep, drop)
            big = max(blocks, key=lambda b: b.keep.size * (b.keep.size + b.drop.size), default=_Block(keep, keep[:0], 0))
            c, m = edge.index.shape
            targets.append(t)
            plans.append((blocks, keep, drop))
            shapes.append(Consumer(edge.node, gp.group, c, m, keep.size, drop.size, big.keep.size, big.drop.size))
        if gp.group in gates.skipped:
            skipped.append(f"group {gp.group}: {gates.skipped[gp.group]}")
    return targets, shapes, plans, skipped


def compensation_memory(graph: ChannelGraph, coupling: Coupling, plan: Plan, bound: int | None = None) -> MemoryPlan:
    """The Gram form of every consumer :func:`compensate` will fit, within ``bound`` bytes (default: a quarter of memory).

    Raises:
        BadInputError: When the bound cannot hold even the cheapest consumer alone.
    """
    shapes = _targets(graph, coupling, plan)[1]
    return plan_memory(shapes, default_memory_bytes() if bound is None else bound)


def compensate(graph: ChannelGraph, coupling: Coupling, plan: Plan, data: Calibration, batch_size: int = 64,
               memory: MemoryPlan | None = None) -> Compensation:
    """Weights and biases that compensate ``plan``'s dropped channels (original graph names, full shapes).

    Apply the values to the unpruned model, then rewrite with the same plan.

    Args:
        graph: The unpruned graph.
        coupling: Its coupling groups.
        plan: What is kept.
        data: Calibration samples.
        batch_size: Samples per interpreter run.
        memory: The memory plan (:func:`compensation_memory`); default: planned within a quarter of the memory.

    Returns:
        New values, the number of edges compensated, what was skipped (with reasons) and the memory plan.

    Raises:
        BadInputError: When the default memory bound cannot hold even the cheapest consumer.
    """
    targets, shapes, plans, skipped = _targets(graph, coupling, plan)
    if memory is None:
        memory = plan_memory(shapes, default_memory_bytes())
    if [(c.node, c.group) for c in memory.consumers] != [(c.node, c.group) for c in shapes]:
        raise ValueError("the memory plan was made for another plan or graph")
    skipped += memory.skipped
    chosen = [(t, c, b, m.form) for t, c, b, m in zip(targets, shapes, plans, memory.consumers) if m.form != "skipped"]
    if not chosen:
        return Compensation({}, 0, tuple(skipped), memory, 0)
    stats = [_Stats(c.channels, c.positions, form) for _, c, _, form in chosen]
    _collect(graph, [t for t, *_ in chosen], stats, data, batch_size, memory.stream_bytes)
    values: dict[str, np.ndarray] = {}
    for (t, c, (blocks, keep, drop), form), st in zip(chosen, stats):
        if form == "dense":
            for block in blocks:
                b, const = _coefficients(st, block.keep, block.drop)
                _fold(values, graph, t, block, b, const)
            continue
        pos = np.arange(c.channels * c.positions).reshape(c.channels, c.positions)
        for p, (b, const) in enumerate(_channel_coefficients(st, keep, drop)):
            _fold(values, graph, t, _Block(pos[keep, p], pos[drop, p], 0), b, const)
    gram = sum(st.nbytes for st in stats)
    pairs = [(t.weight, t.bias) for t, *_ in chosen]
    return Compensation(stored_values(graph, values, pairs), len(chosen), tuple(skipped), memory, gram)
