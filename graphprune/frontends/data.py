"""Calibration data: ``.npz`` files, image folders and Fashion-MNIST.

Every loader returns a :class:`Calibration`: one array per model input (batch
first) and optional integer labels, checked against the model's input shapes.
"""
from __future__ import annotations

import dataclasses
import gzip
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from graphprune.errors import BadInputError
from graphprune.ir.graph import ChannelGraph

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "Calibration",
    "ImageOptions",
    "load_data",
    "load_fashion_mnist",
]

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path(os.environ.get("GRAPHPRUNE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Samples for analysis or fine-tuning.

    Attributes:
        inputs: One array per model input, samples along axis 0.
        labels: Integer class labels, or None.
        source: Where the data came from (for reports).
    """

    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def subset(self, n: int, seed: int = 0) -> Calibration:
        """A seeded random subset of ``n`` samples (kept in their order), or self when smaller."""
        if len(self) <= n:
            return self
        pick = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        labels = None if self.labels is None else self.labels[pick]
        return Calibration(tuple(a[pick] for a in self.inputs), labels, self.source)

    def batches(
        self, batch_size: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray | None]]:
        """Yield (global sample indices, inputs, labels) of this rank's shard.

        Sample i belongs to rank ``i % world``, so shards are disjoint and
        their union is the whole set.
        """
        if batch_size < 1:
            raise BadInputError(f"--batch-size must be at least 1, got {batch_size}")
        mine = np.arange(rank, len(self), world)
        for start in range(0, mine.size, batch_size):
            idx = mine[start:start + batch_size]
            labels = None if self.labels is None else self.labels[idx]
            yield idx, tuple(a[idx] for a in self.inputs), labels


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How image files become tensors: size (H, W), per-channel mean and std."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise BadInputError(f"{path}: not an IDX file")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


FASHION_MNIST_SPLITS = ("train", "test", "fit", "val")
FASHION_MNIST_VALIDATION = 5000
"""Training images in the ``val`` split: the ``fit`` split (the rest) trains, ``val`` is never trained on."""
_VALIDATION_SEED = 20260607


def load_fashion_mnist(split: str = "train", root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (N, 1, 28, 28) float32 images and int64 labels.

    ``train`` and ``test`` are the files' splits; ``fit`` and ``val`` part the training images by a fixed
    permutation (``val``: :data:`FASHION_MNIST_VALIDATION` of them, ``fit``: the rest, both in file order), so a
    model trained on ``fit`` can be calibrated on images it never saw.

    Raises:
        BadInputError: When the files are missing or the split is unknown.
    """
    if split in ("fit", "val"):
        x, y = load_fashion_mnist("train", root)
        order = np.random.default_rng(_VALIDATION_SEED).permutation(len(y))
        pick = np.sort(order[:FASHION_MNIST_VALIDATION] if split == "val" else order[FASHION_MNIST_VALIDATION:])
        return x[pick], y[pick]
    root = root or FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise BadInputError(f"unknown split '{split}' (train, test, fit or val)")
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise BadInputError(
            f"Fashion-MNIST not found in {root}: install it with "
            "'apt-get update && apt-get install -y dataset-fashion-mnist' (or set GRAPHPRUNE_FASHION_MNIST)"
        )
    x = _read_idx(images).astype(np.float32) / 255.0
    x = ((x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)[:, None]
    return x, _read_idx(labels).astype(np.int64)


def _load_npz(path: Path, graph: ChannelGraph) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: cannot read .npz ({exc})") from None
    labels = arrays.pop("labels", None)
    names = graph.inputs
    if all(n in arrays for n in names):
        inputs = tuple(arrays[n] for n in names)
    elif len(names) == 1 and len(arrays) == 1:
        inputs = (next(iter(arrays.values())),)
    else:
        raise BadInputError(
            f"{path}: needs arrays named after the model's inputs ({', '.join(names)}), has {', '.join(arrays) or 'none'}"
        )
    return inputs, labels


def _load_images(root: Path, graph: ChannelGraph, options: ImageOptions) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, k) for k, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise BadInputError(f"{root}: no images in class sub-folders (ImageFolder layout: ROOT/CLASS/IMAGE)")
    shape = graph.tensors[graph.inputs[0]].shape or ()
    channels = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else 3
    size = options.size or tuple(d if isinstance(d, int) else 224 for d in shape[2:4]) or (224, 224)
    mean = np.asarray(options.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(options.std, dtype=np.float32).reshape(-1, 1, 1)
    out = np.empty((len(files), channels, size[0], size[1]), dtype=np.float32)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as raw:
                img = raw.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]))
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except OSError as exc:
            raise BadInputError(f"{path}: cannot read image ({exc})") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        out[i] = (arr - mean) / std
    return (out,), np.array([k for _, k in files], dtype=np.int64)


def _check(inputs: Sequence[np.ndarray], labels: np.ndarray | None, graph: ChannelGraph, source: str) -> None:
    n = inputs[0].shape[0] if inputs[0].ndim else 0
    for name, arr in zip(graph.inputs, inputs):
        shape = graph.tensors[name].shape
        if arr.ndim == 0 or arr.shape[0] != n:
            raise BadInputError(f"{source}: input '{name}' must have {n} samples along axis 0, has shape {arr.shape}")
        if shape is not None:
            want = tuple(d if isinstance(d, int) else None for d in shape[1:])
            got = tuple(arr.shape[1:])
            if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
                raise BadInputError(f"{source}: input '{name}' has sample shape {got}, the model expects {want}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise BadInputError(f"{source}: input '{name}' holds NaN or infinite values")
    if labels is not None and (labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer)):
        raise BadInputError(f"{source}: 'labels' must be {n} integers, got {labels.dtype} {labels.shape}")


def load_data(
    spec: str,
    graph: ChannelGraph,
    samples: int | None = None,
    seed: int = 0,
    split: str = "train",
    images: ImageOptions | None = None,
    flag: str = "--data",
) -> Calibration:
    """Load calibration data named by ``spec``.

    Args:
        spec: ``fashion-mnist`` (``fashion-mnist:test`` for the test split),
            a ``.npz`` file or an image folder.
        graph: The model (input names, shapes and dtypes are checked).
        samples: Keep a random subset of this many samples (seeded).
        seed: Subset seed.
        split: Fashion-MNIST split.
        images: Image folder options.
        flag: The option that named ``spec``, for the message when it names nothing loadable.

    Raises:
        BadInputError: Missing files, wrong shapes, NaN, too few samples.
    """
    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray | None
    if spec in ("fashion-mnist", *(f"fashion-mnist:{part}" for part in FASHION_MNIST_SPLITS)):
        x, y = load_fashion_mnist(spec.partition(":")[2] or split)
        inputs, labels = (x,), y
    else:
        path = Path(spec)
        if path.is_dir():
            inputs, labels = _load_images(path, graph, images or ImageOptions())
        elif path.suffix == ".npz" and path.is_file():
            inputs, labels = _load_npz(path, graph)
        else:
            raise BadInputError(f"{flag} {spec}: not 'fashion-mnist', an .npz file or an image folder")
    _check(inputs, labels, graph, spec)
    dtypes = {n: graph.tensors[n].dtype for n in graph.inputs}
    inputs = tuple(a.astype(np.float32) if dtypes[n] == "FLOAT" else a for n, a in zip(graph.inputs, inputs))
    if samples is not None and samples < 2:
        raise BadInputError(f"--samples must be at least 2, got {samples}")
    if inputs[0].shape[0] < 2:
        raise BadInputError(f"{spec}: at least 2 samples are needed, got {inputs[0].shape[0]}")
    data = Calibration(tuple(inputs), labels, spec)
    return data if samples is None else data.subset(samples, seed)
