"""Quantized models end to end: onnxruntime's QDQ (per-channel and per-tensor int8) and QOperator vgg."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from graphprune import models
from graphprune.pipeline.run import prune_file

quantization = pytest.importorskip("onnxruntime.quantization")


class _Reader(quantization.CalibrationDataReader):
    """Four random batches of the model's input."""

    def __init__(self, name: str, shape: list[int]) -> None:
        rng = np.random.default_rng(0)
        self._it = iter([{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _quantized(tmp: Path, fmt: str, per_channel: bool, activations: str = "int8") -> Path:
    src, out = tmp / "vgg.onnx", tmp / f"vgg_{fmt}_{per_channel}_{activations}.onnx"
    models.export_onnx(models.build("vgg"), src)
    inp = onnx.load(str(src)).graph.input[0]
    shape = [d.dim_value or 2 for d in inp.type.tensor_type.shape.dim]
    quantization.quantize_static(str(src), str(out), _Reader(inp.name, shape), quant_format=getattr(quantization.QuantFormat, fmt),
                                 per_channel=per_channel, weight_type=quantization.QuantType.QInt8,
                                 activation_type=getattr(quantization.QuantType, "QUInt8" if activations == "uint8" else "QInt8"))
    return out


def _elements(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _int8(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer if t.data_type == TensorProto.INT8}


@pytest.mark.parametrize("per_channel,activations", [(True, "int8"), (False, "int8"), (True, "uint8")],
                         ids=["per_channel", "per_tensor", "per_channel_uint8"])
def test_qdq_model_prunes_exactly_and_stays_quantized(tmp_path, per_channel, activations):
    src = _quantized(tmp_path, "QDQ", per_channel, activations)
    result = prune_file(src, tmp_path / "out.onnx", ratio=0.5, verify=True, latency_runs=0)
    # bit-identical to the masked original: sliced per-channel scales, unchanged per-tensor activation scales
    assert result.validation.exact is True and result.validation.max_abs_error == 0.0
    assert len(result.plan.groups) == 5
    onnx.checker.check_model(str(result.output), full_check=True)
    before, after = onnx.load(str(src)), onnx.load(str(result.output))
    assert _elements(after) < 0.5 * _elements(before)
    assert _int8(after) == _int8(before) and _int8(after)
    for t in after.graph.initializer:  # per-tensor scales and zero points stay scalars
        if t.name.endswith(("_scale", "_zero_point")) and not t.dims:
            assert any(not b.dims and b.name == t.name for b in before.graph.initializer)
    session = ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 1, 28, 28), np.float32)})
    assert out.shape == (2, 10)


def test_qoperator_model_prunes_to_a_valid_quantized_model(tmp_path):
    """QLinearConv / QGemm prune exactly where no int8 MaxPool is crossed; those groups freeze with the reason."""
    from graphprune.coupling.groups import build_groups
    from graphprune.frontends.onnx import load_onnx

    src = _quantized(tmp_path, "QOperator", True)
    coupling = build_groups(load_onnx(src).graph)
    assert any("MaxPool over quantized" in r for g in coupling.groups for r in g.frozen)
    result = prune_file(src, tmp_path / "out.onnx", ratio=0.5, verify=True, latency_runs=0)
    assert result.plan.groups and result.validation.exact
    onnx.checker.check_model(str(result.output), full_check=True)
    before, after = onnx.load(str(src)), onnx.load(str(result.output))
    assert {n.op_type for n in after.graph.node} >= {"QLinearConv", "QGemm"}
    assert _elements(after) < _elements(before) and _int8(after) == _int8(before)
    session = ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 1, 28, 28), np.float32)})
    assert out.shape == (2, 10)


def test_interpreter_runs_qdq_as_onnxruntime_does_with_a_straight_through_gradient(tmp_path):
    """QuantizeLinear / DequantizeLinear in the interpreter: ORT's unfused QDQ output, and a gradient through them."""
    import torch

    from graphprune.execution.interpreter import GraphInterpreter
    from graphprune.frontends.onnx import load_onnx

    src = _quantized(tmp_path, "QDQ", True)
    x = np.random.default_rng(3).standard_normal((4, *models.INPUT_SHAPE)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q and DQ as separate float ops
    session = ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {session.get_inputs()[0].name: x})
    interpreter = GraphInterpreter(load_onnx(src).graph)
    xt = torch.from_numpy(x).requires_grad_(True)
    (got,) = interpreter(xt)
    # A rounding tie decided differently flips one step and moves the logits by far less than this.
    assert np.abs(got.detach().numpy() - want).max() <= 0.02 * np.abs(want).max()
    got.sum().backward()
    assert xt.grad is not None and torch.count_nonzero(xt.grad) > 0


def test_qdq_model_is_analysed_and_pruned_hierarchically_from_the_cli(tmp_path):
    """With data, the default (hierarchical) path gates every prunable group of a QDQ model and stays exact."""
    import json

    from graphprune.cli import main

    src = _quantized(tmp_path, "QDQ", True)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", input=rng.standard_normal((96, *models.INPUT_SHAPE)).astype(np.float32),
             labels=rng.integers(0, 10, 96))
    out = tmp_path / "out.onnx"
    assert main(["prune", str(src), "-o", str(out), "--macs", "0.6", "--data", str(tmp_path / "cal.npz"), "--samples", "64",
                 "--latency-runs", "3"]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["plan_meta"]["method"] == "hierarchical" and report["analysis"]["skipped"] == {}
    assert len(report["analysis"]["groups"]) == 5  # vgg's five prunable groups, all analysed
    assert report["validation"]["exact"] is True
    assert _int8(onnx.load(str(out))) == _int8(onnx.load(str(src)))
