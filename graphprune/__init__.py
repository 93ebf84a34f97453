"""graphprune: structured channel pruning for ONNX and PyTorch graphs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from graphprune.coupling.groups import Coupling, Group, Member, build_groups
from graphprune.errors import BadInputError, GraphpruneError, PlanMismatchError, ValidationError
from graphprune.ir.graph import Axis, ChannelGraph, OpNode, TensorInfo

if TYPE_CHECKING:
    from graphprune.ir.plan import Plan

_LAZY = {
    # name: module it lives in (imported on first use, so `import graphprune` stays light and torch-free)
    "apply_plan": "graphprune.backends.torch_module",
    "prune_module": "graphprune.backends.torch_module",
    "verify_module": "graphprune.backends.torch_module",
    "save_pruned": "graphprune.backends.torch_module",
    "load_pruned": "graphprune.backends.torch_module",
    "load_module": "graphprune.frontends.torch.trace",
    "load_exported_program": "graphprune.frontends.torch.trace",
    "load_onnx": "graphprune.frontends.onnx",
    "load_data": "graphprune.frontends.data",
    "load_model": "graphprune.backends",
    "module_model": "graphprune.backends.torch_model",
    "program_model": "graphprune.backends.torch_model",
    "analyze_module": "graphprune.analysis.module",
    "make_plan": "graphprune.planning.hierarchical",
    "PlanOptions": "graphprune.planning.options",
    "Plan": "graphprune.ir.plan",
    "load_pipeline": "graphprune.pipeline.config",
    "run_passes": "graphprune.pipeline.config",
    "run_file": "graphprune.pipeline.run",
    "run_model": "graphprune.pipeline.run",
    "prune_file": "graphprune.pipeline.run",
    "Workspace": "graphprune.pipeline.workspace",
}

__all__ = [
    "Axis",
    "BadInputError",
    "ChannelGraph",
    "Coupling",
    "GraphpruneError",
    "Group",
    "Member",
    "OpNode",
    "Plan",
    "PlanMismatchError",
    "PlanOptions",
    "TensorInfo",
    "ValidationError",
    "Workspace",
    "analyze_module",
    "apply_plan",
    "build_groups",
    "load_data",
    "load_exported_program",
    "load_model",
    "load_module",
    "load_onnx",
    "load_pipeline",
    "load_plan",
    "load_pruned",
    "make_plan",
    "module_model",
    "program_model",
    "prune_file",
    "prune_module",
    "run_file",
    "run_model",
    "run_passes",
    "save_plan",
    "save_pruned",
    "verify_module",
]

__version__ = "0.1.0"


def save_plan(path: str | os.PathLike[str], plan: Plan) -> None:
    """Write ``plan`` (a :class:`graphprune.ir.plan.Plan`) as JSON, atomically."""
    from graphprune.io import write_text_atomic

    write_text_atomic(Path(path), plan.to_json())


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan written by :func:`save_plan` (or ``--plan-out``)."""
    from graphprune.ir.plan import Plan as PlanData

    return PlanData.load(path)


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'graphprune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
