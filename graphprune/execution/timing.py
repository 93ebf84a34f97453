"""Latency timing on any runtime: warmed-up medians, and variants timed side by side in interleaved rounds.

A single timing of a model swings with the machine's load and clocks (on a busy 2-core machine two timings of the
same file, one after the other, differ by 10-30%). Comparing a pruned model with its original therefore times both
in one interleaved run: every round opens each variant in turn (one alive at a time: the spinning thread pools of
other live onnxruntime sessions steal the cores), warms it up, times it for at least :data:`ROUND_MS`, and closes
it; the rotating start spreads any drift over all of them. A variant is a :data:`Runner`: a context manager that
yields a zero-argument callable running one forward pass.

Example:
    >>> import contextlib
    >>> runner = lambda: contextlib.nullcontext(lambda: sum(range(100)))
    >>> fast, same = interleaved_ms([runner, runner], rounds=2, min_ms=1.0)
    >>> fast > 0 and same > 0
    True
"""
from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphprune.ir.model import Int8Form, PrunableModel

__all__ = ["MAX_ROUNDS", "MAX_RUNS", "MIN_TIMED_MS", "ROUND_MS", "Runner", "interleaved_ms", "median_ms", "rounds_for", "session_runner", "side_by_side_ms",
           "warmed_up"]

MIN_TIMED_MS = 20.0
"""A lone timing warms up and times for at least this long: a 0.1 ms model is timed on ~200 runs, not ``runs``
(5 runs of a sub-millisecond model swing by 30% or more between two measurements of the same file)."""
ROUND_MS = 10.0
"""Each round of :func:`interleaved_ms` warms a variant up and times it for at least this long."""
MAX_RUNS = 2000
MAX_ROUNDS = 5
"""Rounds of a side-by-side timing asked for ``runs`` runs a variant (:func:`rounds_for`)."""

Runner = Callable[[], AbstractContextManager[Callable[[], object]]]
"""Opens a model ready to run (an onnxruntime session, a torch module in eval mode) and yields one forward pass."""


def session_runner(open_session: Callable[[], Any], feeds: Mapping[str, Any]) -> Runner:
    """A :data:`Runner` of an onnxruntime session: ``open_session()`` makes it for its turn, each run feeds ``feeds``,
    and the session is dropped when the turn ends (one alive at a time)."""

    @contextlib.contextmanager
    def opened() -> Iterator[Callable[[], object]]:
        session = open_session()
        yield lambda: session.run(None, dict(feeds))

    return opened


def warmed_up(run: Callable[[], object], warmup: int, runs: int, min_ms: float) -> int:
    """Call ``run`` ``warmup`` times and for at least ``min_ms``; the number of runs to time: ``runs``, or as many as
    last ``min_ms`` when more (at most :data:`MAX_RUNS`)."""
    done, start = 0, time.perf_counter()
    while done < warmup or ((time.perf_counter() - start) * 1e3 < min_ms and done < MAX_RUNS):
        run()
        done += 1
    each_ms = (time.perf_counter() - start) * 1e3 / max(1, done)
    return max(runs, min(MAX_RUNS, math.ceil(min_ms / max(each_ms, 1e-6))))


def _timed(run: Callable[[], object], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def median_ms(run: Callable[[], object], runs: int = 30, warmup: int = 5, min_ms: float = MIN_TIMED_MS) -> float:
    """Median wall time of one call of ``run``, in milliseconds, over the runs :func:`warmed_up` gives."""
    return statistics.median(_timed(run, warmed_up(run, warmup, runs, min_ms)))


def rounds_for(runs: int) -> tuple[int, int]:
    """``(rounds, runs a round)`` for a side-by-side timing asked for ``runs`` runs a variant: at most
    :data:`MAX_ROUNDS` rounds (each opens every variant anew), at least one run a round."""
    rounds = max(1, min(MAX_ROUNDS, runs))
    return rounds, max(1, math.ceil(runs / rounds))


def interleaved_ms(runners: Sequence[Runner], rounds: int, per_round: int = 1, warmup: int = 2,
                   min_ms: float = ROUND_MS) -> list[float]:
    """Median ms of one run of each variant, timed side by side.

    Args:
        runners: The variants.
        rounds: Every round opens each variant in turn, from a start that rotates by one each round.
        per_round: Runs timed a round, at least (more while they last under ``min_ms``).
        warmup: Runs after opening that are not timed, at least (more while they last under ``min_ms``).
        min_ms: Warm-up and timing each last at least this long a round.

    Returns:
        The medians over all timed runs, in the order of ``runners``.
    """
    times: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    for r in range(max(1, rounds)):
        shift = r % max(1, len(order))
        for i in order[shift:] + order[:shift]:
            with runners[i]() as run:
                times[i].extend(_timed(run, warmed_up(run, warmup, per_round, min_ms)))
    return [statistics.median(t) for t in times]


def side_by_side_ms(models: Sequence[PrunableModel], batch: int, runs: int, threads: int = 0,
                    quantized: Int8Form | None = None) -> list[float]:
    """Median ms of one forward pass of each model at ``batch`` on its runtime, timed side by side
    (:func:`interleaved_ms`, :func:`rounds_for` ``runs``); ``threads`` and ``quantized`` as in
    :meth:`~graphprune.ir.model.PrunableModel.runner`.

    Raises:
        BadInputError: ``quantized`` on a runtime that does not quantize.
    """
    rounds, per_round = rounds_for(runs)
    for m in models:  # a bad setting fails here, before any timing
        m.runner(batch, threads, quantized)
    return interleaved_ms([functools.partial(m.runner, batch, threads, quantized) for m in models], rounds, per_round)
