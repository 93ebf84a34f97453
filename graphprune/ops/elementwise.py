"""Element-wise ops: every axis passes through (with broadcasting)."""
from __future__ import annotations

from graphprune.ir.graph import ChannelGraph, OpNode
from graphprune.ops._common import broadcast_links
from graphprune.ops.registry import Semantics, register

__all__ = ["BROADCAST", "UNARY"]

UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu",
    "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Erf", "Exp", "Log", "Sqrt",
    "Abs", "Neg", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Identity",
    "Cast", "Mish", "Sin", "Cos", "Tan", "Not", "IsNaN", "IsInf",
    "ThresholdedRelu", "Shrink",
)
"""Ops whose first input maps element for element to the output; other
inputs (Clip bounds, Dropout ratio, CastLike target) are scalars or types."""

BROADCAST = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or",
    "Xor", "Mod", "PRelu", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
)
"""Ops that combine all inputs element-wise with numpy broadcasting."""


@register(*UNARY, "Clip", "Dropout", "CastLike")
def unary(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Axis i of the first input is axis i of every output."""
    return broadcast_links(node, graph, node.inputs[:1])


@register(*BROADCAST)
def broadcast(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Axes aligned from the right; size-1 broadcast axes are not linked."""
    return broadcast_links(node, graph, node.inputs)


@register("Constant", "Range")
def constant(_node: OpNode, _graph: ChannelGraph) -> Semantics:
    """A constant (or a Range of scalars: position ids) says nothing: its consumers link its axes."""
    return Semantics()
