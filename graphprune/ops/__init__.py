"""The op semantics table. Importing this package fills the registry."""
from __future__ import annotations

from graphprune.ops import attention, contrib, conv, elementwise, linear, norm, quantized, shape  # noqa: F401  (registration)
from graphprune.ops.registry import (
    AdjustContext,
    Adjustment,
    AxisOf,
    Factor,
    Freeze,
    Link,
    ModuleRule,
    OpSpec,
    Semantics,
    add_torch_targets,
    adjustments,
    lookup,
    register_module_rule,
    registered_ops,
)

__all__ = [
    "AdjustContext",
    "Adjustment",
    "AxisOf",
    "Factor",
    "Freeze",
    "Link",
    "ModuleRule",
    "OpSpec",
    "Semantics",
    "add_torch_targets",
    "adjustments",
    "lookup",
    "register_module_rule",
    "registered_ops",
]
