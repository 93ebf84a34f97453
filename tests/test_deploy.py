"""Prune, then quantize: the quantize pass, the deploy preset's four columns, and the quantization check."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from graphprune import models
from graphprune.cli import main
from graphprune.errors import BadInputError, ValidationError
from graphprune.ir.model import Int8Form
from graphprune.pipeline.config import load_pipeline, parse_pipeline
from graphprune.pipeline.passes import ProfileOptions

pytest.importorskip("onnxruntime.quantization")

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("fp32_original", "fp32_pruned", "int8_original", "int8_pruned")


def _npz(path: Path, n: int = 96) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.standard_normal((n, *models.INPUT_SHAPE)).astype(np.float32), labels=rng.integers(0, 10, n))
    return path


def test_deploy_preset_order():
    p = load_pipeline("deploy")
    assert p.names == ("analyze", "limit", "profile", "plan", "compensate", "rewrite", "repair", "finetune", "quantize", "validate",
                       "report")


def _profile(overrides: list[str]) -> ProfileOptions:
    return next(p for p in load_pipeline("deploy", overrides).passes if p.name == "profile").options


def test_the_profile_times_the_int8_form_the_quantize_pass_writes():
    assert (_profile([]).activations, _profile([]).reduce_range) == ("uint8", True)
    shipped = _profile(["quantize.activations=int8", "quantize.reduce_range=false"])
    assert (shipped.activations, shipped.reduce_range) == ("int8", False)
    assert shipped.latency_options().int8 == Int8Form("int8", False)
    with pytest.raises(BadInputError, match=r"leave profile\.activations unset"):
        _profile(["profile.activations=int8"])
    assert _profile(["profile.activations=int8", "quantize.activations=int8"]).activations == "int8"


@pytest.mark.parametrize(
    "data,message",
    [
        ({"pass": [{"name": "quantize"}, {"name": "finetune"}]}, "must come before a quantize pass"),
        ({"pass": [{"name": "quantize", "calibration": "kl"}]}, "calibration must be one of"),
        ({"pass": [{"name": "quantize", "tolerance_steps": -1.0}]}, "tolerance_steps must be >= 0"),
        ({"pass": [{"name": "quantize", "activations": "int4"}]}, "activations must be one of"),
        ({"pass": [{"name": "validate"}, {"name": "quantize"}]}, "must come before a validate pass"),
    ],
)
def test_bad_quantize_pipelines_are_refused(data, message):
    with pytest.raises(BadInputError) as info:
        parse_pipeline(data)
    assert message in str(info.value)


@pytest.mark.slow
def test_run_deploy_end_to_end(exported, tmp_path, capsys):
    data = _npz(tmp_path / "cal.npz")
    out = tmp_path / "small.onnx"
    args = ["run", "deploy", "--model", str(exported("resnet20")), "--data", str(data), "--eval-data", str(data), "-o", str(out),
            "--set", "analyze.samples=64", "--set", "plan.macs=0.6", "--set", "finetune.epochs=0.2", "--set", "quantize.samples=32",
            "--set", "validate.latency_runs=2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "fp32 and int8, original and pruned" in text and "int8 pruned vs masked int8 original" in text
    assert "at batch 32, int8 QDQ" in text  # the plan is priced and checked on the int8 model, at both batches
    meta = json.loads((tmp_path / "small.report.json").read_text())["plan_meta"]
    assert set(meta["measured_at"]) == {"1", "32"}
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    assert any(t.data_type == TensorProto.INT8 and len(t.dims) == 4 for t in model.graph.initializer)
    deploy = json.loads((tmp_path / "small.report.json").read_text())["figures"]["deploy"]
    cols = [deploy[c] for c in COLUMNS]
    for c in cols:
        assert c["accuracy"] is not None and c["latency_ms"] > 0 and c["latency_batch_ms"] > 0 and c["size_bytes"] > 0
    fp32, fp32_p, int8, int8_p = (c["size_bytes"] for c in cols)
    assert fp32_p < fp32 and int8_p < int8 < fp32 and int8_p < fp32_p
    assert cols[1]["macs"] <= 0.6 * cols[0]["macs"] and cols[3]["macs"] == cols[1]["macs"]
    check = deploy["check"]
    # steps are float: the check allows 1e-3 of rounding (2.0000038 steps is two steps)
    assert check["tolerance_steps"] == 2.0 and 0 <= check["max_steps"] <= 2.0 * (1 + 1e-3) and check["output_scales"]["logits"] > 0
    assert deploy["quantization"]["format"] == "QDQ"
    assert (deploy["quantization"]["activations"], deploy["quantization"]["weights"]) == ("uint8", "int8 (7-bit range)")
    assert "int8 pruned" in (tmp_path / "small.report.html").read_text()


def _pruned_pair(exported, tmp_path):
    from graphprune.frontends.onnx import load_onnx
    from graphprune.ir.plan import kept_elements
    from graphprune.pipeline.run import prune_file

    src = exported("vgg")
    result = prune_file(src, tmp_path / "p.onnx", ratio=0.5, latency_runs=0)
    source = load_onnx(src)
    return source, load_onnx(result.output), kept_elements(result.plan, result.coupling, source.graph)


def test_quantization_check_measures_steps_and_catches_a_wrong_mask(exported, tmp_path):
    from graphprune.backends.quantize import QuantizeOptions, quantization_check
    from graphprune.frontends.data import Calibration

    source, pruned, kept = _pruned_pair(exported, tmp_path)
    x = np.random.default_rng(1).standard_normal((32, *models.INPUT_SHAPE)).astype(np.float32)
    data = Calibration((x,), None, "random")
    check = quantization_check(source, pruned, kept, data, QuantizeOptions(tolerance_steps=2.0))
    assert check.max_steps <= 2.0 * (1 + 1e-3) and check.samples == 32
    assert check.max_abs_error == pytest.approx(check.max_steps * check.output_scales["logits"], rel=1e-6)
    wrong = {a: np.sort((k + 1) % a_size) for a, k in kept.items() for a_size in [source.graph.tensors[a.tensor].size(a.axis)]}
    with pytest.raises(ValidationError, match="quantization steps"):
        quantization_check(source, pruned, wrong, data, QuantizeOptions(tolerance_steps=2.0))


def test_quantize_pass_refuses_a_quantized_model(exported, tmp_path):
    from graphprune.backends.onnx_model import OnnxPrunable
    from graphprune.backends.quantize import QuantizeOptions, quantize_onnx
    from graphprune.frontends.data import Calibration
    from graphprune.frontends.onnx import load_onnx
    from graphprune.pipeline.passes import QuantizePass, Workspace

    om = load_onnx(exported("vgg"))
    data = Calibration((np.zeros((4, *models.INPUT_SHAPE), np.float32),), None, "zeros")
    q = OnnxPrunable(quantize_onnx(om, data, QuantizeOptions(samples=4)))
    with pytest.raises(BadInputError, match="quantized already"):
        QuantizePass(QuantizeOptions())(Workspace(original=q, model=q, data=data))


def _float_convs(model: onnx.ModelProto, tmp_path: Path) -> int:
    """Convolutions onnxruntime's CPU provider leaves in float (not fused into QLinearConv) in a QDQ model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # no hardware-specific layouts
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sum(n.op_type == "Conv" for n in onnx.load(opts.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("activations,fused", [("uint8", True), ("int8", False)])
def test_uint8_activations_fuse_every_convolution_of_a_residual_model(exported, tmp_path, activations, fused):
    """The default (U8S8) fuses ResNet-20's convolutions beside residual Adds into QLinearConv; int8 activations do not."""
    import onnx_ir as ir

    from graphprune.backends.quantize import QuantizeOptions, quantize_onnx
    from graphprune.frontends.data import Calibration
    from graphprune.frontends.onnx import load_onnx

    om = load_onnx(exported("resnet20", bn="fold"))
    x = np.random.default_rng(0).standard_normal((8, *models.INPUT_SHAPE)).astype(np.float32)
    q = quantize_onnx(om, Calibration((x,), None, "random"), QuantizeOptions(samples=8, activations=activations))
    left = _float_convs(ir.to_proto(q.model), tmp_path)
    assert (left == 0) is fused, f"{left} float Conv left with {activations} activations"
