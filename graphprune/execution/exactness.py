"""The one exactness comparison: a pruned model's outputs against the masked original's, on any runtime.

Used by the ONNX check (:func:`graphprune.execution.validate.validate_pruned`) and the
torch checks (:func:`graphprune.backends.torch_module.verify_module`,
:func:`graphprune.backends.exported_program.verify_program`).

Example:
    >>> import numpy as np
    >>> compare_outputs([np.ones(3)], [np.ones(3) + 1e-6], ["y"]) < 1e-5
    True
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from graphprune.errors import ValidationError

__all__ = ["ATOL", "RTOL", "compare_outputs"]

log = logging.getLogger(__name__)

RTOL = 1e-3
"""Allowed error per unit of an output's largest magnitude."""
ATOL = 1e-4
"""Allowed error of an output whose values are all near zero."""


def _as_array(x: Any) -> np.ndarray:
    """A numpy float64 copy of an array or a torch tensor (bfloat16 included) without importing torch."""
    if hasattr(x, "detach"):  # a torch tensor
        return x.detach().cpu().double().numpy()
    return np.asarray(x).astype(np.float64)


def compare_outputs(
    expected: Sequence[Any],
    got: Sequence[Any] | Any,
    names: Sequence[str] | None = None,
    *,
    what: str = "the pruned model",
    hint: str = "pruning was not exact",
    rtol: float = RTOL,
    atol: float = ATOL,
) -> float:
    """Largest absolute difference between ``got`` and ``expected``, checked output by output.

    Tolerance policy: output ``i`` matches when it has the expected shape and
    ``max |got_i - expected_i| <= atol + rtol * max |expected_i|`` (the error is
    judged against the output's scale, not element by element: removed channels
    change the order and number of terms every value sums, so each element
    carries rounding of the size of its largest neighbours). A NaN or infinite
    difference never matches.

    Args:
        expected: Outputs of the masked original (numpy arrays or torch tensors).
        got: Outputs of the pruned model: a sequence like ``expected``, or one array or tensor.
        names: Output names for messages (default: positions).
        what: What produced ``got``, for messages.
        hint: What to do next, ending every message.
        rtol: Tolerance per unit of scale (default :data:`RTOL`).
        atol: Absolute tolerance (default :data:`ATOL`).

    Returns:
        The largest absolute difference over all outputs.

    Raises:
        ValidationError: When a shape differs or a difference exceeds the tolerance.
    """
    got_seq = tuple(got) if isinstance(got, (tuple, list)) else (got,)
    labels = list(names) if names is not None else [str(i) for i in range(len(expected))]
    worst = 0.0
    for name, want_x, got_x in zip(labels, expected, got_seq):
        want, have = _as_array(want_x), _as_array(got_x)
        if want.shape != have.shape:
            raise ValidationError(f"{what}: output '{name}' has shape {have.shape}, expected {want.shape}: {hint}")
        if want.size == 0:
            continue
        diff = float(np.max(np.abs(want - have)))
        scale = float(np.max(np.abs(want)))
        worst = max(worst, diff)
        if not np.isfinite(diff) or diff > atol + rtol * scale:
            raise ValidationError(
                f"{what}: output '{name}' differs from the masked original by {diff:.3g} (scale {scale:.3g}): {hint}"
            )
    log.debug("%s matches the masked original (max abs error %.3g)", what, worst)
    return worst
