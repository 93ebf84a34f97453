"""The model protocol the passes work through: one ONNX model, ``nn.Module`` or ExportedProgram.

Every pass reads a model's :class:`~graphprune.ir.graph.ChannelGraph` (the
format-agnostic view) and changes the model only through these methods, so
one pipeline serves every format. Values are keyed by graph tensor names.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from graphprune.ir.graph import ChannelGraph
from graphprune.ir.plan import Plan

if TYPE_CHECKING:  # the stages that use the protocol, for annotations only
    from graphprune.analysis.latency import LatencyModel
    from graphprune.coupling.groups import Coupling
    from graphprune.execution.latency_tables import LatencyOptions
    from graphprune.execution.training import FitOptions, Progress
    from graphprune.frontends.data import Calibration

__all__ = ["ACTIVATION_TYPES", "FORMATS", "Int8Form", "PrunableModel"]

FORMATS = ("onnx", "module", "program")
"""What :attr:`PrunableModel.kind` may be."""

ACTIVATION_TYPES = ("uint8", "int8")
"""Activation integer types (weights are always int8). ``uint8`` (U8S8) is what onnxruntime's CPU provider fuses
whole on x86-64: with ``int8`` activations (S8S8) it leaves every convolution next to a residual Add in float,
behind DequantizeLinear, with layout Transposes around it (MobileNetV2 at 28x28: 8 of 22 convolutions and
16 Transposes; U8S8 ran that int8 model 1.40x faster at batch 32 and 1.46x at batch 1, benchmarks/README.md)."""


@dataclasses.dataclass(frozen=True)
class Int8Form:
    """The int8 form a model is timed in: activation type (``uint8`` / ``int8``) and 7-bit weights (``reduce_range``),
    as the quantize pass writes it (its options of the same names; these are its defaults)."""

    activations: str = "uint8"
    reduce_range: bool = True

    def describe(self) -> str:
        """'uint8 activations, 7-bit weights'."""
        return f"{self.activations} activations, {7 if self.reduce_range else 8}-bit weights"

    @classmethod
    def of_setting(cls, setting: Mapping[str, object]) -> Int8Form | None:
        """The form a latency model's setting was timed in (None: float; a setting that names no form: the defaults)."""
        form = setting.get("int8")
        if isinstance(form, Mapping):
            return cls(str(form["activations"]), bool(form["reduce_range"]))
        return cls() if setting.get("quantized") else None


class PrunableModel(Protocol):
    """A model behind the passes. Methods never modify ``self``: they return new models."""

    @property
    def kind(self) -> str:
        """One of :data:`FORMATS`."""
        ...

    @property
    def graph(self) -> ChannelGraph:
        """The channel graph of the model as it is now."""
        ...

    @property
    def runtime(self) -> str:
        """Where :meth:`run_check`, :meth:`latency_ms` and :meth:`accuracy` run (an onnxruntime provider, torch)."""
        ...

    def pruned(self, coupling: Coupling, plan: Plan) -> PrunableModel:
        """The model with ``plan`` applied (``coupling`` is that of this model's graph)."""
        ...

    def with_values(self, values: Mapping[str, np.ndarray]) -> PrunableModel:
        """The model with the named constants (weights, biases, BN statistics) replaced."""
        ...

    def exactness(self, source: PrunableModel, coupling: Coupling, plan: Plan) -> float:
        """Max abs output error of ``self`` (``source`` pruned by ``plan``) against ``source`` with the removed channels zeroed.

        Raises:
            ValidationError: When they differ.
        """
        ...

    def finetuned(self, data: Calibration, options: FitOptions, teacher: PrunableModel | None,
                  progress: Progress | None) -> PrunableModel:
        """The model trained on ``data`` (labels, else distillation from ``teacher``)."""
        ...

    def run_check(self, original: PrunableModel) -> None:
        """Check the model runs and keeps ``original``'s inputs and outputs.

        Raises:
            ValidationError: When it does not.
        """
        ...

    def latency_ms(self, batch: int, runs: int, threads: int = 0, quantized: Int8Form | None = None) -> float:
        """Median latency of one forward pass at ``batch`` on :attr:`runtime` (``threads``: intra-op threads, 0: the runtime's
        default; ``quantized``: of the model quantized to int8 QDQ in that form first, where the runtime quantizes).

        Raises:
            BadInputError: ``quantized`` on a runtime that does not quantize.
        """
        ...

    def runner(self, batch: int, threads: int = 0, quantized: Int8Form | None = None) -> AbstractContextManager[Callable[[], object]]:
        """The model ready to run on :attr:`runtime` (a session, while the context is open), yielding one forward pass
        at ``batch`` on sample inputs: a :data:`graphprune.execution.timing.Runner` for side-by-side timings.

        Raises:
            BadInputError: ``quantized`` on a runtime that does not quantize.
        """
        ...

    def latency_model(self, coupling: Coupling, options: LatencyOptions, floors: Mapping[int, int]) -> LatencyModel | None:
        """Per-op latency tables of this model on its runtime (cached on disk), or None where the runtime has none.

        Raises:
            BadInputError: An unavailable execution provider or a floor outside [1, C].
        """
        ...

    def accuracy(self, data: Calibration) -> float:
        """Top-1 accuracy on labelled ``data``."""
        ...

    def save(self, path: Path, original: PrunableModel) -> None:
        """Write the model to ``path`` (its suffix picks the format where there is a choice) and check the file.

        Raises:
            BadInputError: A suffix this model cannot be written as.
            ValidationError: The written file fails its checks.
        """
        ...
