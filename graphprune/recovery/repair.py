"""Statistics repair after pruning: BatchNorm re-estimation, or bias correction where BN was folded.

- With BatchNormalization nodes (torch models, ONNX exported with BN kept):
  running mean and variance are re-estimated on calibration data, each BN
  normalising with its batch statistics during the pass (BN recalibration).
- Without BN (a typical eval ONNX, BN folded into convs): for each given
  consumer (Conv / Gemm with a bias), the per-channel mean of its output on
  calibration data is brought back to the original model's.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from graphprune.execution.interpreter import GraphInterpreter
from graphprune.frontends.data import Calibration
from graphprune.ir.graph import Axis, ChannelGraph, OpNode
from graphprune.recovery.stored import float_const, is_stored, stored_values

__all__ = ["correct_biases", "has_batch_norm", "output_means", "reestimate_batch_norm"]

log = logging.getLogger(__name__)


def has_batch_norm(graph: ChannelGraph) -> bool:
    return any(n.op_type == "BatchNormalization" for n in graph.nodes)


class _Recalibrate(GraphInterpreter):
    """Interpreter whose BN nodes use batch statistics and record them."""

    def __init__(self, graph: ChannelGraph) -> None:
        super().__init__(graph)
        self.sums: dict[str, list[Any]] = {}

    def run_node(self, node: OpNode, args: Sequence[Any]) -> tuple[Any, ...]:
        if node.op_type != "BatchNormalization":
            return super().run_node(node, args)
        x, scale, bias = args[0], args[1], args[2]
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.numel() // x.shape[1]
        mean, sq = x.mean(dims).double(), (x.double() ** 2).mean(dims)
        acc = self.sums.setdefault(node.name, [0.0, torch.zeros_like(mean), torch.zeros_like(sq)])
        acc[0] += count
        acc[1] += mean * count
        acc[2] += sq * count
        y = F.batch_norm(x, None, None, scale, bias, True, 0.0, float(node.attrs.get("epsilon", 1e-5)))
        return (y, *tuple(args[3:5])[:len(node.outputs) - 1])


def reestimate_batch_norm(graph: ChannelGraph, data: Calibration, batch_size: int = 128) -> dict[str, np.ndarray]:
    """New running mean / variance of every BN (by constant name)."""
    interp = _Recalibrate(graph).eval()
    with torch.no_grad():
        for _, inputs, _ in data.batches(batch_size):
            interp(*(torch.from_numpy(a) for a in inputs))
    out: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        if node.name not in interp.sums:
            continue
        n, s1, s2 = interp.sums[node.name]
        mean = (s1 / n).numpy()
        var = np.clip((s2 / n).numpy() - mean**2, 0.0, None) * (n / max(n - 1.0, 1.0))
        dtype = graph.param(node.inputs[3]).dtype
        out[node.inputs[3]], out[node.inputs[4]] = mean.astype(dtype), var.astype(dtype)
    return out


def _means(interp: GraphInterpreter, names: Sequence[str], data: Calibration, batch_size: int) -> dict[str, np.ndarray]:
    sums: dict[str, list[Any]] = {}

    def tap(name: str):
        def fn(t: torch.Tensor) -> torch.Tensor:
            dims = [d for d in range(t.dim()) if d != 1]
            acc = sums.setdefault(name, [0, torch.zeros(t.shape[1], dtype=torch.float64)])
            acc[0] += t.numel() // t.shape[1]
            acc[1] += t.double().sum(dims)
            return t
        return fn

    with torch.no_grad():
        for _, inputs, _ in data.batches(batch_size):
            interp(*(torch.from_numpy(a) for a in inputs), taps={n: tap(n) for n in names})
    return {n: (s / c).numpy() for n, (c, s) in sums.items()}


def output_means(graph: ChannelGraph, names: Sequence[str], data: Calibration, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) mean of the named tensors over calibration data."""
    return _means(GraphInterpreter(graph).eval(), names, data, batch_size)


def correct_biases(
    original: ChannelGraph,
    pruned: ChannelGraph,
    consumers: Sequence[str],
    kept: Mapping[Axis, np.ndarray],
    data: Calibration,
    batch_size: int = 128,
) -> dict[str, np.ndarray]:
    """Bias values of ``pruned`` (by constant name) that restore the consumers' output means (a QDQ bias requantized).

    Consumers are corrected one at a time in graph order, each measured with
    the corrections before it applied, so corrections do not compound.
    """
    chosen = [n for n in pruned.nodes if n.name in set(consumers) and n.op_type in ("Conv", "Gemm")
              and len(n.inputs) > 2 and is_stored(pruned, n.inputs[2])]
    if not chosen:
        return {}
    want = output_means(original, [n.outputs[0] for n in chosen], data, batch_size)
    interp = GraphInterpreter(pruned).eval()
    out: dict[str, np.ndarray] = {}
    for node in chosen:
        y, bias = node.outputs[0], node.inputs[2]
        got = _means(interp, [y], data, batch_size)[y]
        idx = kept.get(Axis(y, 1))
        ref = want[y] if idx is None else want[y][idx]
        value = float_const(pruned, bias)
        assert value is not None
        new = stored_values(pruned, {bias: value.astype(np.float64) + (ref - got)}, [(node.inputs[1], bias)])
        with torch.no_grad():
            for name, v in new.items():
                interp.constant(name).copy_(torch.from_numpy(v))
        out.update(new)
    return out
