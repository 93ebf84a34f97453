"""Fine-tune an ONNX model through the differentiable interpreter and write the weights back."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import torch

from graphprune.execution.interpreter import GraphInterpreter
from graphprune.execution.progress import Progress
from graphprune.execution.training import FitOptions, fit
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import OnnxModel, prepare
from graphprune.ir.onnx import clone_model

__all__ = ["finetune_onnx", "with_constants", "with_weights"]

log = logging.getLogger(__name__)


def with_weights(om: OnnxModel, interp: GraphInterpreter) -> OnnxModel:
    """A copy of ``om`` whose floating-point initializers hold the interpreter's current values."""
    inits = om.model.graph.initializers
    values = {
        name: tensor.detach().cpu().numpy()
        for name, tensor in interp.named_constants().items()
        if tensor.is_floating_point() and name in inits and inits[name].const_value is not None
    }
    return with_constants(om, values)


def with_constants(om: OnnxModel, values: Mapping[str, np.ndarray]) -> OnnxModel:
    """A copy of ``om`` with the named initializers replaced (same dtype)."""
    model = clone_model(om.model)
    for name, arr in values.items():
        value = model.graph.initializers[name]
        dtype = value.const_value.dtype.numpy() if value.const_value is not None else arr.dtype
        value.const_value = ir.tensor(np.asarray(arr).astype(dtype, copy=False), name=name)
    return prepare(model, om.path)


def finetune_onnx(
    om: OnnxModel,
    data: Calibration,
    options: FitOptions,
    teacher: OnnxModel | None = None,
    progress: Progress | None = None,
    device: torch.device | None = None,
) -> OnnxModel:
    """Train ``om``'s weights on ``data`` (labels, else distillation from ``teacher``).

    BatchNormalization nodes use batch statistics while training and keep
    their updated running statistics. The input model is not modified.

    Raises:
        BadInputError: No labels and no teacher.
        UnsupportedOpError: An op has no torch implementation.
    """
    student = GraphInterpreter(om.graph)
    teach = GraphInterpreter(teacher.graph) if teacher is not None and data.labels is None else None
    if teach is not None:
        for p in teach.parameters():
            p.requires_grad_(False)
    fit(student, data, options, teach, progress, device)
    return with_weights(om, student.cpu())


