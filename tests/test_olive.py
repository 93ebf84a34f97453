"""graphprune inside Olive: the pass's options as a pipeline (always), and a real Olive workflow (with olive-ai).

The workflow: GraphPrune -> Olive's OnnxStaticQuantization (QDQ int8) -> Olive's evaluator (accuracy, latency).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphprune import models
from graphprune.errors import BadInputError
from graphprune.pipeline.olive_options import pipeline_from_options


def test_options_become_the_pipeline():
    p = pipeline_from_options({"data": "cal.npz", "target": {"macs": 0.5}, "finetune": {"epochs": 0.5}, "repair": False})
    assert p.names == ("analyze", "plan", "compensate", "rewrite", "finetune", "validate", "report")
    plan = p.passes[1].options
    assert plan.method == "hierarchical" and plan.criterion == "effective" and plan.macs == 0.5
    assert p.passes[4].options.epochs == 0.5
    q = pipeline_from_options({"method": "uniform", "plan": {"criterion": "l1"}, "compensation": False, "repair": False,
                               "finetune": False})
    assert q.names == ("plan", "rewrite", "validate", "report")


@pytest.mark.parametrize(
    "options,message",
    [
        ({"data": "x.npz", "speed": 2}, "unknown option(s) speed"),
        ({"data": "x.npz", "method": "best"}, "method must be one of"),
        ({"data": "x.npz", "target": {"flops": 0.5}}, "target takes one of"),
        ({"data": "x.npz", "target": {"macs": 1.5}}, "must be in (0, 1)"),
        ({"data": "x.npz", "finetune": {"epochs": "one"}}, "parameter 'epochs' must be float"),
        ({"data": "x.npz", "analyze": {"epsilon": 0.1}}, "has no parameter 'epsilon'"),
        ({"target": {"macs": 0.5}}, "'data' is required"),
    ],
)
def test_bad_options_are_refused_like_pipelines(options, message):
    with pytest.raises(BadInputError) as info:
        pipeline_from_options(options)
    assert message in str(info.value)


def _workflow(tmp: Path, src: Path, npz: Path, prune: dict) -> dict:
    script = tmp / "olive_data.py"
    script.write_text("import graphprune.pipeline.olive  # noqa: F401  (registers the graphprune_npz dataset)\n")
    data = {"name": "cal", "user_script": str(script),
            "load_dataset_config": {"type": "graphprune_npz", "params": {"data_path": str(npz)}},
            "dataloader_config": {"batch_size": 16},
            "post_process_data_config": {"type": "text_classification_post_process"}}  # argmax over the class axis
    metrics = [{"name": "accuracy", "type": "accuracy", "data_config": "cal",
                "sub_types": [{"name": "accuracy_score", "priority": 1, "metric_config": {"task": "multiclass", "num_classes": 10}}]},
               {"name": "latency", "type": "latency", "data_config": "cal", "sub_types": [{"name": "avg", "priority": 2}]}]
    return {
        "input_model": {"type": "ONNXModel", "model_path": str(src)},
        "systems": {"local": {"type": "LocalSystem", "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": [data],
        "evaluators": {"common": {"metrics": metrics}},
        "passes": {"prune": {"type": "GraphPrune", **prune},
                   "quantize": {"type": "OnnxStaticQuantization", "data_config": "cal", "quant_format": "QDQ",
                                "activation_type": "uint8", "weight_type": "int8", "per_channel": True,
                                "reduce_range": True}},  # graphprune's quantize defaults: U8S8, 7-bit weights
        "evaluator": "common", "evaluate_input_model": True, "host": "local", "target": "local",
        "output_dir": str(tmp / "out"), "cache_dir": str(tmp / "cache"), "log_severity_level": 3,
    }


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("olive") is None, reason="olive-ai is not installed (pip install 'graphprune[olive]')")
def test_olive_workflow_prune_quantize_evaluate(tmp_path):
    """A real Olive workflow on the reference VGG: smaller, valid, quantized output; accuracy and latency reported."""
    from olive.workflows import run

    from graphprune.pipeline.olive import write_package_config

    src, npz = tmp_path / "vgg.onnx", tmp_path / "cal.npz"
    models.export_onnx(models.build("vgg"), src)
    rng = np.random.default_rng(0)
    np.savez(npz, input=rng.standard_normal((64, *models.INPUT_SHAPE)).astype(np.float32), labels=rng.integers(0, 10, 64))
    package = write_package_config(tmp_path / "package.json")
    prune = {"method": "uniform", "plan": {"criterion": "l1"}, "target": {"macs": 0.5}, "data": str(npz), "finetune": False,
             "validation": {"latency_runs": 3}}
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match="target takes one of"):  # checked before the pass runs, and not swallowed by Olive
        run(_workflow(tmp_path / "bad", src, npz, {**prune, "target": {"flops": 0.5}}), package_config=str(package))
    assert not list((tmp_path / "bad").rglob("*.onnx"))
    output = run(_workflow(tmp_path, src, npz, prune), package_config=str(package))
    best = output.get_best_candidate()
    assert best is not None
    out = Path(best.model_path)
    model = onnx.load(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    zero_points = {i.name: i.data_type for i in model.graph.initializer}
    activation_zps = {zero_points[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    assert activation_zps == {onnx.TensorProto.UINT8}  # uint8 activations: what onnxruntime's CPU provider fuses whole
    assert out.stat().st_size < 0.5 * src.stat().st_size
    for metrics in (output.get_input_model_metrics(), best.metrics_value):
        value = {k: v["value"] if isinstance(v, dict) else v for k, v in metrics.items()}
        assert 0.0 <= value["accuracy-accuracy_score"] <= 1.0 and value["latency-avg"] > 0
    reports = list((tmp_path / "cache").rglob("model.report.json"))
    assert reports, "the GraphPrune pass writes graphprune's report beside its model"
    figures = json.loads(reports[0].read_text())["figures"]
    assert figures["after"]["macs"] <= 0.5 * figures["before"]["macs"] and figures["exact_max_abs_error"] < 1e-3
