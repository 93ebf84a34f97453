"""Stream every group's gradient matrix F_g = G^T G / N from calibration data.

Row i of G is d loss_i / d a for the group's gates a (all ones). One forward
and one backward pass per batch give the rows of every group at once (per
sample gates, :mod:`graphprune.analysis.gates`); only the C x C sums are kept.
Under ``torchrun`` each rank reads its shard and the sums are all-reduced.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from graphprune.analysis.gates import GatePlan, gate_taps
from graphprune.errors import BadInputError
from graphprune.execution.distributed import rank_and_world
from graphprune.execution.interpreter import GraphInterpreter
from graphprune.execution.progress import Progress
from graphprune.frontends.data import Calibration

__all__ = ["LOSSES", "FisherResult", "GroupFisher", "collect_fisher", "default_device"]

log = logging.getLogger(__name__)

LOSSES = ("labels", "fisher", "projection")
"""``labels``: cross-entropy with the data's labels. ``fisher``: true Fisher,
labels sampled from the model's own softmax. ``projection``: a random
projection of the first output (any model, no classifier needed)."""

@dataclasses.dataclass(frozen=True)
class GroupFisher:
    """Averaged gradient statistics of one group.

    Attributes:
        f: F = G^T G / N over all samples.
        halves: F over even and over odd (global) sample indices.
        grad: Mean gradient (first-order term) over all samples.
    """

    f: np.ndarray
    halves: tuple[np.ndarray, np.ndarray]
    grad: np.ndarray


@dataclasses.dataclass(frozen=True)
class FisherResult:
    """F per group, with the number of samples and groups that could not be gated."""

    groups: Mapping[int, GroupFisher]
    samples: int
    skipped: Mapping[int, str]
    loss: str


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _per_sample_noise(idx: np.ndarray, shape: tuple[int, ...], seed: int, kind: str) -> np.ndarray:
    """Noise that depends only on (seed, global sample index): equal under any sharding."""
    out = np.empty((idx.size, *shape), dtype=np.float64)
    for k, i in enumerate(idx):
        rng = np.random.default_rng((seed, int(i)))
        out[k] = rng.random(shape) if kind == "uniform" else rng.standard_normal(shape)
    return out


def _loss(out: torch.Tensor, labels: np.ndarray | None, idx: np.ndarray, loss: str, seed: int) -> torch.Tensor:
    if loss == "projection":
        r = torch.from_numpy(_per_sample_noise(idx, tuple(out.shape[1:]), seed, "normal")).to(out)
        return (out * r).sum()
    if out.dim() != 2:
        raise BadInputError(f"--loss {loss} needs (batch, classes) logits; the first output has shape {tuple(out.shape)}: use --loss projection")
    if loss == "labels":
        if labels is None:
            raise BadInputError("--loss labels needs labels in the data; use --loss fisher for unlabelled data")
        y = torch.from_numpy(labels).to(out.device)
    else:
        u = _per_sample_noise(idx, (out.shape[1],), seed, "uniform")
        gumbel = -np.log(-np.log(np.clip(u, 1e-12, 1 - 1e-12)))
        y = (out.detach().double().log_softmax(1) + torch.from_numpy(gumbel).to(out.device)).argmax(1)
    return F.cross_entropy(out, y, reduction="sum")


def _probe(model: GraphInterpreter, plan: GatePlan, x: tuple[torch.Tensor, ...]) -> dict[int, str]:
    """Groups whose exit tensors lack a leading batch axis (cannot have per-sample gates)."""
    n = x[0].shape[0]
    shapes: dict[tuple[str, int], tuple[int, ...]] = {}

    def recorder(key: tuple[str, int]) -> Callable[[torch.Tensor], torch.Tensor]:
        def rec(t: torch.Tensor) -> torch.Tensor:
            shapes[key] = tuple(t.shape)
            return t
        return rec

    keys = {(e.node, e.input_index) for edges in plan.edges.values() for e in edges}
    with torch.no_grad():
        model(*x, edge_taps={k: recorder(k) for k in keys})
    bad: dict[int, str] = {}
    for gid, edges in plan.edges.items():
        for e in edges:
            shape = shapes.get((e.node, e.input_index))
            if shape is None or not shape or shape[0] != n or e.axis == 0:
                bad[gid] = f"channels leave through a tensor without a leading batch axis (at {e.node})"
                break
    return bad


def collect_fisher(
    model: GraphInterpreter,
    plan: GatePlan,
    data: Calibration,
    loss: str = "fisher",
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> FisherResult:
    """Accumulate F for every gateable group over ``data`` (this rank's shard).

    Raises:
        BadInputError: Unknown loss, labels missing, outputs not logits.
    """
    if loss not in LOSSES:
        raise BadInputError(f"unknown --loss '{loss}' (choose from {', '.join(LOSSES)})")
    device = device or default_device()
    model = model.to(device).eval()
    rank, world = rank_and_world()
    for p in model.parameters():
        p.requires_grad_(False)
    first = next(data.batches(max(2, min(batch_size, len(data)))))
    skipped = dict(plan.skipped)
    skipped.update(_probe(model, plan, tuple(torch.from_numpy(a).to(device) for a in first[1])))
    active = {g: e for g, e in plan.edges.items() if g not in skipped}
    live = GatePlan(active, skipped)
    sizes = {g: edges[0].index.shape[0] for g, edges in active.items()}
    acc = {g: np.zeros((3, c, c)) for g, c in sizes.items()}
    gsum = {g: np.zeros(c) for g, c in sizes.items()}
    done = 0
    for idx, inputs, labels in data.batches(batch_size, rank, world):
        x = tuple(torch.from_numpy(a).to(device) for a in inputs)
        gates = {g: torch.ones(len(idx), c, device=device, requires_grad=True) for g, c in sizes.items()}
        out = model(*x, edge_taps=gate_taps(live, gates))[0]
        total = _loss(out, labels, idx, loss, seed)
        grads = torch.autograd.grad(total, list(gates.values()), allow_unused=True)
        even = torch.from_numpy(idx % 2 == 0).to(device)
        for g, grad in zip(gates, grads):
            if grad is None:
                continue
            rows = grad.double()
            a, b = rows[even], rows[~even]
            acc[g][1] += (a.T @ a).cpu().numpy()
            acc[g][2] += (b.T @ b).cpu().numpy()
            gsum[g] += rows.sum(0).cpu().numpy()
        done += len(idx)
        if progress is not None:
            progress(done, len(data) // world)
    counts = np.array([len(data), (len(data) + 1) // 2, len(data) // 2], dtype=np.float64)
    if world > 1:
        acc = {g: _all_reduce(m) for g, m in acc.items()}
        gsum = {g: _all_reduce(v) for g, v in gsum.items()}
    out_groups: dict[int, GroupFisher] = {}
    for g, m in acc.items():
        m[0] = m[1] + m[2]
        out_groups[g] = GroupFisher(
            f=m[0] / counts[0],
            halves=(m[1] / max(counts[1], 1.0), m[2] / max(counts[2], 1.0)),
            grad=gsum[g] / counts[0],
        )
    return FisherResult(out_groups, len(data), skipped, loss)


def _all_reduce(array: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(array))
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.cpu().numpy()
