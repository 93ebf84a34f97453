"""An ONNX model behind the :class:`~graphprune.ir.model.PrunableModel` protocol (onnxruntime runs it)."""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError
from graphprune.execution.sessions import sample_inputs
from graphprune.execution.training import FitOptions, Progress
from graphprune.execution.validate import validate_pruned
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import OnnxModel, load_onnx, prepare
from graphprune.io import save_onnx, uses_external_data
from graphprune.ir.graph import ChannelGraph
from graphprune.ir.model import Int8Form, PrunableModel
from graphprune.ir.plan import Plan, kept_elements

if TYPE_CHECKING:
    from graphprune.analysis.latency import LatencyModel
    from graphprune.execution.latency_tables import LatencyOptions
    from graphprune.execution.validate import ValidationReport
    from graphprune.ir.graph import Axis

__all__ = ["OnnxPrunable", "load_onnx_model"]


def _onnx(model: PrunableModel) -> OnnxModel:
    if not isinstance(model, OnnxPrunable):
        raise BadInputError(f"an ONNX model was expected, got a {model.kind}")
    return model.om


@dataclasses.dataclass(frozen=True)
class OnnxPrunable:
    """An ONNX model (onnx-ir) with its channel graph; external data stays external."""

    om: OnnxModel
    kind: str = "onnx"
    _int8: dict[Int8Form, ir.Model] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def graph(self) -> ChannelGraph:
        return self.om.graph

    @property
    def runtime(self) -> str:
        from graphprune.execution.sessions import providers

        return providers()[0]

    def pruned(self, coupling: Coupling, plan: Plan) -> OnnxPrunable:
        from graphprune.backends.onnx import apply_kept

        model = apply_kept(self.om, kept_elements(plan, coupling, self.om.graph))
        RemoveUnusedNodesPass()(model)
        return OnnxPrunable(prepare(model, self.om.path))

    def with_values(self, values: Mapping[str, np.ndarray]) -> OnnxPrunable:
        from graphprune.execution.onnx_finetune import with_constants

        return OnnxPrunable(with_constants(self.om, values)) if values else self

    def exactness(self, source: PrunableModel, coupling: Coupling, plan: Plan) -> float:
        kept = kept_elements(plan, coupling, source.graph)
        report = self._validate(_onnx(source), kept)
        return float(report.max_abs_error or 0.0)

    def finetuned(self, data: Calibration, options: FitOptions, teacher: PrunableModel | None,
                  progress: Progress | None) -> OnnxPrunable:
        from graphprune.analysis.fisher import default_device
        from graphprune.execution.onnx_finetune import finetune_onnx

        teach = _onnx(teacher) if teacher is not None else None
        return OnnxPrunable(finetune_onnx(self.om, data, options, teacher=teach, progress=progress, device=default_device()))

    def run_check(self, original: PrunableModel) -> None:
        self._validate(_onnx(original), None)

    def latency_ms(self, batch: int, runs: int, threads: int = 0, quantized: Int8Form | None = None) -> float:
        from graphprune.execution.timing import median_ms

        with self.runner(batch, threads, quantized) as run:
            return median_ms(run, runs)

    @contextlib.contextmanager
    def runner(self, batch: int, threads: int = 0, quantized: Int8Form | None = None) -> Iterator[Callable[[], object]]:
        from graphprune.ir.onnx import model_session

        feeds = sample_inputs(self.om.graph, batch=batch)
        with model_session(self.timing_int8(quantized) if quantized else self.om.model, threads=threads) as session:
            yield lambda: session.run(None, feeds)

    def timing_int8(self, form: Int8Form) -> ir.Model:
        """The model quantized in ``form`` once for latency timing at any batch (ranges from batch-1 sample inputs:
        timing depends on the ops and shapes only)."""
        from graphprune.backends.quantize import quantized_for_timing, timing_options

        if form not in self._int8:
            self._int8[form] = quantized_for_timing(self.om.model, sample_inputs(self.om.graph, batch=1), timing_options(form))
        return self._int8[form]

    def latency_model(self, coupling: Coupling, options: LatencyOptions, floors: Mapping[int, int]) -> LatencyModel:
        from graphprune.execution.latency_tables import build_latency_model

        return build_latency_model(self.om, coupling, options, floors)

    def accuracy(self, data: Calibration) -> float:
        from graphprune.execution.measure import ort_accuracy
        from graphprune.ir.onnx import model_session

        with model_session(self.om.model) as session:
            return ort_accuracy(session, data)

    def save(self, path: Path, original: PrunableModel) -> None:
        if path.suffix != ".onnx":
            raise BadInputError(f"output {path}: an ONNX model is written as .onnx")
        from graphprune.backends.onnx import merged_copies

        source = _onnx(original)
        save_onnx(merged_copies(self.om), path, external=uses_external_data(source.model))
        validate_pruned(source, path, sample_inputs(source.graph, batch=2))

    def _validate(self, original: OnnxModel, kept: Mapping[Axis, np.ndarray] | None) -> ValidationReport:
        """Checker, onnxruntime run, signature and (with ``kept``) exactness, from a temporary file."""
        with tempfile.TemporaryDirectory(prefix="graphprune-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            save_onnx(self.om.model, path, external=uses_external_data(original.model))
            return validate_pruned(original, path, sample_inputs(original.graph, batch=2), kept)


def load_onnx_model(path: Path) -> OnnxPrunable:
    """Load an ONNX file (see :func:`graphprune.frontends.onnx.load_onnx`)."""
    return OnnxPrunable(load_onnx(path))
