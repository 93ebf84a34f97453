"""The workspace passes share, the pass base class and the pass registry.

A pass declares the facts it ``requires`` and the facts it ``ensures`` (and
those that must not hold yet, ``forbids``), as onnx-ir and torch.fx passes
state pre- and postconditions; :func:`check_order` validates a pipeline from
those declarations before anything runs. Results are typed workspace fields,
never string-keyed figures.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from rich.console import Console

from graphprune.analysis.effective import Analysis
from graphprune.analysis.latency import LatencyModel, fraction_error
from graphprune.coupling.groups import Coupling, build_groups
from graphprune.errors import BadInputError
from graphprune.execution.measure import Figures
from graphprune.execution.training import Progress
from graphprune.frontends.data import Calibration
from graphprune.io import StagedFiles
from graphprune.ir.graph import Axis
from graphprune.ir.model import PrunableModel
from graphprune.ir.plan import Plan
from graphprune.planning.limit import CalibratedLimit
from graphprune.recovery.rotation import HiddenReport

if TYPE_CHECKING:
    from graphprune.backends.quantize import QuantCheck

__all__ = [
    "FACTS",
    "PASSES",
    "CompensationSummary",
    "Pass",
    "PassResult",
    "Quantized",
    "Validation",
    "Workspace",
    "check_order",
    "register_pass",
]

log = logging.getLogger(__name__)

FACTS = ("data", "analysis", "limit", "latency", "plan", "compensated", "rewritten", "repaired", "rotated", "finetuned", "quantized", "validated", "reported")
"""What passes may require and ensure. ``data`` holds when the workspace has calibration data."""

Status = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class CompensationSummary:
    """What the compensate pass folded: exit edges compensated, consumers skipped (with reasons), its memory bound and
    plan's peak (bytes), its method, and the BatchNormalization nodes whose statistics the sequential refit corrected."""

    edges: int
    skipped: tuple[str, ...]
    memory_bound: int = 0
    memory_peak: int = 0
    method: str = "sequential"
    batch_norms: int = 0


@dataclasses.dataclass(frozen=True)
class Validation:
    """The validate pass's findings: where the models ran, and their figures side by side."""

    runtime: str
    before: Figures
    after: Figures
    batch: int = 1
    """The latency batch of ``latency_batch_ms`` in the figures (1: only batch 1 was measured)."""
    predicted_ms: float | None = None
    """The latency model's prediction for the plan at ``batch`` (when one was used)."""
    fp32_pruned: Figures | None = None
    """After a quantize pass: the pruned model before quantization (``after`` is then the int8 pruned model)."""
    int8_original: Figures | None = None
    """After a quantize pass: the original quantized with the same calibration."""
    predicted_fp32: bool = False
    """The prediction is of the fp32 pruned model (a float latency model before a quantize pass), not of ``after``."""
    predicted_original_ms: float | None = None
    """The latency model's own timing of the original at ``batch``: the scale the prediction was made on."""

    def _measured(self, figures: Figures) -> float | None:
        return figures.latency_batch_ms if self.batch > 1 else figures.latency_ms

    @property
    def prediction_error(self) -> float | None:
        """(predicted - measured) / measured at the latency batch, when both are known."""
        of = self.fp32_pruned if self.predicted_fp32 and self.fp32_pruned is not None else self.after
        measured = self._measured(of)
        if self.predicted_ms is None or not measured:
            return None
        return (self.predicted_ms - measured) / measured

    @property
    def relative_prediction_error(self) -> float | None:
        """The prediction as a fraction of the latency model's original against the measured fraction of the original
        timed beside it, (predicted - measured) / measured: what is left of :attr:`prediction_error` once the
        machine's change of speed between profiling and validating cancels (None when not known)."""
        of = self.fp32_pruned if self.predicted_fp32 and self.fp32_pruned is not None else self.after
        measured, original = self._measured(of), self._measured(self.before)
        if self.predicted_ms is None or not self.predicted_original_ms or not measured or not original:
            return None
        return fraction_error(self.predicted_ms, self.predicted_original_ms, measured, original)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """What the quantize pass made: the fp32 model it quantized, the original quantized alike, and its check."""

    fp32_pruned: PrunableModel
    int8_original: PrunableModel
    check: QuantCheck | None = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _quiet(message: str) -> None:
    log.debug("%s", message)


@dataclasses.dataclass
class Workspace:
    """Everything passes read and write.

    Attributes:
        original: The model as loaded (never modified).
        model: The current model.
        data: Calibration / training data.
        eval_data: Labelled data for accuracy figures.
        held_out: Data the model was not trained on, which the limit (and the excess rule) score on; None: the
            calibration samples the analysis and compensation do not read.
        coupling: Groups of ``original``.
        analysis: Effective filter analysis of ``original``.
        limit: The calibrated limit (the limit pass): measured curve, limit and per-group floors.
        latency: Latency model of ``original`` on its runtime (the profile pass), an input to planning.
        plan: The plan applied (or to apply); ``target`` says what it aimed at.
        kept: Kept elements of the applied plan on the original's axes.
        exact_max_abs_error: Max abs error of the rewrite against the masked model (when verified).
        rewrite_pair: The rewrite's source and its result, as rewritten (before repair and fine-tuning change weights).
        quantized: What the quantize pass made (``model`` is then the int8 pruned model).
        compensation, repair, finetune: What the recovery passes did (``finetune``: the held-out check's line).
        hidden: What the hidden pass did (rotation and slicing of the hidden size) and measured.
        validation: Figures of the original and the current model.
        source, output: The model file read, and where the model will be written (reports go beside it).
        pipeline_name, pass_names: The pipeline being run (for reports).
        staged: Staged output files (moved in place with the model once it validates).
        reports: Report files written.
        status, progress, console: Progress sinks (stage lines, fine-tuning steps, tables).
    """

    original: PrunableModel
    model: PrunableModel
    data: Calibration | None = None
    eval_data: Calibration | None = None
    held_out: Calibration | None = None
    coupling: Coupling | None = None
    analysis: Analysis | None = None
    limit: CalibratedLimit | None = None
    latency: LatencyModel | None = None
    plan: Plan | None = None
    target: str | None = None
    kept: Mapping[Axis, np.ndarray] | None = None
    exact_max_abs_error: float | None = None
    rewrite_pair: tuple[PrunableModel, PrunableModel] | None = None
    quantized: Quantized | None = None
    compensation: CompensationSummary | None = None
    repair: str | None = None
    finetune: str | None = None
    hidden: HiddenReport | None = None
    validation: Validation | None = None
    source: Path | None = None
    output: Path | None = None
    pipeline_name: str = ""
    pass_names: tuple[str, ...] = ()
    staged: StagedFiles | None = None
    reports: tuple[Path, ...] = ()
    status: Status = _quiet
    progress: Progress | None = None
    console: Console | None = None

    def groups(self) -> Coupling:
        """The original's coupling groups (built once)."""
        if self.coupling is None:
            self.coupling = build_groups(self.original.graph)
        return self.coupling

    def facts(self) -> frozenset[str]:
        """The facts that hold now (for passes run one by one)."""
        held = {"data"} if self.data is not None else set()
        for fact, value in (("analysis", self.analysis), ("limit", self.limit), ("latency", self.latency), ("plan", self.plan), ("rewritten", self.kept),
                            ("compensated", self.compensation), ("quantized", self.quantized), ("rotated", self.hidden), ("validated", self.validation)):
            if value is not None:
                held.add(fact)
        return frozenset(held)


@dataclasses.dataclass(frozen=True)
class PassResult:
    """The workspace after a pass, and whether the pass changed the model."""

    workspace: Workspace
    modified: bool


class Pass:
    """Base: subclasses set ``name``, ``Options``, their facts, and implement ``run``.

    ``requires``/``ensures``/``forbids`` are class-level defaults; a pass whose
    needs depend on its options overrides :meth:`required`.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[Any]] = type(None)
    requires: ClassVar[frozenset[str]] = frozenset()
    ensures: ClassVar[frozenset[str]] = frozenset()
    forbids: ClassVar[frozenset[str]] = frozenset()
    mutates: ClassVar[bool] = False
    """Whether the pass may change the model (analysis, planning, validation and reporting do not)."""

    def __init__(self, options: Any | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def required(self) -> frozenset[str]:
        """The facts this pass needs before it runs, with its options."""
        return self.requires

    def __call__(self, ws: Workspace) -> PassResult:
        missing = self.required() - ws.facts()
        if missing:
            raise BadInputError(f"the {self.name} pass needs {_providers(missing)} before it")
        return self.run(ws)

    def run(self, ws: Workspace) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipelines by its ``name``.

    Raises:
        ValueError: A name registered twice, or a fact outside :data:`FACTS`.
    """
    if cls.name in PASSES:
        raise ValueError(f"pass '{cls.name}' registered twice")
    unknown = (cls.requires | cls.ensures | cls.forbids) - set(FACTS)
    if unknown:
        raise ValueError(f"pass '{cls.name}' declares unknown facts {sorted(unknown)}")
    PASSES[cls.name] = cls
    return cls


def _providers(facts: frozenset[str]) -> str:
    """'an analyze pass and a plan pass': the registered passes that ensure ``facts``."""
    words = []
    for fact in sorted(facts, key=FACTS.index):
        if fact == "data":
            words.append("calibration data (--data)")
            continue
        names = [name for name, cls in PASSES.items() if fact in cls.ensures]
        name = names[0] if names else fact
        words.append(f"{'an' if name[0] in 'aeiou' else 'a'} {name} pass")
    return " and ".join(words)


def check_order(passes: Sequence[Pass], where: str, has_data: bool | None = None) -> None:
    """Check every pass finds the facts it requires and none it forbids, from the declarations alone.

    ``has_data`` None: data is not known yet (checked when the pass runs).

    Raises:
        BadInputError: On the first pass out of order.
    """
    held: set[str] = {"data"} if has_data in (None, True) else set()
    for p in passes:
        missing = p.required() - held
        if missing:
            raise BadInputError(f"{where}: the {p.name} pass needs {_providers(frozenset(missing))} before it")
        clash = p.forbids & held
        if clash:
            raise BadInputError(f"{where}: the {p.name} pass must come before {_providers(frozenset(clash))}")
        held |= p.ensures
