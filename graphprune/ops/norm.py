"""Normalisation, pooling, reductions and softmax."""
from __future__ import annotations

import numpy as np

from graphprune.ir.graph import Axis, ChannelGraph, OpNode
from graphprune.ops._common import (
    freeze_axes,
    freeze_node,
    identity_links,
    needs_shapes,
    norm_axis,
)
from graphprune.ops.registry import (
    AdjustContext,
    Adjustment,
    AxisOf,
    Link,
    ModuleRule,
    Semantics,
    attr_or_input,
    register,
)

__all__ = ["GROUP_NORM_MODULE", "batch_norm", "group_norm", "layer_norm", "pool", "reduce", "softmax"]


def _rank(graph: ChannelGraph, name: str) -> int:
    shape = graph.shape(name)
    assert shape is not None
    return len(shape)


@register(
    "BatchNormalization", "InstanceNormalization", module=ModuleRule(sizes={"num_features": AxisOf(0, 1)})
)
def batch_norm(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Per-channel affine maps: every per-channel vector follows axis 1."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y])
    if missing is not None:
        return missing
    r = _rank(graph, x)
    links = identity_links(x, y, ((i, i) for i in range(r)))
    for vec in (*node.inputs[1:], *node.outputs[1:]):
        if vec and graph.shape(vec) is not None and len(graph.shape(vec)) == 1:  # type: ignore[arg-type]
            links.append(Link(Axis(vec, 0), Axis(y, 1)))
    return Semantics(links=tuple(links))


@register("LayerNormalization", module=ModuleRule(sizes={"normalized_shape": AxisOf(1)}))
def layer_norm(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Statistics span the normalised axes: pruning them would change every output."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y, *node.inputs[1:]])
    if missing is not None:
        return missing
    r = _rank(graph, x)
    first = norm_axis(int(node.attrs.get("axis", -1)), r)
    links = identity_links(x, y, ((i, i) for i in range(r)))
    for param in node.inputs[1:]:
        if param:
            pr = _rank(graph, param)
            links += [Link(Axis(param, i), Axis(y, r - pr + i)) for i in range(pr)]
    reason = "LayerNormalization normalises over this axis (pruning would change its statistics)"
    frozen = freeze_axes((Axis(x, i) for i in range(first, r)), reason)
    return Semantics(links=tuple(links), freezes=frozen)


def _group_norm_adjust(node: OpNode, ctx: AdjustContext) -> Adjustment:
    """The group count follows the kept channels (whole groups go).

    Raises:
        ValueError: When the kept channels are not whole groups.
    """
    x = node.inputs[0]
    kept, c = ctx.kept_of(Axis(x, 1)), ctx.graph.tensors[x].size(1)
    if kept is None or not c:
        return Adjustment()
    per_group = int(c) // int(node.attrs["num_groups"])
    if kept.size % per_group:
        raise ValueError(f"keeps {kept.size} channels, not whole groups of {per_group}")
    return Adjustment(attrs={"num_groups": int(kept.size) // per_group})


GROUP_NORM_MODULE = ModuleRule(attrs={"num_groups": "num_groups"}, sizes={"num_channels": AxisOf(0, 1)})
"""``nn.GroupNorm``: the group count and the channel count (X's axis 1)."""


@register("GroupNormalization", adjust=_group_norm_adjust, module=GROUP_NORM_MODULE)
def group_norm(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Statistics mix the channels of a group: each group is one channel of a plan (it goes whole).

    Scale and bias are per channel (opset 21) or per group (opset 18).
    """
    x, y = node.inputs[0], node.outputs[0]
    params = [p for p in node.inputs[1:3] if p]
    missing = needs_shapes(node, graph, [x, y, *params])
    if missing is not None:
        return missing
    r, c, groups = _rank(graph, x), graph.shape(x)[1], int(node.attrs.get("num_groups", 0))  # type: ignore[index]
    if not isinstance(c, int) or groups <= 0 or c % groups:
        return freeze_node(node, graph, "GroupNormalization: channel count unknown or not a multiple of the groups")
    idx = np.arange(c)
    per = c // groups
    links = identity_links(x, y, ((i, i) for i in range(r)))
    links.append(Link(Axis(x, 1), Axis(x, 1), idx, idx // per * per))  # a group's channels are one channel
    for p in params:
        size = graph.shape(p)[0]  # type: ignore[index]
        if size == c:
            links.append(Link(Axis(p, 0), Axis(y, 1)))
        elif size == groups:
            links.append(Link(Axis(p, 0), Axis(y, 1), idx // per, idx))
        else:
            return freeze_node(node, graph, f"GroupNormalization: scale of {size} for {c} channels in {groups} groups")
    return Semantics(links=tuple(links))


@register("LpNormalization", "LRN", "MeanVarianceNormalization")
def cross_channel_norm(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Statistics mix channels: the channel axis is frozen, the others pass."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y])
    if missing is not None:
        return missing
    r = _rank(graph, x)
    links = identity_links(x, y, ((i, i) for i in range(r)))
    reason = f"{node.op_type} mixes values across this axis"
    if node.op_type == "LpNormalization":
        frozen = [Axis(x, norm_axis(int(node.attrs.get("axis", -1)), r))]
    elif node.op_type == "MeanVarianceNormalization":
        frozen = [Axis(x, a % r) for a in node.attrs.get("axes", (0, 2, 3))]
    else:
        frozen = [Axis(x, 1)]
    return Semantics(links=tuple(links), freezes=freeze_axes(frozen, reason))


@register(
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
)
def pool(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Batch and channel axes pass; spatial axes shrink and are not linked."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y])
    if missing is not None:
        return missing
    if len(node.outputs) > 1 and node.outputs[1]:
        return freeze_node(node, graph, "MaxPool indices encode channel positions")
    info = graph.info(x)
    if node.op_type == "MaxPool" and info is not None and info.dtype in ("INT8", "UINT8"):
        # measured: QOperator groups through an int8 MaxPool come out up to half a quantization step off the
        # masked original on onnxruntime (groups without one are exact), cause not found: freeze until it is
        return freeze_node(node, graph, "MaxPool over quantized (int8) values: pruning through it is not verified exact")
    return Semantics(links=tuple(identity_links(x, y, ((0, 0), (1, 1)))))


_EXACT_REDUCTIONS = frozenset({"ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"})
"""Reductions to which a zeroed element contributes nothing."""


@register(
    "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceMean", "ReduceMax",
    "ReduceMin", "ReduceProd", "ReduceLogSum", "ReduceLogSumExp", "ArgMax", "ArgMin",
)
def reduce(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Kept axes pass; reduced axes are unlinked, and frozen unless zeros drop out."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y])
    if missing is not None:
        return missing
    r = _rank(graph, x)
    if node.op_type in ("ArgMax", "ArgMin"):
        axes_v = [int(node.attrs.get("axis", 0))]
    else:
        found = attr_or_input(node, graph, "axes", 1)
        if found is None and len(node.inputs) > 1 and node.inputs[1]:
            return freeze_node(node, graph, f"{node.op_type}: axes computed at run time")
        axes_v = [] if found is None else [int(a) for a in found.reshape(-1)]
    if not axes_v:
        if node.attrs.get("noop_with_empty_axes", 0):
            return Semantics(links=tuple(identity_links(x, y, ((i, i) for i in range(r)))))
        axes_v = list(range(r))
    axes = sorted({norm_axis(a, r) for a in axes_v})
    keep = bool(node.attrs.get("keepdims", 1))
    links, j = [], 0
    for i in range(r):
        if i in axes:
            j += keep
            continue
        links.append(Link(Axis(x, i), Axis(y, j)))
        j += 1
    freezes: tuple = ()
    if node.op_type not in _EXACT_REDUCTIONS:
        reason = f"{node.op_type} over this axis changes when elements are removed"
        freezes = freeze_axes((Axis(x, a) for a in axes), reason)
    return Semantics(links=tuple(links), freezes=freezes)


@register("Softmax", "LogSoftmax", "Hardmax")
def softmax(node: OpNode, graph: ChannelGraph) -> Semantics:
    """The normalised axis (all trailing axes before opset 13) is frozen."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y])
    if missing is not None:
        return missing
    r = _rank(graph, x)
    default = -1 if node.opset >= 13 else 1
    axis = norm_axis(int(node.attrs.get("axis", default)), r)
    frozen = [axis] if node.opset >= 13 else list(range(axis, r))
    reason = f"{node.op_type} normalises over this axis"
    links = identity_links(x, y, ((i, i) for i in range(r)))
    return Semantics(links=tuple(links), freezes=freeze_axes((Axis(x, a) for a in frozen), reason))
