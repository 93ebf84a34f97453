"""graphprune: structured channel pruning for ONNX and PyTorch graphs."""
from __future__ import annotations

from graphprune.coupling import Coupling, Group, Member, build_groups
from graphprune.errors import BadInputError, GraphpruneError, PlanMismatchError, ValidationError
from graphprune.graph import Axis, ChannelGraph, OpNode, TensorInfo

__all__ = [
    "Axis",
    "BadInputError",
    "ChannelGraph",
    "Coupling",
    "GraphpruneError",
    "Group",
    "Member",
    "OpNode",
    "PlanMismatchError",
    "TensorInfo",
    "ValidationError",
    "build_groups",
]

__version__ = "0.1.0"
