"""Convolutions, including grouped and depthwise ones."""
from __future__ import annotations

import math

import numpy as np

from graphprune.ir.graph import Axis, ChannelGraph, OpNode
from graphprune.ops._common import freeze_axes, freeze_node, needs_shapes
from graphprune.ops.registry import AdjustContext, Adjustment, AxisOf, Freeze, Link, ModuleRule, Semantics, register

__all__ = ["CONV_MODULE", "CONV_TRANSPOSE_MODULE", "conv", "conv_transpose"]


def _static(*dims: object) -> bool:
    return all(isinstance(d, int) for d in dims)


def _depthwise(node: OpNode, graph: ChannelGraph) -> bool:
    """Conv whose every group reads exactly one input channel."""
    w = graph.shape(node.inputs[1])
    group = int(node.attrs.get("group", 1))
    return group > 1 and w is not None and w[1] == 1


def _conv_adjust(node: OpNode, ctx: AdjustContext) -> Adjustment:
    """A depthwise conv has one group per input channel kept."""
    if not _depthwise(node, ctx.graph):
        return Adjustment()
    kept = ctx.new_size(Axis(node.inputs[0], 1))
    return Adjustment(attrs={"group": kept}) if kept is not None else Adjustment()


def _conv_macs(node: OpNode, graph: ChannelGraph) -> int:
    y, w = graph.shape(node.outputs[0]), graph.shape(node.inputs[1])
    if y is None or w is None:
        return 0
    per_out = math.prod(d for d in w[1:] if isinstance(d, int))
    return per_out * math.prod(d for d in y[1:] if isinstance(d, int))


CONV_MODULE = ModuleRule(
    attrs={"group": "groups"},
    sizes={"in_channels": AxisOf(0, 1), "out_channels": AxisOf(1, 0)},
)
"""``nn.ConvNd``: groups, in channels (X's axis 1) and out channels (W's axis 0)."""

CONV_TRANSPOSE_MODULE = ModuleRule(
    attrs={"group": "groups"},
    sizes={"in_channels": AxisOf(0, 1), "out_channels": AxisOf(0, 1, output=True)},
)
"""``nn.ConvTransposeNd``: groups, in channels (X's axis 1) and out channels (Y's axis 1)."""


@register("Conv", adjust=_conv_adjust, macs=_conv_macs, module=CONV_MODULE)
def conv(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Y[:, o] is made by filter W[o] from X's channels of o's group.

    Grouped conv: the same in-group offsets are pruned in every group so the
    group count stays valid. Depthwise: input channel c owns outputs
    c*m .. c*m+m-1 (channel multiplier m) and the group count follows.
    """
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else ""
    y = node.outputs[0]
    missing = needs_shapes(node, graph, [x, w, y])
    if missing is not None:
        return missing
    ws = graph.shape(w)
    assert ws is not None
    group = int(node.attrs.get("group", 1))
    cout, cin_pg = ws[0], ws[1]
    if not (isinstance(cout, int) and isinstance(cin_pg, int)) or cout % group:
        return freeze_node(node, graph, "Conv: weight shape is not static")
    cout_pg = cout // group
    links = [Link(Axis(x, 0), Axis(y, 0)), Link(Axis(w, 0), Axis(y, 1))]
    if b:
        links.append(Link(Axis(b, 0), Axis(y, 1)))
    if group == 1:
        links.append(Link(Axis(x, 1), Axis(w, 1)))
    elif cin_pg == 1:
        c = np.arange(group)
        links += [Link(Axis(x, 1), Axis(y, 1), c, c * cout_pg + r) for r in range(cout_pg)]
    else:
        xi = np.arange(group * cin_pg)
        yi = np.arange(cout)
        links.append(Link(Axis(x, 1), Axis(w, 1), xi, xi % cin_pg))
        links.append(Link(Axis(y, 1), Axis(y, 1), yi, yi % cout_pg))
    return Semantics(links=tuple(links), freezes=_kernel_axes(node, w, len(ws)))


def _kernel_axes(node: OpNode, w: str, rank: int) -> tuple[Freeze, ...]:
    """A weight's spatial axes are not channels (they matter when the weight is computed, e.g. Cast from bf16)."""
    return freeze_axes((Axis(w, i) for i in range(2, rank)), f"{node.op_type}: kernel axis")


def _conv_transpose_macs(node: OpNode, graph: ChannelGraph) -> int:
    x, w = graph.shape(node.inputs[0]), graph.shape(node.inputs[1])
    if x is None or w is None:
        return 0
    per_in = math.prod(d for d in w[1:] if isinstance(d, int))
    return per_in * math.prod(d for d in x[1:] if isinstance(d, int))


@register("ConvTranspose", adjust=_conv_adjust, macs=_conv_transpose_macs, module=CONV_TRANSPOSE_MODULE)
def conv_transpose(node: OpNode, graph: ChannelGraph) -> Semantics:
    """W is (Cin, Cout/group, k...): input channels index W's first axis."""
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else ""
    y = node.outputs[0]
    missing = needs_shapes(node, graph, [x, w, y])
    if missing is not None:
        return missing
    ws = graph.shape(w)
    assert ws is not None
    group = int(node.attrs.get("group", 1))
    links = [Link(Axis(x, 0), Axis(y, 0)), Link(Axis(x, 1), Axis(w, 0))]
    if b:
        links.append(Link(Axis(b, 0), Axis(y, 1)))
    kernel = _kernel_axes(node, w, len(ws))
    if group == 1:
        links.append(Link(Axis(w, 1), Axis(y, 1)))
        return Semantics(links=tuple(links), freezes=kernel)
    if ws[1] == 1 and graph.shape(x)[1] == group:  # type: ignore[index]
        links.append(Link(Axis(x, 1), Axis(y, 1)))
        return Semantics(links=tuple(links), freezes=kernel)
    reason = "ConvTranspose: grouped (non-depthwise) channels are not supported"
    return Semantics(
        links=tuple(links[:1]),
        freezes=freeze_axes([Axis(x, 1), Axis(y, 1), Axis(w, 0), Axis(w, 1)], reason) + kernel,
    )
