"""ExportedProgram backend: apply a plan to a saved ``.pt2`` program (no nn.Module class at hand).

The program is unlifted (``program.module()``: a GraphModule whose parameters
and buffers keep their qualified names), its tensors sliced like a module's,
and the literal sizes its aten calls carry patched from the new output shapes:
``view`` / ``reshape`` / ``expand`` / ``unflatten`` shapes, ``split`` sizes,
``layer_norm`` shapes, the group count of ``group_norm`` and of depthwise
``conv`` / ``conv_transpose``. It is then
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

from graphprune.backends.torch_module import _slice_state, compare_to_masked, masked_reference
from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError, ValidationError
from graphprune.frontends.torch.trace import TorchModel
from graphprune.ir.graph import Axis
from graphprune.ir.plan import Plan, kept_elements

__all__ = ["example_inputs", "prune_program", "verify_program"]

log = logging.getLogger(__name__)

_SHAPE_ARG = {"aten.view.default": 1, "aten.reshape.default": 1, "aten._unsafe_view.default": 1, "aten.expand.default": 1}


def _new_size(kept: Mapping[Axis, np.ndarray], tensor: str, axis: int) -> int | None:
    idx = kept.get(Axis(tensor, axis))
    return None if idx is None else int(idx.size)


def _patched_list(values: Sequence[Any], kept: Mapping[Axis, np.ndarray], tensor: str, first_axis: int) -> list[Any]:
    out = list(values)
    for j, v in enumerate(out):
        n = _new_size(kept, tensor, first_axis + j)
        if n is not None and isinstance(v, int) and v != -1:
            out[j] = n
    return out


def _patch_node(node: torch.fx.Node, kept: Mapping[Axis, np.ndarray], rank: int) -> None:
    """Rewrite the literal sizes of one aten call from its outputs' kept sizes."""
    key, args = str(node.target), list(node.args)
    name = node.name
    if key in _SHAPE_ARG and len(args) > 1 and isinstance(args[1], (list, tuple)):
        args[1] = _patched_list(args[1], kept, name, 0)
    elif key == "aten.unflatten.int":
        dim = int(args[1]) % rank
        args[2] = _patched_list(args[2], kept, name, dim)
    elif key == "aten.split_with_sizes.default":
        dim = int(args[2]) if len(args) > 2 else int(node.kwargs.get("dim", 0))
        dim %= rank
        args[1] = [(_new_size(kept, f"{name}.{j}", dim) or s) for j, s in enumerate(args[1])]
    elif key == "aten.split.Tensor":
        dim = (int(args[2]) if len(args) > 2 else int(node.kwargs.get("dim", 0))) % rank
        n = _new_size(kept, f"{name}.0", dim)
        if n is not None:
            args[1] = n
    elif key == "aten.group_norm.default":  # whole groups go: the group count follows the channels
        x = args[0].meta.get("val") if isinstance(args[0], torch.fx.Node) else None
        n = _new_size(kept, name, 1)
        if x is not None and n is not None:
            args[1] = n // (int(x.shape[1]) // int(args[1]))
    elif key == "aten.layer_norm.default":
        shape = list(args[1])
        args[1] = _patched_list(shape, kept, name, rank - len(shape))
    elif key in ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default") and len(args) > 6 and int(args[6]) > 1:
        weight = args[1].meta.get("val") if isinstance(args[1], torch.fx.Node) else None
        n = _new_size(kept, name, 1)
        if weight is not None and weight.shape[1] == 1 and n is not None:  # depthwise: groups follow the channels
            per_group = int(weight.shape[0]) // int(args[6])
            args[6] = n // per_group
    elif key.startswith("aten.conv_transpose") and len(args) > 6 and int(args[6]) > 1:
        weight = args[1].meta.get("val") if isinstance(args[1], torch.fx.Node) else None
        n = _new_size(kept, name, 1)
        if weight is not None and weight.shape[1] == 1 and n is not None:  # depthwise: weight (C, 1, k...)
            args[6] = n
    node.args = tuple(args)


def _rank(node: torch.fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        val = val[0] if val else None
    return len(getattr(val, "shape", ()))


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
    for node in gm.graph.nodes:
        if node.op == "call_function":
            _patch_node(node, kept, _rank(node))
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
                   rtol: float = 1e-4, atol: float = 1e-4) -> float:
    """The pruned program against the original with removed channels zeroed; returns the max abs error.

    Raises:
        ValidationError: When they differ.
    """
    inputs = example_inputs(tm.program)  # type: ignore[arg-type]
    want = masked_reference(tm, kept_elements(plan, coupling, tm.graph), inputs)
    with torch.no_grad():
        got = pruned.module()(*inputs)
    hint = "a channel count is hard-coded in an op graphprune does not rewrite; prune the ONNX export instead"
    return compare_to_masked(want, got, "the pruned program", hint, rtol, atol)
