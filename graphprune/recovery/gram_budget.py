"""The memory plan of least-squares compensation: which Gram form each consumer uses within a bound (issue 16).

Every compensated consumer streams the second moments of its input elements
from the calibration data, all consumers in one pass, so their Gram
matrices are resident together. An edge of ``C`` channels with ``m``
elements each (a Flatten -> Gemm reads ``C`` channels x ``m`` positions)
has three forms, most exact first:

* ``dense``: one ``(C m) x (C m)`` Gram; every dropped element is fitted from
  every kept element (the least-squares best; a conv's edge has ``m = 1``
  and only this form);
* ``per-position``: ``m`` Grams of ``C x C``; dropped channel ``d`` at
  position ``p`` is fitted from the kept channels at ``p`` (pruning removes
  whole channels, so the blocks are the channel structure);
* ``shared``: one ``C x C`` Gram of the positions pooled, with per-position
  means: one channel combination for all positions, a constant per position.

The plan starts every consumer at its most exact form and, while the
resident Gram matrices plus the largest solve plus the streaming chunk
exceed the bound, moves the costliest consumer down a form, then skips the
costliest consumer with the reason. A bound that cannot hold even the
cheapest consumer alone is a :class:`~graphprune.errors.BadInputError`.

Example:
    >>> plan = plan_memory([Consumer("fc", 0, 512, 49, 256, 256)], bound=10**9)
    >>> plan.consumers[0].form, plan.peak <= plan.bound
    ('per-position', True)
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

from graphprune.errors import BadInputError

__all__ = ["FORMS", "Consumer", "ConsumerMemory", "MemoryPlan", "default_memory_bytes", "format_bytes", "plan_memory"]

log = logging.getLogger(__name__)

FORMS = ("dense", "per-position", "shared")
"""Gram forms, most exact first."""

STREAM_BYTES = 32 * 10**6
"""Most bytes one streamed chunk of activations may take (a quarter of the bound when that is less)."""

MEMORY_FRACTION = 0.25
"""The default bound: this fraction of the machine's physical memory."""

_F64 = 8


def default_memory_bytes() -> int:
    """A quarter of the machine's physical memory (4 GB when the system does not say)."""
    try:
        total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        total = 16 * 10**9
    return int(total * MEMORY_FRACTION)


def format_bytes(n: int) -> str:
    """``'1.2 GB'``, ``'980.0 kB'`` (decimal units, like the CLI's sizes)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclasses.dataclass(frozen=True)
class Consumer:
    """One compensated exit edge, by shape: ``channels`` x ``positions`` elements, the largest block's kept and dropped channels."""

    node: str
    group: int
    channels: int
    positions: int
    keep: int
    drop: int
    blocks_keep: int = 0
    blocks_drop: int = 0
    """Dense form: kept and dropped elements of its largest block (0: ``keep * positions``, ``drop * positions``)."""
    leading: bool = False
    """The Gram holds only the rows of the ``keep`` channels that lead the vector (the sequential refit's joint
    vector: the pruned model's kept channels, then the original's; the fit reads no other rows)."""


@dataclasses.dataclass(frozen=True)
class ConsumerMemory:
    """The chosen form of one consumer and what it holds: resident Gram bytes, peak solve bytes (0 when skipped)."""

    node: str
    group: int
    form: str
    gram_bytes: int
    solve_bytes: int
    reason: str = ""


def _cost(c: Consumer, form: str) -> tuple[int, int]:
    """(resident Gram + means, solve workspace) bytes of ``c`` in ``form``."""
    cm = c.channels * c.positions
    rows = c.keep if c.leading else c.channels
    if form == "dense":
        k = c.blocks_keep or c.keep * c.positions
        d = c.blocks_drop or c.drop * c.positions
        gram = rows * c.positions * cm
    else:
        k, d = c.keep, c.drop
        gram = rows * c.channels * (c.positions if form == "per-position" else 1)
    return (gram + cm) * _F64, 2 * k * (k + d) * _F64  # solve: C_KK and C_KD, and the solver's copies of both


def _forms(c: Consumer) -> tuple[str, ...]:
    return ("dense",) if c.positions == 1 else FORMS


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Forms of every consumer (in the order given), the bound and the streaming chunk, all in bytes.

    ``waves``: for sequential reconstruction, the pass each consumer is fitted in (only one wave's
    Grams are resident at a time); empty when all consumers are accumulated together. ``held_bytes``:
    activations held besides (sequential reconstruction: every used sample's live tensors, both
    models), for ``samples`` calibration samples (0: all).
    """

    bound: int
    stream_bytes: int
    consumers: tuple[ConsumerMemory, ...]
    waves: tuple[int, ...] = ()
    held_bytes: int = 0
    samples: int = 0

    @property
    def active(self) -> tuple[ConsumerMemory, ...]:
        return tuple(c for c in self.consumers if c.form != "skipped")

    def _wave_costs(self) -> list[tuple[int, int]]:
        """(resident Grams, largest solve) of every wave (one wave when not sequential)."""
        waves = self.waves or (0,) * len(self.consumers)
        out: dict[int, tuple[int, int]] = {}
        for w, c in zip(waves, self.consumers):
            if c.form != "skipped":
                gram, solve = out.get(w, (0, 0))
                out[w] = (gram + c.gram_bytes, max(solve, c.solve_bytes))
        return list(out.values())

    @property
    def gram_bytes(self) -> int:
        """The resident Gram matrices and means: all together, or the largest wave's."""
        return max((g for g, _ in self._wave_costs()), default=0)

    @property
    def peak(self) -> int:
        """Resident Grams + the largest solve + one streamed chunk: the most compensation holds at once."""
        return max((g + s for g, s in self._wave_costs()), default=0) + self.stream_bytes + self.held_bytes

    @property
    def skipped(self) -> tuple[str, ...]:
        return tuple(c.reason for c in self.consumers if c.form == "skipped")

    def line(self) -> str:
        """``'compensation: 14 consumers, Gram matrices 1.1 GB, 1.2 GB at most with solve and streaming (bound 6.0 GB)'``
        plus the forms changed for memory."""
        held = (f", activations of {self.samples} samples {format_bytes(self.held_bytes)}" if self.held_bytes else "")
        text = (f"compensation: {len(self.active)} consumers, Gram matrices {format_bytes(self.gram_bytes)}"
                f"{' (refitted one at a time)' if self.waves else ''}{held}, "
                f"{format_bytes(self.peak)} at most with solve and streaming (bound {format_bytes(self.bound)})")
        counts = [(f, sum(c.form == f for c in self.consumers)) for f in ("per-position", "shared", "skipped")]
        changed = [f"{n} {'skipped' if f == 'skipped' else 'solved ' + f}" for f, n in counts if n]
        return text + (f"; for memory {', '.join(changed)}" if changed else "")


def plan_memory(consumers: Sequence[Consumer], bound: int, waves: Sequence[int] = ()) -> MemoryPlan:
    """Choose each consumer's Gram form so that compensation holds at most ``bound`` bytes.

    Args:
        consumers: The compensated edges, by shape.
        bound: Bytes the compensation may hold at once (Grams, one solve, one streamed chunk).
        waves: The pass each consumer is accumulated in (sequential reconstruction; only one
            pass's Grams are resident at once); empty: all together.

    Returns:
        The plan; consumers that fit in no form beside the others are skipped with the reason.

    Raises:
        BadInputError: When ``bound`` cannot hold even the cheapest consumer alone.
    """
    rows = max((c.channels * c.positions * 3 * _F64 for c in consumers), default=0)  # f64 row, its copy, a permute
    stream = max(min(STREAM_BYTES, bound // 4), rows)
    choice = [0] * len(consumers)
    active = set(range(len(consumers)))
    reasons: dict[int, str] = {}
    wave_of = list(waves) or [0] * len(consumers)

    def cost(i: int) -> tuple[int, int]:
        return _cost(consumers[i], _forms(consumers[i])[choice[i]])

    def wave_peak(w: int) -> int:
        members = [i for i in active if wave_of[i] == w]
        return sum(cost(i)[0] for i in members) + max((cost(i)[1] for i in members), default=0) + stream

    while active:
        worst = max({wave_of[i] for i in active}, key=wave_peak)
        if wave_peak(worst) <= bound:
            break
        members = [i for i in active if wave_of[i] == worst]
        down = [i for i in members if choice[i] + 1 < len(_forms(consumers[i]))]
        if down:
            choice[max(down, key=lambda i: sum(cost(i)))] += 1
            continue
        i = max(members, key=lambda i: sum(cost(i)))
        if len(active) == 1:
            c = consumers[i]
            raise BadInputError(
                f"compensation cannot fit in {format_bytes(bound)}: its smallest working set ({c.node}, "
                f"{_forms(c)[choice[i]]} Gram of {c.channels} channels) needs {format_bytes(sum(cost(i)) + stream)}; "
                "raise the compensate pass's memory_bytes (--compensate-memory) or prune without --compensate")
        active.discard(i)
        c = consumers[i]
        reasons[i] = (f"{c.node}: compensation skipped for memory, its {_forms(c)[choice[i]]} Gram matrices need "
                      f"{format_bytes(sum(cost(i)))} beside the others within the bound {format_bytes(bound)}")
    out = []
    for i, c in enumerate(consumers):
        if i in active:
            gram, solve = cost(i)
            out.append(ConsumerMemory(c.node, c.group, _forms(c)[choice[i]], gram, solve))
        else:
            out.append(ConsumerMemory(c.node, c.group, "skipped", 0, 0, reasons[i]))
    plan = MemoryPlan(bound, stream, tuple(out), tuple(waves))
    log.debug("%s", plan.line())
    return plan
