"""torch backend: apply a plan to an ``nn.Module`` (its own class, sliced parameters).

The plan's kept elements of every parameter and buffer axis come from the
torch frontend's channel graph; the module is deep-copied, its tensors sliced
in place of the originals (still ``nn.Parameter``s, so it trains), and the
attributes of standard layers updated (Conv in/out channels and groups,
Linear features, BatchNorm/GroupNorm/LayerNorm sizes, attention heads).
``nn.MultiheadAttention`` layers become
:class:`~graphprune.frontends.torch.attention.HeadPrunableAttention` (same parameters
and call signature; ``num_heads`` follows the kept heads, the head size stays).
``save_pruned`` / ``load_pruned`` store the plan and the state dict only: the
pruned module is rebuilt from the original class, never unpickled.
"""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.coupling.groups import Coupling, build_groups
from graphprune.errors import BadInputError, ValidationError
from graphprune.execution.exactness import ATOL, RTOL, compare_outputs
from graphprune.frontends.torch.attention import HeadPrunableAttention, swap_attention
from graphprune.frontends.torch.trace import TorchModel, load_module
from graphprune.ir.graph import Axis, OpNode
from graphprune.ir.masks import keep_masks
from graphprune.ir.plan import Plan, kept_elements
from graphprune.ops import AdjustContext, adjustments, registered_ops

__all__ = [
    "apply_plan",
    "compensate_module",
    "load_pruned",
    "masked_reference",
    "prune_module",
    "reestimate_module_batch_norm",
    "save_pruned",
    "verify_module",
]

log = logging.getLogger(__name__)


def _owner(root: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    path, _, leaf = qualified.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def _slice_state(module: nn.Module, kept: Mapping[Axis, np.ndarray], state_names: Mapping[str, str]) -> set[str]:
    """Slice every parameter / buffer with kept elements; returns the owners touched."""
    per_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for axis, idx in kept.items():
        if axis.tensor in state_names:
            per_tensor.setdefault(state_names[axis.tensor], []).append((axis.axis, idx))
    touched = set()
    for qual, axes in per_tensor.items():
        owner, leaf = _owner(module, qual)
        old = getattr(owner, leaf)
        value = old.detach()
        for ax, idx in axes:
            value = value.index_select(ax, torch.as_tensor(idx, dtype=torch.long, device=value.device))
        value = value.clone()
        if isinstance(old, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(leaf, value, persistent=leaf not in owner._non_persistent_buffers_set)
        touched.add(qual.rpartition(".")[0])
    return touched


_MISSING = object()


def _plain(value: Any) -> Any:
    """A size attribute as comparable data (``torch.Size`` and lists as tuples)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _owner_of(op: OpNode, state_names: Mapping[str, str], touched: set[str]) -> str | None:
    """The module whose attributes follow ``op``: the one module owning the state it (or its call) reads, when that
    was touched; for a call reading no state, the module that made it, when a module under it was touched (a
    ``split(self.split_size)`` in an attention block whose projections were sliced). None otherwise."""
    names = (*op.inputs, *(op.origin.state if op.origin is not None else ()))
    owners = {state_names[n].rpartition(".")[0] for n in names if n in state_names}
    if owners:
        owner = owners.pop() if len(owners) == 1 else None
        return owner if owner in touched else None
    caller = op.origin.module if op.origin is not None else None
    if caller is None or not any(t == caller or t.startswith(f"{caller}.") or not caller for t in touched):
        return None
    return caller


def _fix_attributes(module: nn.Module, tm: TorchModel, kept: Mapping[Axis, np.ndarray], touched: set[str]) -> None:
    """Apply the op table's module rules: size attributes and groups follow the sliced tensors.

    Each op's rule goes to the module :func:`_owner_of` names (when it has the
    attribute with the op's old value); then every touched module gets the
    table's per-class hooks.

    Raises:
        ValidationError: When a layer cannot take the new sizes.
    """
    ctx = AdjustContext(kept, tm.graph)
    for op, spec, adj in adjustments(tm.graph, kept):
        owner = _owner_of(op, tm.state_names, touched)
        if spec.module is None or owner is None:
            continue
        m = module.get_submodule(owner)
        for attr, (old, new) in spec.module.edits(op, ctx, adj).items():
            if _plain(getattr(m, attr, _MISSING)) == _plain(old):
                setattr(m, attr, new)
    hooks = [spec.module for spec in registered_ops() if spec.module is not None and spec.module.hook is not None]
    for name in sorted(touched):
        m = module.get_submodule(name)
        for rule in hooks:
            try:
                rule.fix(m)
            except ValueError as exc:
                raise ValidationError(f"{name or type(m).__name__}: {exc}") from None


def _swapped(module: nn.Module) -> set[str]:
    """Swap ``module``'s attention layers for head-prunable ones (as traced); their qualified names."""
    swap_attention(module)
    return {name for name, m in module.named_modules() if isinstance(m, HeadPrunableAttention)}


def prune_module(tm: TorchModel, coupling: Coupling, plan: Plan) -> nn.Module:
    """A pruned copy of ``tm.module`` (the original is left untouched).

    Raises:
        PlanMismatchError: When the plan was made for another model.
        ValidationError: When a layer cannot take the new sizes.
    """
    if tm.module is None:
        raise BadInputError("this program was loaded from a file: apply plans to the nn.Module it was exported from")
    kept = kept_elements(plan, coupling, tm.graph)
    new = copy.deepcopy(tm.module)
    swapped = _swapped(new)
    touched = _slice_state(new, kept, tm.state_names) | swapped
    _fix_attributes(new, tm, kept, touched)
    return new.eval()


def compensate_module(tm: TorchModel, coupling: Coupling, plan: Plan, data: Any, batch_size: int = 64) -> nn.Module:
    """A copy of ``tm.module`` whose consumers absorb least-squares reconstructions of ``plan``'s dropped
    channels (see :mod:`graphprune.recovery.compensation`); prune it with the same plan afterwards."""
    from graphprune.recovery.compensation import compensate

    if tm.module is None:
        raise BadInputError("compensation needs the nn.Module, not a loaded program")
    from graphprune.backends.torch_model import ModulePrunable

    result = compensate(tm.graph, coupling, plan, data, batch_size)
    if not result.values:  # still a copy: the caller prunes and trains it
        return copy.deepcopy(tm.module).eval()
    return ModulePrunable(tm, ()).with_values(result.values).module.eval()


@torch.no_grad()
def reestimate_module_batch_norm(module: nn.Module, data: Any, batch_size: int = 128) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``data`` (cumulative average), in place."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    for _, inputs, _ in data.batches(batch_size):
        module(*(torch.from_numpy(a) for a in inputs))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return module.eval()


def apply_plan(model: nn.Module, plan: Plan, example_inputs: Sequence[torch.Tensor]) -> nn.Module:
    """Trace ``model``, check ``plan`` fits it, and return the pruned copy."""
    tm = load_module(model, example_inputs)
    return prune_module(tm, build_groups(tm.graph), plan)


def _times(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A tap multiplying a tensor by ``mask`` (cast to the tensor's dtype)."""
    return lambda t: t * mask.to(t.dtype)


def masked_reference(tm: TorchModel, kept: Mapping[Axis, np.ndarray], inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The original's outputs with every removed element zeroed on every tensor of its group.

    Parameters are multiplied by their masks (from :func:`graphprune.ir.masks.keep_masks`) in the
    interpreter's copy; activations are multiplied as they are computed.
    """
    from graphprune.execution.interpreter import GraphInterpreter

    interp = GraphInterpreter(tm.graph).eval()
    masks = {name: torch.from_numpy(m) for name, m in keep_masks(tm.graph, kept).items()}
    with torch.no_grad():
        for name, m in masks.items():
            if name in tm.state_names:
                interp.constant(name).mul_(m.to(interp.constant(name).dtype))
        taps = {n: _times(m) for n, m in masks.items() if n not in tm.state_names}
        return interp(*inputs, taps=taps)


def verify_module(tm: TorchModel, coupling: Coupling, plan: Plan, pruned: nn.Module, inputs: Sequence[torch.Tensor],
                  rtol: float = RTOL, atol: float = ATOL) -> float:
    """Check the pruned module against the masked original; returns the max abs error.

    The tolerance policy is :func:`graphprune.execution.exactness.compare_outputs`'s.

    Raises:
        ValidationError: When they differ, or the pruned forward fails (module code that hard-codes channel
            counts, for instance).
    """
    want = masked_reference(tm, kept_elements(plan, coupling, tm.graph), inputs)
    hint = ("its forward may hard-code channel counts; derive them from tensors or layer attributes, "
            "or prune the ONNX export")
    with torch.no_grad():
        try:
            got = pruned.eval()(*inputs)
        except Exception as exc:  # noqa: BLE001  (the module's own code: any failure is a size it hard-codes)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValidationError(f"the pruned module fails to run ({type(exc).__name__}: {first}); {hint}") from None
    return compare_outputs(want, got, what="the pruned module", hint=hint, rtol=rtol, atol=atol)


def save_pruned(path: str | os.PathLike[str], plan: Plan, module: nn.Module) -> None:
    """Write ``<path>.plan.json`` and ``<path>.pt`` (state dict only)."""
    from graphprune.io import write_bytes_atomic, write_text_atomic

    p = Path(path)
    write_text_atomic(p.with_suffix(".plan.json"), plan.to_json())
    import io

    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    write_bytes_atomic(p.with_suffix(".pt"), buf.getvalue())


def load_pruned(path: str | os.PathLike[str], model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> nn.Module:
    """Rebuild a pruned module: the original class instance, the saved plan, then the saved weights."""
    p = Path(path)
    pruned = apply_plan(model, Plan.load(p.with_suffix(".plan.json")), example_inputs)
    pruned.load_state_dict(torch.load(p.with_suffix(".pt"), map_location="cpu", weights_only=True))
    return pruned
