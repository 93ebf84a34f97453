"""Reference models trained on Fashion-MNIST, cached on disk by (name, epochs, seed)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from graphprune.execution.progress import Progress
from graphprune.execution.training import FitOptions, fit
from graphprune.frontends.data import Calibration, load_fashion_mnist

__all__ = ["fashion_mnist", "trained"]

log = logging.getLogger(__name__)


def fashion_mnist(split: str) -> Calibration:
    """The Fashion-MNIST split as labelled data: ``train``, ``test``, or ``fit`` / ``val`` (the training images
    parted: :func:`graphprune.frontends.data.load_fashion_mnist`). Raises BadInputError when not installed."""
    x, y = load_fashion_mnist(split)
    return Calibration((x,), y, f"fashion-mnist/{split}")


def trained(
    name: str,
    epochs: float = 3.0,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] = ".graphprune-cache",
    lr: float = 0.05,
    progress: Progress | None = None,
    split: str = "train",
) -> nn.Module:
    """Reference model ``name`` trained on a Fashion-MNIST training split (cached state dict): ``train`` (all
    60,000 images) or ``fit`` (all but the ``val`` images, which then calibrate as unseen data).

    The cache key holds every training setting, so a changed setting retrains.
    """
    from graphprune import models

    if split not in ("train", "fit"):
        raise ValueError(f"train on 'train' or 'fit', not {split!r}")
    tag = "" if split == "train" else f"-{split}"
    path = Path(cache_dir) / f"{name}-fmnist{tag}-e{epochs:g}-lr{lr:g}-s{seed}.pt"
    model = models.build(name, seed)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    torch.manual_seed(seed)
    fit(model, fashion_mnist(split), FitOptions(epochs=epochs, lr=lr, seed=seed), progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()
