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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.coupling.groups import Coupling, build_groups
from graphprune.errors import BadInputError, ValidationError
from graphprune.frontends.torch.attention import HeadPrunableAttention, swap_attention
from graphprune.frontends.torch.trace import TorchModel, load_module
from graphprune.ir.graph import Axis
from graphprune.ir.plan import Plan, kept_elements

__all__ = [
    "apply_plan",
    "compare_to_masked",
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


def _fix_attributes(module: nn.Module, original: nn.Module, touched: set[str]) -> None:
    """Make standard layers' size attributes agree with their sliced tensors."""
    for name in touched:
        m = module.get_submodule(name) if name else module
        o = original.get_submodule(name) if name else original
        if isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight
            depthwise = o.groups > 1 and o.groups == o.in_channels
            if isinstance(m, nn.modules.conv._ConvTransposeNd):  # weight (in, out / groups, ...)
                m.in_channels = w.shape[0]
                if depthwise:
                    m.groups = m.in_channels
                m.out_channels = w.shape[1] * m.groups
            else:  # weight (out, in / groups, ...)
                m.out_channels = w.shape[0]
                if depthwise:
                    m.groups = m.out_channels // (o.out_channels // o.in_channels)
                m.in_channels = w.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            ref = m.weight if m.weight is not None else m.running_mean
            m.num_features = ref.shape[0]
        elif isinstance(m, nn.GroupNorm):  # whole groups go
            per_group = o.num_channels // o.num_groups
            m.num_channels = m.weight.shape[0]
            if m.num_channels % per_group:
                raise ValidationError(f"{name}: GroupNorm would keep {m.num_channels} channels, not whole groups of {per_group}")
            m.num_groups = m.num_channels // per_group
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, HeadPrunableAttention):
            _fix_attention(m)


def _fix_attention(m: HeadPrunableAttention) -> None:
    """Heads and the value head size follow the projections' rows; embedding sizes follow their columns."""
    v_rows = m.out_proj.weight.shape[1]
    if m._packed:
        qk_rows, m.embed_dim = (m.in_proj_weight.shape[0] - v_rows) // 2, m.in_proj_weight.shape[1]
        m.kdim = m.vdim = m.embed_dim
    else:
        qk_rows, m.embed_dim = m.q_proj_weight.shape
        m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
    if qk_rows < m.head_dim or qk_rows % m.head_dim or v_rows % (qk_rows // m.head_dim):
        raise ValidationError(f"attention keeps {qk_rows} query rows and {v_rows} value rows: not whole heads")
    m.num_heads = qk_rows // m.head_dim
    m.v_head_dim = v_rows // m.num_heads


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
    _fix_attributes(new, tm.module, touched)
    return new.eval()


def compensate_module(tm: TorchModel, coupling: Coupling, plan: Plan, data: Any, batch_size: int = 64) -> nn.Module:
    """A copy of ``tm.module`` whose consumers absorb least-squares reconstructions of ``plan``'s dropped
    channels (see :mod:`graphprune.recovery.compensation`); prune it with the same plan afterwards."""
    from graphprune.recovery.compensation import compensate

    if tm.module is None:
        raise BadInputError("compensation needs the nn.Module, not a loaded program")
    result = compensate(tm.graph, coupling, plan, data, batch_size)
    new = copy.deepcopy(tm.module)
    with torch.no_grad():
        for name, value in result.values.items():
            owner, leaf = _owner(new, tm.state_names[name])
            getattr(owner, leaf).copy_(torch.from_numpy(value))
    return new.eval()


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


def masked_reference(tm: TorchModel, kept: Mapping[Axis, np.ndarray], inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The original's outputs with every removed element zeroed on every tensor of its group."""
    from graphprune.execution.interpreter import GraphInterpreter

    interp = GraphInterpreter(tm.graph).eval()
    masks: dict[str, torch.Tensor] = {}
    for axis, idx in kept.items():
        info = tm.graph.tensors[axis.tensor]
        size = info.size(axis.axis)
        assert size is not None
        keep = torch.zeros(size)
        keep[torch.as_tensor(idx, dtype=torch.long)] = 1.0
        shape = [1] * (info.rank or 0)
        shape[axis.axis] = size
        m = keep.reshape(shape)
        masks[axis.tensor] = masks[axis.tensor] * m if axis.tensor in masks else m
    with torch.no_grad():
        for name, m in masks.items():
            if name in tm.state_names:
                interp.constant(name).mul_(m.to(interp.constant(name).dtype))
        taps = {n: (lambda mask: (lambda t: t * mask.to(t.dtype)))(m) for n, m in masks.items() if n not in tm.state_names}
        return interp(*inputs, taps=taps)


def compare_to_masked(want: Sequence[torch.Tensor], got: Any, what: str, hint: str, rtol: float = 1e-4, atol: float = 1e-4) -> float:
    """Max abs error of ``got`` (a tensor or a tuple) against the masked original's outputs.

    Raises:
        ValidationError: When shapes or values differ (``hint`` says what to do).
    """
    got_t = tuple(got) if isinstance(got, (tuple, list)) else (got,)
    err = 0.0
    for w, g in zip(want, got_t):
        if w.shape != g.shape or not torch.allclose(g, w, rtol=rtol, atol=atol):
            diff = (g - w).abs().max().item() if w.shape == g.shape else float("inf")
            raise ValidationError(f"{what} differs from the masked original (max abs error {diff:.3g}): {hint}")
        err = max(err, (g - w).abs().max().item())
    return err


def verify_module(tm: TorchModel, coupling: Coupling, plan: Plan, pruned: nn.Module, inputs: Sequence[torch.Tensor],
                  rtol: float = 1e-4, atol: float = 1e-4) -> float:
    """Check the pruned module against the masked original; returns the max abs error.

    Raises:
        ValidationError: When they differ (module code that hard-codes channel counts, for instance).
    """
    want = masked_reference(tm, kept_elements(plan, coupling, tm.graph), inputs)
    with torch.no_grad():
        got = pruned.eval()(*inputs)
    hint = ("its forward may hard-code channel counts; derive them from tensors or layer attributes, "
            "or prune the ONNX export")
    return compare_to_masked(want, got, "the pruned module", hint, rtol, atol)


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
