"""The options of graphprune's Olive pass, as a graphprune pipeline (checked by the same validation).

Olive (``olive-ai``) runs :class:`graphprune.pipeline.olive.GraphPrune` from a
workflow config; its options use the pipeline's own keys:

- ``method``: the plan's method (``hierarchical``, ``uniform``, ``global``);
- ``target``: the plan's target, one of ``{"macs": 0.5}``, ``{"params": ...}``,
  ``{"ratio": ...}``, ``{"latency": ...}`` (empty: the estimated maximum rate);
- ``data`` / ``eval_data``: what ``--data`` / ``--eval-data`` take;
- ``compensation``, ``repair``, ``finetune``: true (the pass with its defaults),
  false (left out), or a table of that pass's options;
- ``analyze``, ``plan``, ``validation``: more options of the analyze, plan and validate passes.

Example:
    >>> pipeline_from_options({"method": "uniform", "plan": {"criterion": "l1"}, "target": {"macs": 0.5},
    ...                        "data": "cal.npz", "finetune": False}).names
    ('plan', 'compensate', 'rewrite', 'repair', 'validate', 'report')
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graphprune.errors import BadInputError
from graphprune.pipeline.config import Pipeline, parse_pipeline
from graphprune.planning.options import METHODS, NEEDS_ANALYSIS, TARGETS

__all__ = ["OPTION_KEYS", "pipeline_from_options"]

OPTION_KEYS = ("method", "target", "data", "eval_data", "compensation", "repair", "finetune", "analyze", "plan", "validation")
"""The Olive pass's options (besides Olive's own)."""

_STEPS = (("compensation", "compensate"), ("repair", "repair"), ("finetune", "finetune"))


def _table(options: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = options.get(key) or {}
    if not isinstance(value, Mapping):
        raise BadInputError(f"graphprune Olive pass: '{key}' must be a table of {key} pass options, got {value!r}")
    if "name" in value:
        raise BadInputError(f"graphprune Olive pass: '{key}' takes pass options, not a pass name")
    return dict(value)


def _step(options: Mapping[str, Any], key: str, default: bool = True) -> dict[str, Any] | None:
    """The options of an optional pass: None when left out."""
    value = options.get(key, default)
    if value is None or value is False:
        return None
    if value is True:
        return {}
    return _table(options, key)


def pipeline_from_options(options: Mapping[str, Any]) -> Pipeline:
    """The graphprune pipeline the Olive pass runs: analyze (when the plan needs it), plan, compensate, rewrite,
    repair, finetune, validate, report (JSON), validated whole by :func:`~graphprune.pipeline.config.parse_pipeline`.

    Raises:
        BadInputError: On an unknown option, a bad value or type, or a missing ``data`` the passes need.
    """
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise BadInputError(f"graphprune Olive pass: unknown option(s) {', '.join(unknown)} (known: {', '.join(OPTION_KEYS)})")
    method = options.get("method", "hierarchical")
    if method not in METHODS:
        raise BadInputError(f"graphprune Olive pass: method must be one of {', '.join(METHODS)}, got {method!r}")
    target = _table(options, "target")
    extra = sorted(set(target) - set(TARGETS))
    if extra or len(target) > 1:
        raise BadInputError(f"graphprune Olive pass: target takes one of {', '.join(TARGETS)} (e.g. {{\"macs\": 0.5}}), got {target}")
    plan = {"name": "plan", "method": method, **({"criterion": "effective"} if method == "hierarchical" else {}),
            **_table(options, "plan"), **target}
    passes: list[dict[str, Any]] = []
    if method == "hierarchical" or plan.get("criterion") in NEEDS_ANALYSIS:
        passes.append({"name": "analyze", **_table(options, "analyze")})
    passes.append(plan)
    for key, name in _STEPS:
        step = _step(options, key)
        if name == "repair":  # the rewrite sits between compensation (before) and repair (after)
            passes.append({"name": "rewrite", "verify": True})
        if step is not None:
            passes.append({"name": name, **step})
    passes += [{"name": "validate", **_table(options, "validation")}, {"name": "report", "json": True, "html": False, "table": False}]
    pipeline = parse_pipeline({"pipeline": {"name": "olive", "description": "graphprune inside an Olive workflow"}, "pass": passes},
                              "graphprune Olive pass")
    needs_data = any("data" in p.required() for p in pipeline.passes)
    if needs_data and not options.get("data"):
        raise BadInputError("graphprune Olive pass: 'data' is required by its passes (e.g. \"fashion-mnist\" or a .npz file)")
    return pipeline
