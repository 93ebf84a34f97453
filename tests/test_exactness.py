"""The exactness check itself, custom-domain ops, and generated graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper
from torch import nn

from graphprune import models
from graphprune.backends.onnx import apply_plan
from graphprune.coupling.groups import build_groups
from graphprune.errors import ValidationError
from graphprune.execution.sessions import sample_inputs
from graphprune.execution.validate import validate_pruned
from graphprune.frontends.onnx import load_onnx
from graphprune.io import save_onnx
from graphprune.ir.plan import kept_elements
from graphprune.pipeline.run import prune_file
from graphprune.planning.uniform import uniform_plan


def test_exactness_check_catches_a_wrong_rewrite(exported, tmp_path):
    om = load_onnx(exported("vgg"))
    coupling = build_groups(om.graph)
    plan = uniform_plan(om.graph, coupling, 0.5)
    kept = kept_elements(plan, coupling, om.graph)
    pruned = apply_plan(om, coupling, plan)
    # Sabotage: reverse the filters of the first pruned conv (valid shapes, wrong channels).
    first = coupling.groups[plan.groups[0].group].params()[0]
    value = pruned.graph.initializers[first.tensor]
    value.const_value = onnx_ir_tensor(np.flip(value.const_value.numpy(), axis=first.axis).copy(), first.tensor)
    path = tmp_path / "bad.onnx"
    save_onnx(pruned, path)
    feeds = sample_inputs(om.graph)
    with pytest.raises(ValidationError, match="not exact"):
        validate_pruned(om, path, feeds, kept)


def onnx_ir_tensor(arr: np.ndarray, name: str):
    import onnx_ir as ir

    return ir.tensor(arr, name=name)


def _custom_domain_model(path) -> None:
    """conv -> custom::Scale (a model-local function) -> conv -> relu -> conv."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return helper.make_tensor(name, onnx.TensorProto.FLOAT, shape, rng.standard_normal(shape).astype(np.float32).ravel())

    scale_fn = helper.make_function(
        "custom", "Scale", ["x"], ["y"],
        [helper.make_node("Constant", [], ["two"], value_float=2.0), helper.make_node("Mul", ["x", "two"], ["y"])],
        [helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Scale", ["a"], ["b"], domain="custom"),
        helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["d"]),
        helper.make_node("Conv", ["d", "w3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "custom", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
        [init("w1", 8, 3, 3, 3), init("w2", 6, 8, 3, 3), init("w3", 4, 6, 1, 1)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)], functions=[scale_fn])
    onnx.save(model, path)


def test_custom_domain_op_freezes_and_stays_exact(tmp_path):
    src = tmp_path / "custom.onnx"
    _custom_domain_model(src)
    coupling = build_groups(load_onnx(src).graph)
    frozen = [g for g in coupling.groups if not g.prunable]
    assert any("unsupported op 'custom::Scale'" in r for g in frozen for r in g.frozen)
    assert [g.channels for g in coupling.prunable] == [6]  # only conv2 -> conv3 is free
    result = prune_file(src, tmp_path / "out.onnx", ratio=0.5, verify=True, latency_runs=0)
    assert result.validation.exact
    assert len(result.plan.groups) == 1


class RandomNet(nn.Module):
    """A chain of blocks drawn by hypothesis: conv, residual, concat, split, grouped conv."""

    def __init__(self, blocks: list[tuple[str, int]]):
        super().__init__()
        self.kinds = [k for k, _ in blocks]
        self.layers = nn.ModuleList()
        c = 4
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        for kind, w in blocks:
            if kind == "conv":
                self.layers.append(nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()))
                c = w
            elif kind == "residual":
                self.layers.append(nn.Sequential(nn.Conv2d(c, w, 1), nn.ReLU(), nn.Conv2d(w, c, 3, padding=1)))
            elif kind == "concat":
                self.layers.append(nn.Conv2d(c, w, 1))
                c += w
            elif kind == "split":
                self.layers.append(nn.Conv2d(c, 2 * w, 1))
                c = w
            else:  # grouped
                self.layers.append(nn.Sequential(nn.Conv2d(c, 4 * w, 1), nn.Conv2d(4 * w, 4 * w, 3, padding=1, groups=2 if w % 2 else 4)))
                c = 4 * w
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for kind, layer in zip(self.kinds, self.layers):
            if kind == "residual":
                x = x + layer(x)
            elif kind == "concat":
                x = torch.cat((x, layer(x)), 1)
            elif kind == "split":
                a, b = layer(x).split(layer.out_channels // 2, 1)
                x = a * torch.sigmoid(b)
            else:
                x = layer(x)
        return self.head(x.mean((2, 3)))


BLOCKS = st.lists(st.tuples(st.sampled_from(["conv", "residual", "concat", "split", "grouped"]), st.integers(2, 6)), min_size=1, max_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=BLOCKS, ratio=st.sampled_from([0.25, 0.5, 0.9]), seed=st.integers(0, 3))
def test_generated_graphs_prune_exactly(tmp_path_factory, blocks, ratio, seed):
    tmp = tmp_path_factory.mktemp("gen")
    torch.manual_seed(seed)
    src = tmp / "net.onnx"
    models.export_onnx(RandomNet(blocks).eval(), src, input_shape=(1, 8, 8))
    result = prune_file(src, tmp / "out.onnx", ratio=ratio, criterion="random", seed=seed, verify=True, latency_runs=0)
    assert result.validation.exact
    assert result.after.params <= result.before.params
