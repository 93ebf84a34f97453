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


def _tokens(n: int = 256, length: int = 8, vocab: int = 64, seed: int = 0) -> Calibration:
    """Next-token labels of a deterministic sequence (each id follows its predecessor plus one)."""
    start = np.random.default_rng(seed).integers(0, vocab, (n, 1))
    ids = (start + np.arange(length + 1)) % vocab
    return Calibration((ids[:, :-1].astype(np.int64),), ids[:, 1:].astype(np.int64), "synthetic tokens")


def _token_loss(model: torch.nn.Module, data: Calibration) -> float:
    with torch.no_grad():
        logits = model(torch.from_numpy(data.inputs[0]))
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), torch.from_numpy(data.labels).reshape(-1)))


def test_language_model_labels_are_scored_per_token():
    from graphprune.execution.training import fit

    model, data = models.build("gpt2"), _tokens()
    before = _token_loss(model, data)
    fit(model, data, FitOptions(epochs=4, lr=0.1, batch_size=32))
    assert _token_loss(model, data) < before - 1.0


def test_language_model_distillation_uses_the_vocabulary_axis():
    from graphprune.execution.training import fit

    teacher, student, data = models.build("gpt2", seed=0), models.build("gpt2", seed=1), _tokens()
    unlabelled = Calibration(data.inputs, None, "synthetic tokens")

    def gap() -> float:
        with torch.no_grad():
            x = torch.from_numpy(data.inputs[0])
            return float((student(x).softmax(-1) - teacher(x).softmax(-1)).abs().mean())

    before = gap()
    fit(student, unlabelled, FitOptions(epochs=4, lr=0.1, batch_size=32), teacher=teacher)
    assert gap() < 0.5 * before


def _unnormalised_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def test_gradients_are_clipped_and_a_diverging_fine_tune_keeps_the_weights_from_before(caplog):
    from graphprune.execution.training import fit

    data = _task(256)
    net = _unnormalised_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert np.isnan(fit(net, data, FitOptions(epochs=4, lr=1e6, batch_size=32, clip_norm=0)))  # no clipping: it blows up
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert "fine-tuning diverged at step" in caplog.text and "weights from before it are kept" in caplog.text
    clipped = _unnormalised_net()
    loss = fit(clipped, data, FitOptions(epochs=4, lr=0.5, batch_size=32, momentum=0.0, weight_decay=0.0, clip_norm=1e-3))
    step = max(float((a - b).abs().max()) for a, b in zip(clipped.state_dict().values(), before.values()))
    assert np.isfinite(loss) and step <= 4 * 8 * 0.5 * 1e-3 * 1.01  # steps x lr x clip_norm bounds every change
    with pytest.raises(BadInputError, match="clip_norm"):
        FitOptions(clip_norm=-1).check()


def _finetune_pass(om, data: Calibration, held: Calibration | None, **options):
    from graphprune.backends.onnx_model import OnnxPrunable
    from graphprune.pipeline.passes import FineTuneOptions, FineTunePass
    from graphprune.pipeline.workspace import Workspace

    lines: list[str] = []
    ws = Workspace(original=OnnxPrunable(om), model=OnnxPrunable(om), data=data, held_out=held, status=lines.append)
    result = FineTunePass(FineTuneOptions(**options))(ws)
    return result, lines


def test_a_fine_tune_that_hurts_on_held_out_data_is_not_kept(exported):
    """Planted: a model that has learned the task is fine-tuned on scrambled labels; the held-out images (true
    labels) score it lower, so the model from before is kept, and said; keep_better=false keeps the damaged one."""
    om = finetune_onnx(load_onnx(exported("vgg", 17, "keep")), _task(), FitOptions(epochs=6, lr=0.05, batch_size=64))
    held = _task(256, seed=1)
    good = ort_accuracy(model_bytes(om.model), held)
    train = _task(seed=2)
    scrambled = Calibration(train.inputs, np.random.default_rng(0).permutation(train.labels), "scrambled")
    options = {"epochs": 4, "lr": 0.05, "batch_size": 64}
    result, lines = _finetune_pass(om, scrambled, held, **options)
    assert not result.modified and ort_accuracy(model_bytes(result.workspace.model.om.model), held) == good
    assert result.workspace.finetune is not None and "kept the model from before fine-tuning" in result.workspace.finetune
    assert any(line.startswith("fine-tune: held-out accuracy ") for line in lines)
    damaged, _ = _finetune_pass(om, scrambled, held, keep_better=False, **options)
    assert damaged.modified and ort_accuracy(model_bytes(damaged.workspace.model.om.model), held) < good - 0.1


def test_a_fine_tune_that_helps_is_kept_and_none_is_checked_without_held_out_data(exported):
    om = load_onnx(exported("vgg", 17, "keep"))
    held = _task(256, seed=1)
    result, _ = _finetune_pass(om, _task(), held, epochs=4, lr=0.05, batch_size=64)
    assert result.modified and "kept the fine-tuned model" in (result.workspace.finetune or "")
    assert ort_accuracy(model_bytes(result.workspace.model.om.model), held) > ort_accuracy(model_bytes(om.model), held)
    unchecked, lines = _finetune_pass(om, _task(), None, epochs=0.5, lr=0.05, batch_size=64)
    assert unchecked.modified and unchecked.workspace.finetune is None and not any("held-out" in line for line in lines)
    from graphprune.pipeline.config import parse_pipeline

    with pytest.raises(BadInputError, match="finetune holdout must be at least 16"):
        parse_pipeline({"pass": [{"name": "finetune", "holdout": 4}]})
