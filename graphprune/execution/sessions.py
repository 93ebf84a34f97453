"""onnxruntime helpers: providers, sessions, sample inputs, latency."""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from graphprune.errors import BadInputError
from graphprune.execution.timing import MIN_TIMED_MS, median_ms
from graphprune.ir.dtypes import numpy_dtype
from graphprune.ir.graph import ChannelGraph

log = logging.getLogger(__name__)

__all__ = ["make_session", "measure_latency", "providers", "quiet_onnxruntime", "sample_inputs"]

MAX_SAMPLE_ELEMENTS = 1 << 28
"""Largest sample input (elements) built for validation runs."""

DEFAULT_DIM = 32
"""Value given to a dynamic non-batch input dimension when none is set."""


def quiet_onnxruntime() -> None:
    """Silence onnxruntime's process-wide logger (its failures surface as exceptions): for applications, not libraries."""
    ort.set_default_logger_severity(4)


GPU_FIX = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
"""One clean way back to a CUDA-capable onnxruntime (see :func:`onnxruntime_clash`)."""


def onnxruntime_clash() -> str | None:
    """Why CUDA is missing when ``onnxruntime`` and ``onnxruntime-gpu`` are both installed, else None.

    Both distributions install the same ``onnxruntime`` module; whichever was installed last owns
    its files, so the CPU wheel pulled in beside the GPU one silently hides the CUDA provider.
    """
    from importlib import metadata

    installed = set()
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(name)
            installed.add(name)
        except metadata.PackageNotFoundError:
            continue
    if len(installed) < 2 or "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    return f"onnxruntime and onnxruntime-gpu are both installed and the CPU build won, so CUDA is not used; fix: {GPU_FIX}"


@functools.cache
def _warn_clash() -> None:
    reason = onnxruntime_clash()
    if reason is not None:
        log.warning("%s", reason)


def providers() -> list[str]:
    """CUDA when onnxruntime offers it, then CPU (a shadowed GPU install is logged once, with the fix)."""
    _warn_clash()
    available = ort.get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if p in available]
    return [*chosen, "CPUExecutionProvider"]


def make_session(model: bytes | str, optimize: bool = True, threads: int = 0) -> ort.InferenceSession:
    """An inference session on the best available provider."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures surface as exceptions, reported in one line by the caller
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model, opts, providers=providers())


def sample_inputs(
    graph: ChannelGraph,
    batch: int = 2,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    scale: int = 1,
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input.

    Args:
        graph: Supplies input names, shapes and dtypes.
        batch: Value of a dynamic leading dimension.
        dims: Values for named dynamic dimensions.
        seed: RNG seed.
        scale: Multiplies the default of other dynamic dimensions.
    """
    rng = np.random.default_rng(seed)
    dims = dims or {}
    feeds: dict[str, np.ndarray] = {}
    for name in graph.inputs:
        info = graph.tensors[name]
        shape = []
        for i, d in enumerate(info.shape or ()):
            if isinstance(d, int):
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(dims[d])
            else:
                shape.append(batch if i == 0 else DEFAULT_DIM * scale)
        if int(np.prod(shape, dtype=np.float64)) > MAX_SAMPLE_ELEMENTS:
            raise BadInputError(f"input '{name}' declares shape {tuple(shape)}: too large to run for validation")
        dtype = numpy_dtype(info.dtype)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def measure_latency(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], runs: int = 30, warmup: int = 5,
                    min_ms: float = MIN_TIMED_MS) -> float:
    """Median wall time of one run of ``session``, in milliseconds (:func:`graphprune.execution.timing.median_ms`)."""
    return median_ms(lambda: session.run(None, dict(feeds)), runs, warmup, min_ms)
