"""Fine-tuning ONNX models through the interpreter: learning happens, weights are written back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from graphprune import models
from graphprune.errors import BadInputError
from graphprune.execution.interpreter import GraphInterpreter
from graphprune.execution.measure import ort_accuracy
from graphprune.execution.onnx_finetune import finetune_onnx
from graphprune.execution.sessions import make_session
from graphprune.execution.training import FitOptions
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx
from graphprune.ir.onnx import model_bytes


def _task(n: int = 512, seed: int = 0) -> Calibration:
    """Labels given by the sign pattern of a fixed projection: learnable by a small CNN."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *models.INPUT_SHAPE)).astype(np.float32)
    y = (x[:, 0, :14].mean((1, 2)) > 0).astype(np.int64) + 2 * (x[:, 0, :, :14].mean((1, 2)) > 0).astype(np.int64)
    return Calibration((x,), y, "synthetic")


def test_finetune_learns_and_writes_weights_back(exported):
    om = load_onnx(exported("vgg", 17, "keep"))
    data = _task()
    before = ort_accuracy(model_bytes(om.model), data)
    tuned = finetune_onnx(om, data, FitOptions(epochs=6, lr=0.05, batch_size=64))
    after = ort_accuracy(model_bytes(tuned.model), data)
    assert after > before + 0.2, (before, after)
    # onnxruntime on the written model equals the interpreter on the same weights
    x = data.inputs[0][:8]
    session = make_session(model_bytes(tuned.model))
    with torch.no_grad():
        want = GraphInterpreter(tuned.graph).eval()(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(session.run(None, {"input": x})[0], want, rtol=1e-4, atol=1e-5)
    # the input model is untouched
    assert ort_accuracy(model_bytes(om.model), data) == before


def test_distillation_without_labels_moves_toward_the_teacher(exported):
    teacher = load_onnx(exported("resnet20", 17, "keep"))
    student = load_onnx(exported("resnet20", 13, "fold"))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, *models.INPUT_SHAPE)).astype(np.float32)
    # perturb the student so it disagrees with the teacher
    for name, value in student.model.graph.initializers.items():
        arr = value.const_value.numpy()
        if arr.dtype == np.float32 and arr.ndim == 4:
            import onnx_ir as ir

            value.const_value = ir.tensor((arr * (1 + 0.3 * rng.standard_normal(arr.shape))).astype(np.float32), name=name)
    from graphprune.frontends.onnx import prepare

    student = prepare(student.model)

    def gap(om) -> float:
        s, t = make_session(model_bytes(om.model)), make_session(model_bytes(teacher.model))
        return float(np.abs(s.run(None, {"input": x})[0] - t.run(None, {"input": x})[0]).mean())

    before = gap(student)
    tuned = finetune_onnx(student, Calibration((x,), None, "unlabelled"), FitOptions(epochs=3, lr=0.01, batch_size=64), teacher=teacher)
    assert gap(tuned) < 0.7 * before


def test_no_labels_no_teacher_is_an_error(exported):
    om = load_onnx(exported("vgg"))
    x = np.zeros((8, *models.INPUT_SHAPE), np.float32)
    with pytest.raises(BadInputError, match="labels or the unpruned model"):
        finetune_onnx(om, Calibration((x,), None, "x"), FitOptions())
