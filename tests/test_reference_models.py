"""Every reference model, both opsets, both BN exports, three ratios: valid and exact."""
from __future__ import annotations

import onnx
import pytest

from graphprune import models
from graphprune.coupling.groups import build_groups
from graphprune.frontends.onnx import load_onnx
from graphprune.pipeline.run import prune_file

RATIOS = (0.25, 0.5, 0.9)


@pytest.mark.parametrize("bn", ["keep", "fold"])
@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("name", models.SMALL_MODELS)
def test_prunes_exactly(exported, tmp_path, name, opset, bn):
    src = exported(name, opset, bn)
    for ratio in RATIOS:
        out = tmp_path / f"{name}-{ratio}.onnx"
        result = prune_file(src, out, ratio=ratio, verify=True, latency_runs=0)
        assert result.validation.exact is True
        assert result.plan.groups, "every reference model has prunable groups"
        assert result.after.params < result.before.params
        assert result.after.macs < result.before.macs
        proto = onnx.load(str(out))
        onnx.checker.check_model(proto, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        assert [o.name for o in inferred.graph.output] == ["logits"]


# Hand-checked counts: (prunable, frozen). Frozen is the classifier output
# everywhere; the LayerNorm-normalised residual streams in ViT / ConvNeXt.
EXPECTED_GROUPS = {
    "vgg": (5, 1),  # 4 convs + the hidden Linear; logits frozen
    "resnet20": (12, 1),  # 3 residual streams + 9 block-inner groups
    "bottleneck": (10, 1),  # stem + 3 block outputs (with shortcuts) + 2 inner groups x 3 blocks
    "densenet": (15, 1),  # stem + (bottleneck, growth) x 6 layers + 2 transitions
    "mobilenetv2": (11, 1),  # stem stream + (2 expansions + 1 stream) x 3 stages + last 1x1
    "resnext": (10, 1),  # as bottleneck, 3x3 convs grouped
    "shufflenetv2": (9, 1),  # stem + per unit branch and shortcut convs through Split/Concat/shuffle
    "inception": (15, 1),  # stem + 7 branch convs x 2 blocks
    "vit": (4, 3),  # per block: whole heads (q, k, v, proj), MLP hidden; frozen: stream, tokens, logits
    "convnext": (2, 3),  # the two MLP hidden layers
}


@pytest.mark.parametrize("name", sorted(EXPECTED_GROUPS))
def test_group_counts(exported, name):
    coupling = build_groups(load_onnx(exported(name)).graph)
    frozen = [g for g in coupling.groups if not g.prunable]
    assert (len(coupling.prunable), len(frozen)) == EXPECTED_GROUPS[name]
    assert any("graph output" in g.frozen for g in frozen)


def test_resnet20_group_structure(exported):
    coupling = build_groups(load_onnx(exported("resnet20")).graph)
    sizes = sorted(g.channels for g in coupling.prunable)
    assert sizes == [16] * 4 + [32] * 4 + [64] * 4
    stream = max((g for g in coupling.prunable if g.channels == 16), key=lambda g: len(g.members))
    convs_reading = [m for m in stream.members if m.kind == "param" and m.axis == 1]
    assert len(convs_reading) == 5  # three stage-1 blocks, stage 2's first conv and its shortcut


def test_grouped_conv_keeps_groups_valid(exported):
    coupling = build_groups(load_onnx(exported("resnext")).graph)
    inner = [g for g in coupling.prunable if any(m.indices.shape[1] == 4 for m in g.members)]
    assert inner, "the grouped conv's channels are pruned at the same offset in all 4 groups"


def test_vit_prunes_whole_heads_not_residual(exported):
    coupling = build_groups(load_onnx(exported("vit")).graph)
    frozen_reasons = " ".join(r for g in coupling.groups for r in g.frozen)
    assert "LayerNormalization" in frozen_reasons
    heads = [g for g in coupling.prunable if g.channels == 4]
    assert len(heads) == 2  # one per block: q, k, v and proj together
    for g in heads:
        weights = [m for m in g.members if m.kind == "param" and m.indices.shape[1] > 1]
        assert len(weights) >= 4 and all(m.indices.shape[1] == 8 for m in weights)  # a head is 8 columns of q, k, v, proj
