"""graphprune: structured channel pruning for ONNX and PyTorch graphs."""
from __future__ import annotations

import os
from pathlib import Path

from graphprune.coupling.groups import Coupling, Group, Member, build_groups
from graphprune.errors import BadInputError, GraphpruneError, PlanMismatchError, ValidationError
from graphprune.ir.graph import Axis, ChannelGraph, OpNode, TensorInfo

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
    "apply_plan",
    "build_groups",
    "load_plan",
    "save_plan",
]

__version__ = "0.1.0"


def save_plan(path: str | os.PathLike[str], plan: object) -> None:
    """Write ``plan`` (a :class:`graphprune.ir.plan.Plan`) as JSON, atomically."""
    from graphprune.io import write_text_atomic

    write_text_atomic(Path(path), plan.to_json())  # type: ignore[attr-defined]


def load_plan(path: str | os.PathLike[str]) -> object:
    """Read a plan written by :func:`save_plan` (or ``--plan-out``)."""
    from graphprune.ir.plan import Plan

    return Plan.load(path)


def __getattr__(name: str) -> object:
    if name == "apply_plan":  # torch is imported only when asked for
        from graphprune.backends.torch_module import apply_plan

        return apply_plan
    raise AttributeError(f"module 'graphprune' has no attribute {name!r}")
