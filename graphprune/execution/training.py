"""Training and evaluation loops for classifiers: torch modules and graph interpreters alike.

Used to train reference models, to fine-tune pruned ones (labels, or
distillation from the unpruned model when there are none) and to measure
accuracy. Models may return a tensor or a tuple whose first item is the logits.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graphprune.errors import BadInputError
from graphprune.execution.distributed import rank_and_world
from graphprune.execution.progress import Progress
from graphprune.frontends.data import Calibration

__all__ = ["FitOptions", "accuracy", "fit", "logits_of"]

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class FitOptions:
    """SGD with momentum, cosine learning-rate schedule.

    Attributes:
        epochs: Passes over the data (fractions allowed: 0.5 is half an epoch).
        lr: Peak learning rate.
        batch_size: Samples per step.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        temperature: Distillation temperature (no labels, a teacher given).
        seed: Shuffling seed.
        clip_norm: Largest gradient norm of a step (0: no clipping); a model without normalisation (BN folded)
            otherwise diverges at rates a BN model trains at.
    """

    epochs: float = 1.0
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 2.0
    seed: int = 0
    clip_norm: float = 5.0

    def check(self) -> None:
        """Raises BadInputError on out-of-range values."""
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1 or self.temperature <= 0 or self.clip_norm < 0:
            raise BadInputError("fine-tuning needs epochs > 0, lr > 0, batch_size >= 1, temperature > 0 and clip_norm >= 0")


def logits_of(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _loss(
    logits: torch.Tensor, labels: np.ndarray | None, x: tuple[torch.Tensor, ...], teacher: nn.Module | None, t: float
) -> torch.Tensor:
    """Cross-entropy with labels, else distillation; per-token logits ``(N, L, V)`` (a language model) are scored per token."""
    if labels is not None:
        y = torch.from_numpy(labels).to(logits.device)
        if logits.dim() == 3 and tuple(y.shape) == tuple(logits.shape[:2]):  # (N, L, V) logits, (N, L) labels: a language model
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        return F.cross_entropy(logits, y)
    assert teacher is not None
    with torch.no_grad():
        target = logits_of(teacher(*x))
    if logits.dim() == 3:  # (N, L, V): per-token distributions over the last axis, averaged over tokens (4-D: classes on axis 1)
        logits, target = logits.reshape(-1, logits.size(-1)), target.reshape(-1, target.size(-1))
    return F.kl_div(F.log_softmax(logits / t, 1), F.softmax(target / t, 1), reduction="batchmean") * t * t


def fit(
    model: nn.Module,
    data: Calibration,
    options: FitOptions = FitOptions(),
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
    device: torch.device | None = None,
) -> float:
    """Train ``model`` in place; returns the mean loss of the last 50 steps.

    Under ``torchrun`` every rank takes its slice of each batch and gradients
    are averaged (all-reduce), so ranks stay identical. Gradients are clipped to
    ``options.clip_norm``; when the loss still becomes non-finite, training
    stops, the weights from before it are restored and a warning says so (the
    returned loss is then NaN).

    Raises:
        BadInputError: No labels and no teacher, or non-positive epochs.
    """
    if data.labels is None and teacher is None:
        raise BadInputError("fine-tuning needs labels or the unpruned model as a teacher")
    if options.epochs <= 0:
        raise BadInputError(f"epochs must be positive, got {options.epochs}")
    device = device or torch.device("cpu")
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    params = [p for p in model.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)
    n = len(data)
    steps = max(1, math.ceil(options.epochs * n / options.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rank, world = rank_and_world()
    rng = np.random.default_rng(options.seed)  # same order on every rank; each takes its slice of a batch
    order = rng.permutation(n)
    pos = 0
    recent: list[float] = []
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for step in range(steps):
        if pos + options.batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + options.batch_size][rank::world]
        pos += options.batch_size
        x = tuple(torch.from_numpy(a[idx]).to(device) for a in data.inputs)
        labels = None if data.labels is None else data.labels[idx]
        loss = _loss(logits_of(model(*x)), labels, x, teacher, options.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _average_gradients(params, world)
        # the norm of the averaged gradient is the same on every rank (a non-finite loss anywhere makes it non-finite)
        norm = torch.nn.utils.clip_grad_norm_(params, options.clip_norm if options.clip_norm > 0 else math.inf)
        if not torch.isfinite(norm) or (world == 1 and not torch.isfinite(loss)):
            model.load_state_dict(start)
            model.eval()
            log.warning("fine-tuning diverged at step %d of %d (loss %s): the weights from before it are kept; "
                        "lower the learning rate", step + 1, steps, float(loss))
            return math.nan
        opt.step()
        sched.step()
        recent = ([*recent, float(loss.detach())])[-50:]
        if progress is not None:
            progress(step + 1, steps, float(np.mean(recent)))
    if world > 1:
        _average_buffers(model, world)
    model.eval()
    return float(np.mean(recent))


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Data parallelism: every rank ends the step with the mean gradient."""
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


@torch.no_grad()
def _average_buffers(model: nn.Module, world: int) -> None:
    """BN running statistics, averaged so every rank holds the same model."""
    for b in model.buffers():
        if b.is_floating_point():
            torch.distributed.all_reduce(b)
            b.div_(world)


@torch.no_grad()
def accuracy(model: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], data: Calibration, batch_size: int = 500) -> float:
    """Top-1 accuracy on labelled data.

    Raises:
        BadInputError: When the data has no labels.
    """
    if data.labels is None:
        raise BadInputError("accuracy needs labelled data")
    if isinstance(model, nn.Module):
        model.eval()
    correct = 0
    for _, inputs, labels in data.batches(batch_size):
        logits = logits_of(model(*(torch.from_numpy(a) for a in inputs)))
        correct += int((logits.argmax(1).numpy() == labels).sum())
    return correct / len(data)
