"""What to plan: the one options type of every planner, pass and command, and the names it accepts."""
from __future__ import annotations

import dataclasses

from graphprune.errors import BadInputError

__all__ = [
    "ANALYSIS_CRITERIA",
    "CRITERIA_NAMES",
    "EXCESS_RULES",
    "MAGNITUDE_CRITERIA",
    "METHODS",
    "NEEDS_ANALYSIS",
    "OBJECTIVES",
    "TARGETS",
    "PlanOptions",
    "Target",
]

METHODS = ("hierarchical", "uniform", "global")
"""Level-1 allocations: r_g floors and predicted loss per unit saved, the same fraction everywhere, or one global ranking."""
ANALYSIS_CRITERIA = ("effective", "cholesky", "taylor")
"""Level-2 rules that read the effective filter analysis."""
MAGNITUDE_CRITERIA = ("l1", "l2", "random")
"""Level-2 rules that read the weights only."""
CRITERIA_NAMES = (*ANALYSIS_CRITERIA, *MAGNITUDE_CRITERIA)
NEEDS_ANALYSIS = frozenset(ANALYSIS_CRITERIA)
OBJECTIVES = ("auto", "latency", "macs")
"""Level 1's unit of saving: predicted ms (needs a latency model), the target's own unit, or latency when a model is given."""
EXCESS_RULES = ("measured", "loss", "per_unit")
"""How a hierarchical plan past the floors (``allow_over_limit``) removes the excess: by predicted loss alone (the
calibrated limit's budget family), by predicted loss per unit saved, or both planned and the one scoring better on
held-out calibration samples kept (``measured``: the pipeline measures; a planner on its own takes ``loss``). Neither
rule wins everywhere: on the Fashion-MNIST ViT at half the parameters by loss 0.815 against 0.801 per unit, on the
character LM per unit 9.80 perplexity against 14.28 by loss (benchmarks/README.md)."""
TARGETS = ("ratio", "macs", "params", "latency")
"""``ratio``: fraction of channels to remove; the others: fraction of the original to keep."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One planning target: its kind (see :data:`TARGETS`) and value."""

    kind: str
    value: float

    def check(self) -> None:
        """Raises BadInputError for an unknown kind or a value outside (0, 1) (a ratio may be 0)."""
        if self.kind not in TARGETS:
            raise BadInputError(f"unknown target '{self.kind}' (choose from {', '.join(TARGETS)})")
        if not 0.0 < self.value < 1.0 and not (self.kind == "ratio" and self.value == 0.0):
            raise BadInputError(f"--{self.kind} must be in (0, 1), got {self.value}")


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """Method, criterion and at most one target (none: every group keeps its effective filters).

    Attributes:
        method: One of :data:`METHODS`.
        criterion: One of :data:`CRITERIA_NAMES`.
        ratio, macs, params, latency: The target; at most one is set.
        round_to: Keep channel counts multiples of this (1: with a latency model, counts snap to its fast ones).
        objective: Level 1's unit of saving, one of :data:`OBJECTIVES`: ``auto`` prices by predicted ms when the
            workspace has a latency model, else by the target's own unit (MACs, parameters, channels).
        allow_over_limit: Allow targets past the estimated maximum compression.
        excess: How the excess past the floors is removed, one of :data:`EXCESS_RULES`.
        seed: Seed of the random criterion.
        latency_runs: Runtime runs per latency measurement (latency targets, and the measured never-slower check of a
            plan priced by a latency model; 0 skips that check).
        plan_file: A saved plan to apply instead of planning (``--plan``); the other options are then unused.
    """

    method: str = "hierarchical"
    criterion: str = "effective"
    ratio: float | None = None
    macs: float | None = None
    params: float | None = None
    latency: float | None = None
    round_to: int = 1
    objective: str = "auto"
    allow_over_limit: bool = False
    excess: str = "measured"
    seed: int = 0
    latency_runs: int = 30
    plan_file: str = ""

    @property
    def target(self) -> Target | None:
        """The one target given, or None."""
        given = [Target(k, float(v)) for k in TARGETS if (v := getattr(self, k)) is not None]
        return given[0] if given else None

    @property
    def needs_analysis(self) -> bool:
        if self.plan_file:
            return False
        return self.method == "hierarchical" or self.criterion in NEEDS_ANALYSIS

    def with_target(self, target: Target | None) -> PlanOptions:
        """A copy with ``target`` in place of the current one."""
        values: dict[str, float | None] = dict.fromkeys(TARGETS)
        if target is not None:
            target.check()
            values[target.kind] = target.value
        return dataclasses.replace(self, ratio=values["ratio"], macs=values["macs"], params=values["params"], latency=values["latency"])

    def check(self) -> None:
        """Raises BadInputError on an unknown method or criterion, two targets, or a value out of range."""
        if self.method not in METHODS:
            raise BadInputError(f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        if self.criterion not in CRITERIA_NAMES:
            raise BadInputError(f"unknown criterion '{self.criterion}' (choose from {', '.join(CRITERIA_NAMES)})")
        if self.excess not in EXCESS_RULES:
            raise BadInputError(f"unknown excess rule '{self.excess}' (choose from {', '.join(EXCESS_RULES)})")
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if self.plan_file and given:
            raise BadInputError(f"a saved plan is applied as it is: do not combine it with a {given[0]} target")
        if len(given) > 1:
            raise BadInputError(f"give one target, not {' and '.join(given)}")
        if self.target is not None:
            self.target.check()
        if self.objective not in OBJECTIVES:
            raise BadInputError(f"unknown objective '{self.objective}' (choose from {', '.join(OBJECTIVES)})")
        if self.round_to < 1:
            raise BadInputError(f"round_to must be at least 1, got {self.round_to}")
        if self.latency_runs < 0 or (self.latency_runs == 0 and self.latency is not None):
            raise BadInputError(f"latency_runs must be at least 1 (0, no measured check, only without a latency target), got {self.latency_runs}")
