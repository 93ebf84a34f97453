"""ExportedProgram backend: apply a plan to a saved ``.pt2`` program (no nn.Module class at hand).

The program is unlifted (``program.module()``: a GraphModule whose parameters
and buffers keep their qualified names), its tensors sliced like a module's,
and the literal sizes its aten calls carry patched with the op table's
adjustments, through the argument each op node records it came from
(``view`` / ``reshape`` / ``unflatten`` shapes, ``split`` sizes, the group
count of ``group_norm`` and of depthwise ``conv`` / ``conv_transpose``). It is then
exported again (dynamic batch when the original had one) and checked against
the original with the removed channels zeroed; a size hard-coded elsewhere
(a ``slice`` bound, a ``zeros`` shape) fails that check with a clear error.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from graphprune.backends.torch_module import _slice_state, masked_reference
from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError, ValidationError
from graphprune.execution.exactness import ATOL, RTOL, compare_outputs
from graphprune.frontends.torch.trace import TorchModel
from graphprune.ir.graph import ArgRef, Origin
from graphprune.ir.plan import Plan, kept_elements
from graphprune.ops import Adjustment, adjustments

__all__ = ["example_inputs", "prune_program", "verify_program"]

log = logging.getLogger(__name__)

def _aten_value(value: Any, ref: ArgRef) -> Any:
    """An ONNX attribute or constant value in the form the aten argument takes."""
    if isinstance(value, np.ndarray):
        value = [int(v) for v in value.reshape(-1)]
    if ref.first and isinstance(value, (list, tuple)):
        return value[0]
    return value


def _get_arg(node: torch.fx.Node, ref: ArgRef) -> Any:
    return node.args[ref.index] if ref.index < len(node.args) else node.kwargs.get(ref.key)


def _set_arg(node: torch.fx.Node, ref: ArgRef, value: Any) -> None:
    if ref.index < len(node.args):
        args = list(node.args)
        args[ref.index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, ref.key: value}


def _patched_list(values: Sequence[Any], entries: Mapping[int, int], offset: int) -> list[Any]:
    """A size list with ONNX shape-vector entries set (entry ``j`` is list entry ``j - offset``); -1 and symbols stay."""
    out = list(values)
    for j, n in entries.items():
        i = j - offset
        if 0 <= i < len(out) and isinstance(out[i], int) and out[i] != -1:
            out[i] = int(n)
    return out


def _patch_node(node: torch.fx.Node, origin: Origin, adj: Adjustment) -> None:
    """Apply an op's Adjustment to the call it was converted from, through the argument map the converter recorded.

    Edits without a recorded argument have no aten counterpart (``flatten``
    follows its input) and are left out.
    """
    for key, value in adj.attrs.items():
        ref = origin.attrs.get(key)
        if ref is not None and value is not None:
            _set_arg(node, ref, _aten_value(value, ref))
    for index, arr in adj.const_inputs.items():
        ref = origin.inputs.get(index)
        if ref is not None:
            _set_arg(node, ref, _aten_value(np.asarray(arr), ref))
    for index, entries in adj.shape_overrides.items():
        ref = origin.inputs.get(index)
        current = _get_arg(node, ref) if ref is not None else None
        if ref is not None and isinstance(current, (list, tuple)):
            _set_arg(node, ref, _patched_list(current, entries, ref.offset))


def _user_inputs(program: torch.export.ExportedProgram) -> list[Any]:
    """The traced values (fake tensors) of the program's user inputs, in order."""
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    return [vals[s.arg.name] for s in program.graph_signature.input_specs if s.target is None]


def _symbolic_batch(val: Any) -> bool:
    return bool(val.shape) and not isinstance(val.shape[0], int)


def example_inputs(program: torch.export.ExportedProgram, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Random user inputs matching the program's input specs (symbolic dims take ``batch``)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for v in _user_inputs(program):
        shape = [d if isinstance(d, int) else batch for d in v.shape]
        out.append(torch.randn(shape, generator=gen).to(v.dtype) if v.dtype.is_floating_point else torch.zeros(shape, dtype=v.dtype))
    return tuple(out)


def _dynamic_batch(program: torch.export.ExportedProgram) -> tuple[dict[int, Any], ...] | None:
    """A dynamic leading dim for every user input whose first dim was symbolic in the original."""
    vals = _user_inputs(program)
    firsts = [v.shape[0] for v in vals if _symbolic_batch(v)]
    if not firsts:
        return None
    lo, hi = 1, 1 << 16
    for sym, rng in program.range_constraints.items():  # keep the original's range (its guards check it)
        if str(sym) == str(firsts[0]):
            lo, hi = max(int(rng.lower), 1), int(min(rng.upper, 1 << 30))
    batch = torch.export.Dim("batch", min=lo, max=hi)
    return tuple({0: batch} if _symbolic_batch(v) else {} for v in vals)


def prune_program(tm: TorchModel, coupling: Coupling, plan: Plan) -> torch.export.ExportedProgram:
    """A pruned ExportedProgram (the original is left untouched).

    Raises:
        BadInputError: When ``tm`` was not traced by torch.export.
        PlanMismatchError: When the plan was made for another model.
        ValidationError: When the pruned program cannot be exported again.
    """
    if tm.program is None:
        raise BadInputError("this model was traced with torch.fx, not torch.export: prune the nn.Module instead")
    kept = kept_elements(plan, coupling, tm.graph)
    gm = tm.program.module()
    gm.graph.eliminate_dead_code()  # the channel graph leaves dead ops out, so their sizes would not be patched
    _slice_state(gm, kept, tm.state_names)
    calls = {node.name: node for node in gm.graph.nodes if node.op == "call_function"}
    for op, _spec, adj in adjustments(tm.graph, kept):
        if adj and op.origin is not None and op.origin.call in calls:
            _patch_node(calls[op.origin.call], op.origin, adj)
    gm.recompile()
    args = example_inputs(tm.program)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(gm, args, dynamic_shapes=_dynamic_batch(tm.program))
    except Exception as exc:  # noqa: BLE001 - a size the rewrite did not reach
        raise ValidationError(f"the pruned program does not export again ({str(exc).splitlines()[0][:200]}): "
                              "prune the ONNX export instead") from None


def verify_program(tm: TorchModel, coupling: Coupling, plan: Plan, pruned: torch.export.ExportedProgram,
                   rtol: float = RTOL, atol: float = ATOL) -> float:
    """The pruned program against the original with removed channels zeroed; returns the max abs error.

    The tolerance policy is :func:`graphprune.execution.exactness.compare_outputs`'s.

    Raises:
        ValidationError: When they differ.
    """
    if tm.program is None:
        raise BadInputError("verify_program needs a program traced by torch.export")
    inputs = example_inputs(tm.program)
    want = masked_reference(tm, kept_elements(plan, coupling, tm.graph), inputs)
    with torch.no_grad():
        got = pruned.module()(*inputs)
    hint = "a channel count is hard-coded in an op graphprune does not rewrite; prune the ONNX export instead"
    return compare_outputs(want, got, what="the pruned program", hint=hint, rtol=rtol, atol=atol)
