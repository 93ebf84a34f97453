"""GPU checks (``pytest -m gpu``): the pruned model on the CUDA execution provider, fine-tuning and latency tables on CUDA.

Skipped, with the reason, where onnxruntime has no CUDA provider or torch no CUDA device.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from graphprune import models
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.coupling.groups import build_groups
from graphprune.execution.latency_tables import LatencyOptions, build_latency_model
from graphprune.execution.training import FitOptions
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx
from graphprune.planning.uniform import uniform_plan

CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA_EP, reason="onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a CUDA machine)"),
]


@pytest.fixture
def vgg(exported) -> OnnxPrunable:
    return OnnxPrunable(load_onnx(exported("vgg")))


def test_pruned_model_is_exact_on_cuda(vgg):
    assert vgg.runtime == "CUDAExecutionProvider"
    coupling = build_groups(vgg.graph)
    plan = uniform_plan(vgg.graph, coupling, 0.5)
    pruned = vgg.pruned(coupling, plan)
    error = pruned.exactness(vgg, coupling, plan)  # raises ValidationError when they differ
    assert np.isfinite(error) and error < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_finetune_on_cuda_changes_the_weights(vgg):
    x = np.random.default_rng(0).standard_normal((64, *models.INPUT_SHAPE)).astype(np.float32)
    data = Calibration((x,), np.random.default_rng(1).integers(0, 10, 64), "random")
    tuned = vgg.finetuned(data, FitOptions(epochs=1.0, batch_size=32), None, None)
    name = next(n.inputs[1] for n in vgg.graph.nodes if n.op_type == "Conv")
    assert not np.array_equal(tuned.graph.param(name), vgg.graph.param(name))


def test_latency_tables_on_cuda(vgg, tmp_path):
    coupling = build_groups(vgg.graph)
    options = LatencyOptions(provider="CUDAExecutionProvider", runs=2, warmup=1, model_runs=3, max_counts=4, cache_dir=str(tmp_path),
                             cache_check=0.0)  # the second build reads every point from the cache
    lm = build_latency_model(vgg.om, coupling, options)
    assert lm.setting["provider"] == "CUDAExecutionProvider"
    assert lm.tables and lm.stats.measurements > 0 and lm.original_ms > 0
    again = build_latency_model(vgg.om, coupling, options)
    assert again.stats.measurements == 0

