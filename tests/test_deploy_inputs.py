"""What deployment engineers hand over: fp16 models (onnxconverter-common), external data past the size limits, optimum exports."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from graphprune import models
from graphprune.pipeline.run import prune_file


@pytest.mark.parametrize("name", ["vgg", "resnet20"])
@pytest.mark.parametrize("keep_io_types", [False, True], ids=["fp16_io", "fp32_io"])
def test_fp16_model_prunes_to_an_fp16_model(tmp_path, name, keep_io_types):
    float16 = pytest.importorskip("onnxconverter_common.float16", reason="onnxconverter-common is not installed")
    src = tmp_path / f"{name}.onnx"
    models.export_onnx(models.build(name), src)
    half = tmp_path / f"{name}16.onnx"
    onnx.save(float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=keep_io_types), str(half))
    result = prune_file(half, tmp_path / "out.onnx", ratio=0.5, verify=True, latency_runs=0)
    # exact at fp16 tolerance: compare_outputs' scale-relative bound (1e-3) is about fp16's machine epsilon
    assert result.validation.exact and result.plan.groups
    out, before = onnx.load(str(result.output)), onnx.load(str(half))
    floats = {t.data_type for t in out.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    assert floats == {TensorProto.FLOAT16}
    assert out.graph.input[0].type.tensor_type.elem_type == before.graph.input[0].type.tensor_type.elem_type
    assert sum(int(np.prod(t.dims)) for t in out.graph.initializer) < 0.6 * sum(int(np.prod(t.dims)) for t in before.graph.initializer)


def test_past_the_size_limits_external_data_is_written_and_sessions_use_files(tmp_path, monkeypatch):
    """The > 2 GB route on a small model: the thresholds lowered, an inline input gives an external-data output,
    and every session (exactness, validation) is built from a temporary file with external data."""
    import graphprune.io
    import graphprune.ir.onnx

    monkeypatch.setattr(graphprune.io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    monkeypatch.setattr(graphprune.ir.onnx, "INLINE_LIMIT", 10_000)
    src = tmp_path / "vgg.onnx"
    models.export_onnx(models.build("vgg"), src)
    assert not onnx.load(str(src), load_external_data=False).graph.initializer[0].external_data
    result = prune_file(src, tmp_path / "out.onnx", ratio=0.5, verify=True, latency_runs=0)
    assert result.validation.exact
    data = tmp_path / "out.onnx.data"
    assert data.exists() and data.stat().st_size > 10_000
    proto = onnx.load(str(result.output), load_external_data=False)
    assert any(t.external_data for t in proto.graph.initializer)
    assert result.output.stat().st_size < 10_000  # the structure only: the weights are in the data file


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.exporters.onnx") is None,
                    reason="optimum's ONNX exporter is not installed (pip install optimum-onnx)")
def test_optimum_export_prunes_or_freezes_with_reasons(tmp_path):
    """A BERT built from a config (no download), exported by optimum (what `optimum-cli export onnx` runs)."""
    from optimum.exporters.onnx import main_export
    from transformers import BertConfig, BertForSequenceClassification

    from graphprune.coupling.groups import build_groups
    from graphprune.frontends.onnx import load_onnx

    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    main_export(str(tmp_path / "bert"), output=tmp_path / "onnx", task="text-classification")
    src = tmp_path / "onnx" / "model.onnx"
    coupling = build_groups(load_onnx(src).graph)
    assert all(g.prunable or g.frozen for g in coupling.groups), "every frozen group says why"
    result = prune_file(src, tmp_path / "out.onnx", ratio=0.5, verify=True, latency_runs=0)
    assert result.plan.groups and result.validation.exact
    assert Path(result.output).stat().st_size < src.stat().st_size
