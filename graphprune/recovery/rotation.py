"""The hidden size through rotation (SliceGPT, Ashkboos et al. 2024): the math on numpy arrays.

With every writer of the residual stream made mean-free, a LayerNorm equals
an RMSNorm followed by its scale and shift; folding those into the readers
leaves unit-scale RMSNorms, which commute with any orthogonal ``Q``:
``RMS(x Q) = RMS(x) Q``. So the stream can be expressed in the basis of the
eigenvectors of its second moment, ``x -> x Q``, with every writer
``W -> W Q`` and every reader ``W -> Q^T W``. Dropping the columns of ``Q``
with least energy slices the hidden size; that is not exact, and the pass
reports the discarded energy and the measured output error.

Choices (ours, stated): one **global** ``Q`` for the whole stream (SliceGPT
uses one per layer with ``Q_l^T Q_{l+1}`` matrices on the shortcuts: more
accurate, and extra MatMuls on the residual path), taken from the sum over
every norm input of the second moment of the tokens *as their norm sees
them* (centred for LayerNorms, each token scaled to unit length, each
stream point weighted equally). The RMSNorms keep the original width as their divisor, so the
full-width rotation equals the original model.

Example:
    >>> import numpy as np
    >>> energy_rank(np.array([4.0, 3.0, 2.0, 1.0]), 0.7)
    2
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from graphprune.coupling.stream import Reader, Side, Stream
from graphprune.errors import BadInputError, ValidationError

if TYPE_CHECKING:
    from graphprune.frontends.data import Calibration

M = TypeVar("M")

__all__ = ["HiddenOptions", "HiddenReport", "PointReport", "add_moment", "energy_rank", "kept_width", "measured_report", "pca",
           "rotate_side", "rotated_constants", "slice_measured"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HiddenOptions:
    """How much of the hidden size the ``hidden`` pass keeps, and on what data.

    Attributes:
        keep: Fraction of the hidden size to keep, in (0, 1] (0: choose it by ``energy``).
        energy: Keep the smallest width whose directions hold this fraction of the stream's energy (with ``keep`` 0).
        round_to: Round the kept width up to a multiple of this.
        samples: Calibration samples for the stream's second moments.
        eval_samples: Samples the output error is measured on (the eval data when given, else the calibration data).
        batch_size: Samples per onnxruntime run.
        seed: Subset seed.
    """

    keep: float = 0.0
    energy: float = 0.99
    round_to: int = 1
    samples: int = 512
    eval_samples: int = 1000
    batch_size: int = 64
    seed: int = 0

    def check(self) -> None:
        if not 0.0 <= self.keep <= 1.0:
            raise BadInputError(f"hidden keep must be in (0, 1] (0: by energy), got {self.keep}")
        if self.keep == 0.0 and not 0.0 < self.energy <= 1.0:
            raise BadInputError(f"hidden energy must be in (0, 1], got {self.energy}")
        if self.round_to < 1 or self.samples < 2 or self.eval_samples < 1 or self.batch_size < 1:
            raise BadInputError("hidden needs round_to >= 1, samples >= 2, eval_samples >= 1 and batch_size >= 1")


@dataclasses.dataclass(frozen=True)
class PointReport:
    """One stream point (a norm's input): its own effective dimension and the energy the kept directions hold there."""

    norm: str
    tensor: str
    effective: int
    kept_energy: float


@dataclasses.dataclass(frozen=True)
class HiddenReport:
    """What the hidden pass did and measured (``frozen`` non-empty: it did nothing, and why)."""

    width: int
    kept: int = 0
    energy: float = 0.0
    effective: int = 0
    discarded_energy: float = 0.0
    points: tuple[PointReport, ...] = ()
    norms: int = 0
    writers: int = 0
    readers: int = 0
    max_abs_error: float | None = None
    relative_error: float | None = None
    agreement: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    measured_on: str = ""
    full_rotation_error: float | None = None
    frozen: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """Readable summary lines (the pass prints them; the report table shows the main ones)."""
        if self.frozen:
            return [f"hidden stream frozen: {self.frozen}"]
        out = [f"hidden size {self.width} -> {self.kept} ({self.norms} norms, {self.writers} writers, {self.readers} readers); "
               f"effective dimension {self.effective} at {self.energy:g} energy; discarded energy {self.discarded_energy:.4f}"]
        for p in self.points:
            out.append(f"  {p.norm}: effective {p.effective}, kept energy {p.kept_energy:.4f}")
        if self.max_abs_error is not None:
            agree = f", top-1 agreement {self.agreement:.4f}" if self.agreement is not None else ""
            out.append(f"output error on {self.measured_on}: max abs {self.max_abs_error:.3g}, relative {self.relative_error:.3g}{agree}")
        if self.accuracy_before is not None and self.accuracy_after is not None:
            out.append(f"accuracy {self.accuracy_before:.4f} -> {self.accuracy_after:.4f} (before fine-tuning)")
        return out


def energy_rank(eigvals: np.ndarray, energy: float) -> int:
    """Smallest r whose r largest eigenvalues (sorted descending) hold ``energy`` of the total."""
    vals = np.clip(np.asarray(eigvals, dtype=np.float64), 0.0, None)
    total = float(vals.sum())
    if total <= 0.0:
        return 1
    cum = np.cumsum(vals) / total
    return int(min(vals.size, np.searchsorted(cum, energy - 1e-12) + 1))


def pca(moment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric second-moment matrix."""
    vals, vecs = np.linalg.eigh((moment + moment.T) / 2.0)
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order]


def kept_width(width: int, eigvals: np.ndarray, options: HiddenOptions) -> int:
    """The width to keep: ``keep`` of ``width``, else the energy rank; rounded up to ``round_to``, at most ``width``."""
    k = max(1, round(options.keep * width)) if options.keep > 0 else energy_rank(eigvals, options.energy)
    return int(min(width, math.ceil(k / options.round_to) * options.round_to))


def rotate_side(value: np.ndarray, axis: int, basis: np.ndarray) -> np.ndarray:
    """``value`` with its ``axis`` (of length D) mapped through ``basis`` (D x k): entries become coordinates in the basis."""
    moved = np.moveaxis(value, axis, -1)
    return np.moveaxis(moved @ basis, -1, axis)


def _reader(value: np.ndarray, r: Reader, gamma: np.ndarray, beta: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A reader's weight with the norm's scale folded and the basis applied, and the shift's contribution to its bias."""
    w = np.moveaxis(value, r.weight.axis, 0)  # (D, out)
    shift = beta @ w
    folded = basis.T @ (gamma[:, None] * w)
    return np.moveaxis(folded, 0, r.weight.axis), shift


def rotated_constants(stream: Stream, const: Callable[[str], np.ndarray], basis: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """New values of every constant the rotation changes, and biases to add to readers that have none.

    Args:
        stream: The model's (unfrozen) stream.
        const: Reads a constant of the model.
        basis: The kept directions, D x k (orthonormal columns).

    Returns:
        (constants by name, in their original dtypes; new reader biases by reader node, only where a norm shift needs one).
    """
    out: dict[str, np.ndarray] = {}
    for side in stream.writers:
        value = const(side.tensor)
        w = value.astype(np.float64)
        if stream.centred:
            w = w - w.mean(axis=side.axis, keepdims=True)
        out[side.tensor] = rotate_side(w, side.axis, basis).astype(value.dtype)
    norms = {n.node: n for n in stream.norms}
    added: dict[str, np.ndarray] = {}
    for r in stream.readers:
        n = norms[r.norm]
        gamma = const(n.scale).astype(np.float64) if n.scale else np.ones(stream.width)
        beta = const(n.bias).astype(np.float64) if n.bias else np.zeros(stream.width)
        value = out.get(r.weight.tensor, const(r.weight.tensor))  # a reader that writes the stream too: rotated already
        w, shift = _reader(value.astype(np.float64), r, gamma, beta, basis)
        out[r.weight.tensor] = w.astype(value.dtype)
        if r.bias:
            b = out.get(r.bias, const(r.bias))
            out[r.bias] = (b.astype(np.float64) + shift.reshape(b.shape)).astype(b.dtype)
        elif np.any(shift != 0.0):
            added[r.node] = shift.astype(value.dtype)
    for side in stream.reshapes:
        target = const(side.tensor).copy()
        target[side.axis] = basis.shape[1]
        out[side.tensor] = target
    return out, added


def point_reports(stream: Stream, moments: Mapping[str, np.ndarray], basis: np.ndarray, energy: float) -> tuple[PointReport, ...]:
    """Per norm input: its effective dimension at ``energy`` and the fraction of its energy in ``basis``."""
    out = []
    for n in stream.norms:
        m = moments[n.input]
        vals, _ = pca(m)
        total = float(np.trace(m)) or 1.0
        out.append(PointReport(n.node, n.input, energy_rank(vals, energy), float(np.trace(basis.T @ m @ basis)) / total))
    return tuple(out)


def global_moment(stream: Stream, moments: Mapping[str, np.ndarray]) -> np.ndarray:
    """The mean over stream points of their trace-normalised second moments (each point weighs the same)."""
    acc = np.zeros((stream.width, stream.width))
    for n in stream.norms:
        m = moments[n.input]
        acc += m / (float(np.trace(m)) or 1.0)
    return acc / max(1, len(stream.norms))


def side_names(sides: tuple[Side, ...]) -> tuple[str, ...]:
    return tuple(s.tensor for s in sides)


def add_moment(sums: dict[str, np.ndarray], name: str, x: np.ndarray, centre: bool) -> None:
    """Add the second moment (D x D, float64) of the unit-length tokens of ``x`` (hidden axis last) to ``sums[name]``.

    ``centre``: subtract each token's mean first (what a LayerNorm sees, and the stream once its writers are mean-free).
    """
    t = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    if centre:
        t = t - t.mean(axis=1, keepdims=True)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    sums[name] = sums.get(name, 0.0) + t.T @ t


def measured_report(stream: Stream, vals: np.ndarray, vecs: np.ndarray, kept: int, moments: Mapping[str, np.ndarray],
                    options: HiddenOptions, before: np.ndarray, after: np.ndarray, check: Calibration,
                    full_error: float) -> HiddenReport:
    """The report of one slice: the spectrum's figures and the output error of ``after`` (the sliced model's first
    output on ``check``) against ``before`` (the input model's).

    Raises:
        ValidationError: When the sliced model's outputs are not finite.
    """
    diff = np.abs(after.astype(np.float64) - before)
    if not np.all(np.isfinite(diff)):
        raise ValidationError("the sliced model's outputs are not finite: keep more of the hidden size")
    scale = float(np.max(np.abs(before))) or 1.0
    agreement = acc_before = acc_after = None
    if before.ndim == 2 and before.shape[1] > 1:
        pb, pa = before.argmax(1), after.argmax(1)
        agreement = float(np.mean(pb == pa))
        if check.labels is not None:
            acc_before, acc_after = float(np.mean(pb == check.labels)), float(np.mean(pa == check.labels))
    energy = options.energy if options.keep == 0 else 0.99
    total = float(np.clip(vals, 0, None).sum()) or 1.0
    return HiddenReport(
        width=stream.width, kept=kept, energy=energy, effective=energy_rank(vals, energy),
        discarded_energy=float(np.clip(vals[kept:], 0, None).sum()) / total,
        points=point_reports(stream, moments, vecs[:, :kept], energy),
        norms=len(stream.norms), writers=len(stream.writers), readers=len(stream.readers),
        max_abs_error=float(diff.max()), relative_error=float(diff.max()) / scale, agreement=agreement,
        accuracy_before=acc_before, accuracy_after=acc_after, measured_on=f"{len(check)} samples of {check.source}",
        full_rotation_error=full_error)


def slice_measured(stream: Stream, moments: Mapping[str, np.ndarray], original: M, data: Calibration,
                   eval_data: Calibration | None, options: HiddenOptions, rotate: Callable[[np.ndarray], M],
                   outputs: Callable[[M, Calibration], np.ndarray], what: str,
                   say: Callable[[str], None]) -> tuple[M, HiddenReport]:
    """The steps every backend shares once the stream's moments are measured: the PCA basis and the kept width, the
    full-width rotation checked against ``original`` on the eval data, the slice, and its report.

    ``rotate(basis)``: the backend's model rotated into ``basis`` (D x k); ``outputs(model, data)``: its first output
    on ``data``; ``what``: how messages name the model ("model", "module").

    Raises:
        ValidationError: The full-width rotation does not reproduce ``original``, or the slice's outputs are not finite.
    """
    from graphprune.execution.exactness import compare_outputs

    vals, vecs = pca(global_moment(stream, moments))
    kept = kept_width(stream.width, vals, options)
    check = (eval_data if eval_data is not None else data).subset(options.eval_samples, options.seed + 1)
    before = outputs(original, check)
    say("checking the full-width rotation reproduces the model")
    full = rotate(vecs)
    sliced = rotate(vecs[:, :kept]) if kept < stream.width else full
    full_error = compare_outputs([before], [outputs(full, check)], what=f"the full-width rotated {what}",
                                 hint=f"the rotation is not an identity here; the hidden pass cannot run on this {what}")
    say(f"slicing the hidden size {stream.width} -> {kept}")
    return sliced, measured_report(stream, vals, vecs, kept, moments, options, before, outputs(sliced, check), check,
                                   full_error)
