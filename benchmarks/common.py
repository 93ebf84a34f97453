"""Setup shared by the benchmark scripts: a trained reference model on ONNX, its analysis, a ratio bisection.

Not a benchmark. The scripts run as ``python benchmarks/<name>.py``, which puts this folder on the import path, and
import it as a sibling: ``from common import analyzed_workspace  # benchmarks/ (same folder)``. Only APIs that older
checkouts have too are used here, so ``PYTHONPATH=<old checkout>`` runs keep working.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from graphprune import models
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.execution.sessions import make_session, measure_latency
from graphprune.frontends.onnx import load_onnx
from graphprune.models.fashion import trained
from graphprune.pipeline.passes import AnalyzePass, AnalyzePassOptions, Workspace

if TYPE_CHECKING:
    from torch import nn

    from graphprune.frontends.data import Calibration
    from graphprune.frontends.onnx import OnnxModel

__all__ = ["CACHE_DIR", "analyzed_workspace", "bisect_ratio", "interleaved_ms", "load_onnx_bytes", "log", "trained_onnx"]

CACHE_DIR = "benchmarks/.cache"  # trained reference models, relative to the repository root the scripts run from
T = TypeVar("T")


def log(*args: Any) -> None:
    """Print ``args`` after the wall-clock time, flushed (progress lines of long runs)."""
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def trained_onnx(name: str, epochs: float, bn: Literal["keep", "fold"]) -> tuple[nn.Module, OnnxModel]:
    """Reference model ``name`` trained on Fashion-MNIST (cached in ``CACHE_DIR``), and its ONNX export loaded.

    Args:
        name: A reference model (``models.build`` name).
        epochs: Training epochs (part of the cache key).
        bn: ``keep`` or ``fold`` BatchNorm in the export.

    Returns:
        The torch module and the loaded export (written to a fresh temporary folder that is kept).
    """
    module = trained(name, epochs, cache_dir=CACHE_DIR)
    path = Path(tempfile.mkdtemp()) / "m.onnx"
    models.export_onnx(module, path, bn=bn)
    return module, load_onnx(path)


def load_onnx_bytes(blob: bytes) -> OnnxModel:
    """Load a serialized ONNX model (through a temporary file, removed after)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(blob)
        return load_onnx(path)


def analyzed_workspace(om: OnnxModel, data: Calibration, samples: int = 2048, loss: str = "labels") -> Workspace:
    """A workspace on ``om`` (original and model) after the analyze pass on ``data``.

    Args:
        om: The loaded model.
        data: Calibration data (labelled for ``loss="labels"``).
        samples: Samples the analysis reads.
        loss: The analysis loss (``AnalyzePassOptions.loss``).

    Returns:
        The workspace with its analysis.
    """
    ws = Workspace(original=OnnxPrunable(om), model=OnnxPrunable(om), data=data)
    return AnalyzePass(AnalyzePassOptions(samples=samples, loss=loss))(ws).workspace


def bisect_ratio(at: Callable[[float], tuple[T, float]], goal: float, steps: int, hi: float = 0.95) -> tuple[float, tuple[T, float] | None]:
    """Bisect a pruning setting in [0, ``hi``] (larger prunes more) to the smallest whose reduction reaches ``goal``.

    Args:
        at: The pruned result at a setting, and its reduction (e.g. MACs before / after).
        goal: The reduction to reach.
        steps: Bisection steps (one call of ``at`` each).
        hi: The largest setting tried.

    Returns:
        The upper end of the final interval (the setting of the result when one reached ``goal``, else ``hi``), and
        ``(result, reduction)`` at the smallest setting that reached it, or None when no setting tried did.
    """
    lo, best = 0.0, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        out, reduction = at(mid)
        if reduction >= goal:
            hi, best = mid, (out, reduction)
        else:
            lo = mid
    return hi, best


def interleaved_ms(models_: dict[str, bytes], x: np.ndarray, rounds: int = 5, runs: int = 40) -> dict[str, float]:
    """Median latency (ms, one thread) of each model on input ``x`` over ``rounds`` alternating rounds of ``runs``
    runs, one session alive at a time."""
    times: dict[str, list[float]] = {name: [] for name in models_}
    for _ in range(rounds):
        for name, blob in models_.items():
            session = make_session(blob, threads=1)
            times[name].append(measure_latency(session, {session.get_inputs()[0].name: x}, runs=runs))
            del session
    return {name: float(np.median(t)) for name, t in times.items()}
