"""Figures of one ONNX model: parameters, MACs, onnxruntime latency, accuracy."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort

from graphprune.analysis.cost import model_cost
from graphprune.execution.sessions import make_session, measure_latency, sample_inputs
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import OnnxModel
from graphprune.ir.onnx import model_session

__all__ = ["Figures", "measure_model", "ort_accuracy"]


@dataclasses.dataclass(frozen=True)
class Figures:
    """What a before/after table shows for one model."""

    params: int
    macs: int
    latency_ms: float | None
    accuracy: float | None
    latency_batch_ms: float | None = None
    """Latency at the validation's latency batch (when it is not 1)."""
    size_bytes: int | None = None
    """Bytes of the model's constants (weights, scales...)."""


def ort_accuracy(session_model: bytes | str | ort.InferenceSession, data: Calibration, batch_size: int = 500) -> float:
    """Top-1 accuracy of a classifier on onnxruntime (a model's bytes, its path, or a session)."""
    session = session_model if isinstance(session_model, ort.InferenceSession) else make_session(session_model)
    names = [i.name for i in session.get_inputs()]
    correct = 0
    for _, inputs, labels in data.batches(batch_size):
        out = session.run(None, dict(zip(names, inputs)))[0]
        correct += int((np.argmax(out, 1) == labels).sum())
    return correct / len(data)


def measure_model(om: OnnxModel, eval_data: Calibration | None, latency_runs: int = 30) -> Figures:
    """Parameters and MACs (cost model), batch-1 latency and accuracy (onnxruntime)."""
    cost = model_cost(om.graph)
    latency, acc = None, None
    with model_session(om.model) as session:
        if latency_runs > 0:
            latency = measure_latency(session, sample_inputs(om.graph, batch=1), runs=latency_runs)
        if eval_data is not None and eval_data.labels is not None:
            acc = ort_accuracy(session, eval_data)
    return Figures(cost.params, cost.macs, latency, acc)
