"""onnxruntime helpers: providers, sessions, sample inputs, latency."""
from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from graphprune.errors import BadInputError
from graphprune.ir.dtypes import numpy_dtype
from graphprune.ir.graph import ChannelGraph

log = logging.getLogger(__name__)

__all__ = ["make_session", "measure_latency", "providers", "quiet_onnxruntime", "sample_inputs", "warmed_up"]

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


MIN_TIMED_MS = 20.0
"""Warm-up and timing each last at least this long: a 0.1 ms model is timed on ~200 runs, not ``runs``
(5 runs of a sub-millisecond model swing by 30% or more between two measurements of the same file)."""
MAX_RUNS = 2000


def warmed_up(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], warmup: int, runs: int, min_ms: float) -> int:
    """Run ``session`` ``warmup`` times and for at least ``min_ms``; the number of runs to time: ``runs``, or as many as
    last ``min_ms`` when more (at most ``MAX_RUNS``)."""
    done, start = 0, time.perf_counter()
    while done < warmup or ((time.perf_counter() - start) * 1e3 < min_ms and done < MAX_RUNS):
        session.run(None, dict(feeds))
        done += 1
    each_ms = (time.perf_counter() - start) * 1e3 / max(1, done)
    return max(runs, min(MAX_RUNS, math.ceil(min_ms / max(each_ms, 1e-6))))


def measure_latency(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], runs: int = 30, warmup: int = 5,
                    min_ms: float = MIN_TIMED_MS) -> float:
    """Median wall time of one run, in milliseconds, over the runs :func:`warmed_up` gives."""
    runs = warmed_up(session, feeds, warmup, runs, min_ms)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, dict(feeds))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3
