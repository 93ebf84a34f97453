"""The pruned graph keeps onnxruntime's fusions and adds no op on the hot path.

The original and the pruned model are optimized by onnxruntime
(ORT_ENABLE_EXTENDED: Conv+BN, Conv+Add+Relu, Gemm+Relu... fusions) and the
optimized graphs' op types are counted: pruning channels changes sizes only.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.coupling.groups import build_groups
from graphprune.frontends.onnx import load_onnx
from graphprune.io import save_onnx
from graphprune.planning.uniform import uniform_plan


def optimized_ops(path: Path, out: Path, level: ort.GraphOptimizationLevel) -> Counter[str]:
    """Op types of the graph onnxruntime runs on the CPU after its optimizations at ``level``."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return Counter(f"{n.domain}:{n.op_type}" for n in onnx.load(str(out)).graph.node)


EXTENDED = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@pytest.mark.parametrize("name", ["vgg", "resnet20", "mobilenetv2"])
@pytest.mark.parametrize(("ratio", "round_to", "level"), [(0.3, 1, EXTENDED), (0.6, 1, EXTENDED), (0.5, 16, ALL)])
def test_pruned_graph_keeps_the_fusions(exported, tmp_path, name, ratio, round_to, level):
    """Fusions (EXTENDED) survive any counts; the NCHWc layout (ALL, CPU) keeps every op with counts in multiples of 16.

    At ORT_ENABLE_ALL with counts not multiples of the NCHWc block (8 was not enough on this machine), onnxruntime drops
    NCHWc ops for those layers and reorders around them: why the
    latency tables' fast counts matter.
    """
    src = exported(name)
    om = OnnxPrunable(load_onnx(src))
    coupling = build_groups(om.graph)
    pruned = om.pruned(coupling, uniform_plan(om.graph, coupling, ratio, round_to=round_to))
    out = tmp_path / "pruned.onnx"
    save_onnx(pruned.om.model, out)
    before = optimized_ops(src, tmp_path / "a.opt.onnx", level)
    after = optimized_ops(out, tmp_path / "b.opt.onnx", level)
    assert after == before
    assert sum(after.values()) < sum(Counter(n.op_type for n in onnx.load(str(out)).graph.node).values())  # something was fused
