"""Sequential least-squares reconstruction: each consumer refitted on the pruned network's own inputs (issue 16).

:func:`~graphprune.recovery.compensation.compensate` fits every dropped
channel from the kept ones of the *original* network, edge by edge. Here the
consumers are refitted in graph order (ThiNet; Kwon et al. 2022's layer-wise
least squares), each on what the *pruned* network, with every earlier
refit applied, actually feeds it:

    x_orig ~= A^T x_cur[K] + c,    W' [:, K] = W A^T,    bias' = bias + W c

``x_orig`` is the consumer's whole input in the original model, ``x_cur[K]``
its kept elements in the pruned one (the plan's gates applied). Because the
least-squares residual is uncorrelated with ``x_cur[K]``, ``A`` also
minimises the consumer's output error ``||W x_orig - W' x_cur[K] - b||`` for
any ``W`` (exactly for 1x1 convs and Gemm, per position for k x k convs).
The consumers are every Conv / Gemm / MatMul with a constant weight that
reads a dropped channel or a value the pruning changed, so:

- a residual stream's readers are all refitted on the stream the pruned
  network really carries (the identity path has no weights; its error
  reaches the next reader, which absorbs it);
- a depthwise conv (one input per group) gets a per-channel scale and shift,
  and the dense 1x1 after it reconstructs the block's output from the kept
  channels (the dropped channels' path through the depthwise block is gone);
- a grouped conv is refitted per group, from that group's kept inputs;
- the constant term replaces bias correction: a bias-free conv followed by
  BatchNormalization takes it into the running mean;
- a BatchNormalization whose input is a refitted consumer's output keeps
  its statistics: the refit already matches the original's output, constant
  term included, and rescaling the least-squares fit to the original's
  variance would amplify its error. One fed otherwise (a changed value no
  refit reached) has its running statistics corrected as the sweep reaches
  it, so that its normalised input keeps the original's per-channel mean and
  variance on the calibration data. Re-estimating every BN after the refits
  instead shifts what the refits downstream were fitted to (ResNet-20 at 3x
  fewer MACs: 0.817 that way against 0.884, benchmarks/README.md), so the
  repair pass does not run after this one.

Both models run node by node over all calibration batches at once (one
forward pass each): a consumer is fitted on all samples just before its node
runs. The live activations of every sample are held (a bound on them decides
how many samples are used) and one consumer's Gram is resident at a time, its
form planned within the memory bound by
:func:`~graphprune.recovery.gram_budget.plan_memory`.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from graphprune.analysis.gates import GateEdge, gate_taps, keep_gates, plan_gates
from graphprune.coupling.groups import Coupling
from graphprune.coupling.stream import NORM_OPS
from graphprune.errors import BadInputError
from graphprune.execution.interpreter import GraphInterpreter
from graphprune.frontends.data import Calibration
from graphprune.ir.graph import Axis, ChannelGraph, OpNode
from graphprune.ir.plan import Plan, kept_elements
from graphprune.recovery.compensation import (
    Compensation,
    _channel_coefficients,
    _coefficients,
    _Stats,
    _Target,
    _target,
    _whole,
)
from graphprune.recovery.gram_budget import Consumer, MemoryPlan, default_memory_bytes, format_bytes, plan_memory
from graphprune.recovery.stored import float_const, stored_values, weight_shape

__all__ = ["OriginalActivations", "original_activation_bytes", "original_activations", "reconstruct",
           "reconstruction_memory", "refit_samples"]

log = logging.getLogger(__name__)

_LINEAR = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class _Refit:
    """One refitted consumer: where to fold (with its input's (C, m) element layout), the kept channels, its group."""

    target: _Target
    keep: np.ndarray
    """Kept channels (rows of ``target.edge.index``)."""
    group: int


@dataclasses.dataclass(frozen=True)
class _Fit:
    """Regressors (kept elements), targets (original elements) on the consumer's input axis, and the conv group."""

    regressors: np.ndarray
    targets: np.ndarray
    group: int


def _channel_axis(node_type: str, rank: int) -> int:
    return rank - 1 if node_type == "MatMul" else 1


def _layout(exits: list[GateEdge], size: int) -> np.ndarray:
    """(C, m) element indices of the input axis: the one exit edge's layout when it covers the axis, else one per channel."""
    if len(exits) == 1 and exits[0].index.size == size:
        return exits[0].index
    return np.arange(size).reshape(-1, 1)


def _refits(graph: ChannelGraph, coupling: Coupling, plan: Plan) -> tuple[list[_Refit], list[str]]:
    """The consumers to refit, in graph order, and the exit edges that cannot be (with reasons)."""
    gates = plan_gates(coupling, graph)
    exits: dict[str, list[tuple[int, GateEdge]]] = {}
    skipped = [f"group {gp.group}: {gates.skipped[gp.group]}" for gp in plan.groups if gp.group in gates.skipped]
    for gp in plan.groups:
        for edge in gates.edges.get(gp.group, ()):
            exits.setdefault(edge.node, []).append((gp.group, edge))
    kept = kept_elements(plan, coupling, graph)
    changed: set[str] = set()
    out: list[_Refit] = []
    producers = graph.producers()
    for node in graph.nodes:
        data = node.inputs[0] if node.inputs else ""
        mine = exits.get(node.name, [])
        touched = bool(mine) or data in changed
        refit = None
        # downstream of a norm the input is rank-deficient (LayerNorm's is mean-free): such a refit is ill-posed
        if touched and node.op_type in _LINEAR and data and (mine or not _reads_a_norm(producers.get(data))):
            axis = _channel_axis(node.op_type, graph.tensors[data].rank or 0)
            size = graph.tensors[data].size(axis)
            if isinstance(size, int):
                on_axis = [e for g, e in mine if e.input_index == 0 and e.axis == axis]
                skipped += [f"{node.name}: input {e.input_index} axis {e.axis} is not compensated"
                            for _, e in mine if e.input_index != 0 or e.axis != axis]
                layout = _layout(on_axis, size)
                t = _target(node, GateEdge(node.name, 0, axis, layout), graph)
                if isinstance(t, str):
                    skipped += [t] if mine else []
                else:
                    keep_el = kept.get(Axis(data, axis), np.arange(size))
                    keep_ch = np.flatnonzero(np.isin(layout[:, 0], keep_el))
                    refit = _Refit(t, keep_ch, mine[0][0] if mine else -1)
        elif mine:
            skipped += [t for _, e in mine if isinstance(t := _target(node, e, graph), str)]
        if refit is not None:
            out.append(refit)
        if touched:
            changed.update(o for o in node.outputs if o)
    return out, sorted(set(skipped), key=skipped.index)


def _reads_a_norm(producer: OpNode | None) -> bool:
    """Whether a consumer's input comes from a norm over its channels (LayerNorm, RMSNorm, their fused forms).

    Such an input spans fewer directions than its width (a LayerNorm's output is mean-free per token) and the
    downstream refit of its consumer, unconstrained along the missing direction, diverged on a GPT-2-style LM
    after onnxruntime's optimizer (perplexity 37 -> 1e41); its consumers are left as they are."""
    return producer is not None and (producer.domain, producer.op_type) in NORM_OPS


def _fits(r: _Refit, weight_shape: tuple[int, ...]) -> list[_Fit]:
    """Dense form: per conv group, kept elements (positions in the joint vector) and original ones."""
    index, t = r.target.edge.index, r.target
    c, m = index.shape
    k = r.keep.size * m
    regressors = np.arange(k)  # joint vector: x_cur[kept channels] (channel-major), then x_orig (all C x m)
    targets = k + np.arange(c * m)
    if t.groups == 1:
        return [_Fit(regressors, targets, 0)]
    per_group = weight_shape[1]
    reg_el, tgt_el = index[r.keep].ravel() // per_group, index.ravel() // per_group
    return [_Fit(regressors[reg_el == g], targets[tgt_el == g], int(g)) for g in np.unique(tgt_el)]


def _consumer(r: _Refit, graph: ChannelGraph) -> Consumer:
    c, m = r.target.edge.index.shape
    fits = _fits(r, weight_shape(graph, r.target.weight))
    big = max(fits, key=lambda f: f.regressors.size * (f.regressors.size + f.targets.size))
    return Consumer(r.target.edge.node, r.group, r.keep.size + c, m, r.keep.size, c, big.regressors.size, big.targets.size,
                    leading=True)


def refit_samples(graph: ChannelGraph, bound: int, samples: int) -> int:
    """How many of ``samples`` the sweep holds within half of ``bound`` (the same for every plan of ``graph``)."""
    return min(samples, bound // 2 // max(_held_bytes_per_sample(graph), 1))


def reconstruction_memory(graph: ChannelGraph, coupling: Coupling, plan: Plan, bound: int | None = None,
                          samples: int = 1024) -> MemoryPlan:
    """The Gram form of every consumer :func:`reconstruct` refits (one at a time) within ``bound`` bytes.

    The sweep holds every calibration sample's live activations of both models:
    at most half the bound, so fewer than ``samples`` are used when they do not fit.

    Raises:
        BadInputError: When the bound cannot hold even the cheapest consumer alone, or 2 samples' activations.
    """
    bound = default_memory_bytes() if bound is None else bound
    refits, _ = _refits(graph, coupling, plan)
    per_sample = max(_held_bytes_per_sample(graph), 1)
    fit = refit_samples(graph, bound, samples)
    if fit < 2:
        raise BadInputError(f"compensation cannot fit in {format_bytes(bound)}: 2 samples' activations need "
                            f"{format_bytes(4 * per_sample)}; raise the compensate pass's memory_bytes (--compensate-memory)")
    held = fit * per_sample
    shapes = [_consumer(r, graph) for r in refits]
    planned = plan_memory(shapes, bound - held, list(range(len(refits))))
    return dataclasses.replace(planned, bound=bound, held_bytes=held, samples=fit)


@dataclasses.dataclass(frozen=True)
class OriginalActivations:
    """What every sequential refit on the same samples reads from the original model, computed once: the data input
    of every Conv / Gemm / MatMul and BatchNormalization, per calibration batch (the limit pass's points share it)."""

    sizes: tuple[int, ...]
    """Samples in each batch."""
    tensors: Mapping[str, tuple[torch.Tensor, ...]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.tensors.values() for t in ts)


def _read_names(graph: ChannelGraph) -> list[str]:
    return sorted({n.inputs[0] for n in graph.nodes if n.op_type in (*_LINEAR, "BatchNormalization") and n.inputs
                   and n.inputs[0] and graph.const(n.inputs[0]) is None})


def original_activation_bytes(graph: ChannelGraph, samples: int) -> int:
    """Bytes :func:`original_activations` holds for ``samples`` samples (4 bytes an element; dynamic dims count 1)."""
    return 4 * samples * sum(_sample_numel(graph, n) for n in _read_names(graph))


def original_activations(graph: ChannelGraph, data: Calibration, batch_size: int) -> OriginalActivations:
    """Run the original once over ``data`` and keep what the refits read (see :class:`OriginalActivations`)."""
    names = _read_names(graph)
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def tap(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(t: torch.Tensor) -> torch.Tensor:
            kept[name].append(t.detach())
            return t
        return fn

    interp = GraphInterpreter(graph).eval()
    sizes = []
    with torch.no_grad():
        for _, arrays, _ in data.batches(batch_size):
            sizes.append(int(arrays[0].shape[0]))
            interp(*(torch.from_numpy(a) for a in arrays), taps={n: tap(n) for n in names})
    return OriginalActivations(tuple(sizes), {n: tuple(v) for n, v in kept.items()})


class _Sweep:
    """The original and the current model run node by node over all calibration batches at once.

    Both keep every live tensor of every batch (what
    :func:`_held_bytes_per_sample` counts), so a consumer is fitted on all
    samples before its node runs, and the whole reconstruction costs one
    forward pass of each model.
    """

    def __init__(self, graph: ChannelGraph, data: Calibration, batch_size: int, gates: Callable[[int], dict],
                 original: OriginalActivations | None = None) -> None:
        self.graph = graph
        self.orig, self.cur = GraphInterpreter(graph).eval(), GraphInterpreter(graph).eval()
        batches = [tuple(torch.from_numpy(a) for a in arrays) for _, arrays, _ in data.batches(batch_size)]
        self.gates = [gates(b[0].shape[0]) for b in batches]
        self.envs = [[dict(zip(graph.inputs, b)) for b in batches] for _ in range(2)]
        self.replayed = original is not None and original.sizes == tuple(b[0].shape[0] for b in batches)
        if self.replayed:
            assert original is not None
            self.envs[0] = [{n: ts[i] for n, ts in original.tensors.items()} for i in range(len(batches))]
        self.last = _last_use(graph)

    def inputs(self, node: OpNode) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(original, current) data input of ``node``, per batch."""
        name = node.inputs[0]
        return list(zip((env[name] for env in self.envs[0]), (env[name] for env in self.envs[1])))

    def update(self, constants: Mapping[str, np.ndarray], reads: Sequence[str | None]) -> None:
        """Write refitted constants into the current model; ``reads`` computed from them already (a QDQ weight's
        DequantizeLinear ran earlier in graph order) are computed again on every batch."""
        with torch.no_grad():
            for name, value in constants.items():
                self.cur.constant(name).copy_(torch.from_numpy(value))
            producers = self.graph.producers()
            for node in (producers[name] for name in reads if name in producers):
                for env in self.envs[1]:
                    args = [env[n] if n in env else (self.cur.constant(n) if n else None) for n in node.inputs]
                    env.update((o, v) for o, v in zip(node.outputs, self.cur.run_node(node, args)) if o)

    def step(self, k: int, node: OpNode) -> None:
        """Run node ``k`` on every batch of both models (the plan's gates on the current one) and free dead tensors."""
        with torch.no_grad():
            for which, interp in enumerate((self.orig, self.cur)):
                if which == 0 and self.replayed:  # the original's reads come from OriginalActivations
                    continue
                for b, env in enumerate(self.envs[which]):
                    args = [env[n] if n in env else (interp.constant(n) if n else None) for n in node.inputs]
                    if which:
                        for i, fn in ((i, self.gates[b].get((node.name, i))) for i in range(len(args))):
                            if fn is not None:
                                args[i] = fn(args[i])
                    for name, value in zip(node.outputs, interp.run_node(node, args)):
                        if name:
                            env[name] = value
                    for name in node.inputs:
                        if name in env and self.last.get(name) == k:
                            del env[name]


def _last_use(graph: ChannelGraph) -> dict[str, int]:
    last = {name: k for k, node in enumerate(graph.nodes) for name in node.inputs if name}
    return {**last, **{name: len(graph.nodes) for name in graph.outputs}}


def _sample_numel(graph: ChannelGraph, name: str) -> int:
    """Elements of one sample of tensor ``name`` (the batch axis dropped; dynamic dims count 1)."""
    shape = graph.tensors[name].shape or ()
    return int(np.prod([d if isinstance(d, int) else 1 for d in shape[1:]]))


def _held_bytes_per_sample(graph: ChannelGraph) -> int:
    """Most bytes one sample's live activations take during the sweep, both models (4 bytes an element)."""
    last, peak = _last_use(graph), 0
    live = {name: _sample_numel(graph, name) for name in graph.inputs}
    for k, node in enumerate(graph.nodes):
        live.update({o: _sample_numel(graph, o) for o in node.outputs if o and o in graph.tensors})
        peak = max(peak, sum(live.values()))
        for name in node.inputs:
            if last.get(name) == k:
                live.pop(name, None)
    return 2 * 4 * peak


def _weights(values: dict[str, np.ndarray], graph: ChannelGraph, t: _Target) -> tuple[np.ndarray, np.ndarray | None]:
    if t.weight not in values:
        values[t.weight] = np.array(float_const(graph, t.weight), dtype=np.float64)
    if t.bias is not None and t.bias not in values:
        values[t.bias] = np.array(float_const(graph, t.bias), dtype=np.float64)
    return values[t.weight], values.get(t.bias) if t.bias is not None else None


def _fold(w: np.ndarray, bias: np.ndarray | None, t: _Target, regressors: np.ndarray, targets: np.ndarray,
          a: np.ndarray, c: np.ndarray, group: int) -> None:
    """``W[:, regressors] = W[:, targets] A^T`` and ``bias += sign * W[:, targets] c`` (element indices of the input axis)."""
    if t.groups == 1:
        view, rows = np.moveaxis(w, t.in_axis, 0), slice(None)  # (C_in, ...): row e is input element e
        reg, tgt = regressors, targets
    else:
        per_group, out_per_group = w.shape[1], w.shape[0] // t.groups
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        view = np.moveaxis(w[rows], 1, 0)  # (C_in/g, C_out/g, k...): this group's filters
        reg, tgt = regressors % per_group, targets % per_group
    wt = view[tgt].copy()
    if reg.size:
        view[reg] = np.tensordot(a, wt, axes=(1, 0))
    if bias is not None and wt.ndim >= 2:
        bias[rows] += t.bias_sign * (c @ wt.reshape(len(tgt), wt.shape[1], -1).sum(-1))


def _solve(r: _Refit, st: _Stats, form: str, values: dict[str, np.ndarray], graph: ChannelGraph) -> None:
    """Fit and fold one consumer (dense: per conv group; per-position / shared: per position)."""
    w, bias = _weights(values, graph, r.target)
    index = r.target.edge.index
    if form == "dense":
        el = np.concatenate([index[r.keep].ravel(), index.ravel()])  # joint position -> input element
        for f in _fits(r, w.shape):
            if f.regressors.size or bias is not None:
                a, c = _coefficients(st, f.regressors, f.targets)
                _fold(w, bias, r.target, el[f.regressors], el[f.targets], a, c, f.group)
        return
    k, ch = r.keep.size, index.shape[0]
    for p, (a, c) in enumerate(_channel_coefficients(st, np.arange(k), k + np.arange(ch))):
        _fold(w, bias, r.target, index[r.keep, p], index[:, p], a, c, 0)


def _reestimable(node: OpNode, graph: ChannelGraph) -> bool:
    """A BatchNormalization whose running mean and variance are float constants."""
    return (node.op_type == "BatchNormalization" and len(node.inputs) > 4
            and all(graph.const(n) is not None for n in node.inputs[3:5]))


def _moments(xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (axis 1) mean and variance over every batch, in float64."""
    dims = [d for d in range(xs[0].dim()) if d != 1]
    n = sum(x.numel() // x.shape[1] for x in xs)
    mean = torch.stack([x.double().sum(dims) for x in xs]).sum(0) / n
    square = torch.stack([(x.double() ** 2).sum(dims) for x in xs]).sum(0) / n
    return mean, torch.clamp(square - mean**2, min=0.0)


def _batch_statistics(node: OpNode, sweep: _Sweep, graph: ChannelGraph) -> dict[str, np.ndarray]:
    """A BN node's running mean and variance such that its normalised input has, on the calibration data, the
    per-channel mean and variance the original's has: with ``s^2 = var + eps``, ``s'^2 = s^2 Var_cur / Var_orig`` and
    ``mean' = E_cur - (s' / s) (E_orig - mean)``. An unchanged input keeps the statistics exactly; the calibration
    data need not match the training data's statistics."""
    orig, cur = (_moments([env[node.inputs[0]] for env in envs]) for envs in sweep.envs)
    mean = np.asarray(float_const(graph, node.inputs[3]), np.float64)
    var = np.asarray(float_const(graph, node.inputs[4]), np.float64)
    eps = float(node.attrs.get("epsilon", 1e-5))
    tiny = 1e-12 * max(float(orig[1].mean()), 1e-30)
    ratio = ((cur[1] + tiny) / (orig[1] + tiny)).numpy()
    scale = np.sqrt(ratio)
    return {node.inputs[3]: cur[0].numpy() - scale * (orig[0].numpy() - mean),
            node.inputs[4]: np.maximum((var + eps) * ratio - eps, 0.0)}


def reconstruct(graph: ChannelGraph, coupling: Coupling, plan: Plan, data: Calibration, batch_size: int = 64,
                memory: MemoryPlan | None = None, batch_norm: bool = True,
                original: OriginalActivations | None = None) -> Compensation:
    """Weights and biases that refit every consumer ``plan`` changes, in graph order (original names, full shapes).

    Apply the values to the unpruned model, then rewrite with the same plan.

    Args:
        graph: The unpruned graph.
        coupling: Its coupling groups.
        plan: What is kept.
        data: Calibration samples (the first ``memory.samples`` of them when the bound holds fewer).
        batch_size: Samples per interpreter call.
        memory: The memory plan (:func:`reconstruction_memory`); default: planned within a quarter of the memory.
        batch_norm: Correct the running statistics of every BatchNormalization no refitted consumer feeds by how
            pruning moved its input (see the module's docstring), as the sweep reaches it.
        original: The original's reads on the same samples and batches (:func:`original_activations`), so that only
            the pruned model runs; ignored when its batches differ.

    Returns:
        New values (BN statistics included), the number of consumers refitted, what was skipped (with reasons), the
        memory plan and how many BN nodes had their statistics corrected.

    Raises:
        BadInputError: When the default memory bound cannot hold even the cheapest consumer.
    """
    refits, skipped = _refits(graph, coupling, plan)
    if memory is None:
        memory = reconstruction_memory(graph, coupling, plan, samples=len(data))
    if [(c.node, c.group) for c in memory.consumers] != [(r.target.edge.node, r.group) for r in refits]:
        raise ValueError("the memory plan was made for another plan or graph")
    skipped += memory.skipped
    chosen = {r.target.edge.node: (r, m.form) for r, m in zip(refits, memory.consumers) if m.form != "skipped"}
    values: dict[str, np.ndarray] = {}
    if not chosen:
        return Compensation({}, 0, tuple(skipped), memory, 0)
    gplan = plan_gates(coupling, graph)
    keep = {gp.group: np.asarray(gp.keep, dtype=np.int64) for gp in plan.groups if gp.group in gplan.edges}
    channels = {gp.group: gp.channels for gp in plan.groups}
    sub = dataclasses.replace(gplan, edges={g: gplan.edges[g] for g in keep})
    if memory.samples and memory.samples < len(data):
        data = Calibration(tuple(a[:memory.samples] for a in data.inputs), None, data.source)
    sweep = _Sweep(graph, data, batch_size, lambda n: gate_taps(sub, keep_gates(keep, channels, n)), original)
    gram = norms = 0
    fitted: set[str] = set()  # outputs of refitted consumers: least-squares matches of the original's
    for k, node in enumerate(graph.nodes):
        if node.name in chosen:
            r, form = chosen[node.name]
            edge = r.target.edge
            st = _Stats(r.keep.size + edge.index.shape[0], edge.index.shape[1], form, rows=r.keep.size)
            kept_idx, all_idx = torch.as_tensor(edge.index[r.keep].ravel()), torch.as_tensor(edge.index.ravel())
            whole = _whole(edge.index.ravel(), graph.tensors[node.inputs[0]].size(edge.axis) or -1)
            for want, got in sweep.inputs(node):
                target = want if whole else want.index_select(edge.axis, all_idx)
                joint = torch.cat([got.index_select(edge.axis, kept_idx), target], edge.axis)
                st.add(joint, edge.axis, np.arange(joint.shape[edge.axis]), memory.stream_bytes)
            gram = max(gram, st.nbytes)
            _solve(r, st, form, values, graph)
            sweep.update(stored_values(graph, {n: values[n] for n in (r.target.weight, r.target.bias) if n is not None},
                                       [(r.target.weight, r.target.bias)]), (r.target.weight, r.target.bias))
        if (batch_norm and _reestimable(node, graph) and node.inputs[0] not in fitted
                and not all(torch.equal(a, b) for a, b in sweep.inputs(node))):
            stats = _batch_statistics(node, sweep, graph)
            values.update(stats)
            sweep.update(stored_values(graph, stats), ())
            norms += 1
        sweep.step(k, node)
        if node.name in chosen:
            fitted.update(node.outputs)
    pairs = [(r.target.weight, r.target.bias) for r, _ in chosen.values()]
    return Compensation(stored_values(graph, values, pairs), len(chosen), tuple(skipped), memory, gram, norms)
