"""The one progress callback type of long steps (analysis, training), whatever shows it.

Example:
    >>> import math
    >>> seen = []
    >>> def report(done: int, total: int, loss: float = math.nan) -> None:
    ...     seen.append((done, total, loss))
    >>> sink: Progress = report
    >>> sink(3, 10); sink(4, 10, 0.5)
    >>> seen
    [(3, 10, nan), (4, 10, 0.5)]
"""
from __future__ import annotations

from typing import Protocol

__all__ = ["Progress"]


class Progress(Protocol):
    """Told how far a long step has come.

    Called as ``progress(done, total)``: ``done`` of ``total`` units (calibration
    samples of the analysis, optimizer steps of training); training adds a third
    argument, the running mean loss: ``progress(done, total, loss)``. An
    implementation takes the loss as an optional third positional parameter,
    ``math.nan`` by default (``def report(done, total, loss=math.nan)``), and shows
    it only when it is finite.
    """

    def __call__(self, done: int, total: int, loss: float = ..., /) -> None:
        """Record progress; ``loss`` is the running loss where the step has one."""
