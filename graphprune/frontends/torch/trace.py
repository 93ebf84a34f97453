"""torch frontend: an ``nn.Module`` (or a saved ExportedProgram) as a channel graph.

``torch.export`` traces the module to aten ops; each aten target is rewritten
into the ONNX-form op the semantics table already knows (``aten.conv2d`` ->
``Conv``, ``aten.linear`` -> ``Transpose`` + ``MatMul`` + ``Add``...), so both
formats share one table, one coupling analysis, one interpreter. Parameters
and buffers keep their qualified names (``layer1.0.conv1.weight``), which is
what the module backend slices. Targets without a converter become ops of
the ``aten`` domain, which the table does not know: their channels freeze,
and the interpreter replays them as traced. When torch.export refuses a
module, ``torch.fx.symbolic_trace`` + ``make_fx`` (static shapes) is the
fallback. ``nn.MultiheadAttention`` layers are traced as
:class:`~graphprune.frontends.torch.attention.HeadPrunableAttention` (the same
computation with a head axis of its own), so their heads can be pruned.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphprune.errors import BadInputError, short_message
from graphprune.execution.interpreter import TORCH_CALL
from graphprune.frontends.torch import converters  # noqa: F401  (fills CONVERTERS)
from graphprune.frontends.torch.attention import HeadPrunableAttention, swapped_attention
from graphprune.frontends.torch.builder import CONVERTERS, Builder, NotConverted, call_tensors, dims, dtype_name
from graphprune.frontends.torch.norms import fuse_rms_calls, fuse_rms_modules
from graphprune.ir.graph import ChannelGraph, OpNode, live_nodes

__all__ = ["TorchModel", "fx_channel_graph", "load_exported_program", "load_module", "program_torch_model", "to_channel_graph"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TorchModel:
    """A traced module: the program, its channel graph, and graph tensor -> module state name."""

    module: nn.Module | None
    program: torch.export.ExportedProgram | None  # None when traced with the torch.fx fallback
    graph: ChannelGraph
    state_names: dict[str, str]


def _replay(node: torch.fx.Node) -> Callable[..., Any]:
    """Call ``node.target`` with its traced arguments, the fx nodes replaced by the given tensors in order."""
    target, args, kwargs = node.target, node.args, dict(node.kwargs)

    def call(*tensors: Any) -> Any:
        it = iter(tensors)

        def sub(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                return next(it)
            if isinstance(a, (list, tuple)):
                return type(a)(next(it) if isinstance(x, torch.fx.Node) else x for x in a)
            return a

        return target(*(sub(a) for a in args), **{k: sub(v) for k, v in kwargs.items()})  # type: ignore[operator]

    return call


def _is_in_place(node: torch.fx.Node) -> bool:
    """``aten.relu_``, ``aten.add_.Tensor``...: the schema's overload packet name ends with an underscore."""
    name = str(node.target).split(".")
    return len(name) >= 2 and name[1].endswith("_") and not name[1].startswith("_") and bool(node.args) \
        and isinstance(node.args[0], torch.fx.Node)


def _is_shape_arithmetic(val: Any) -> bool:
    """A symbolic or plain scalar (``x.shape[0]``, ``c // 2``): shape bookkeeping, not a tensor op.

    The ONNX-form ops read sizes from tensor metadata, so these nodes are left out.
    """
    return isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def to_channel_graph(program: torch.export.ExportedProgram, module: nn.Module | None = None) -> tuple[ChannelGraph, dict[str, str]]:
    """Describe an ExportedProgram as a channel graph of ONNX-form ops (``module``: the module it was exported from,
    whose size attributes the ops then name).

    Returns:
        The graph and a map graph tensor name -> module state name.
    """
    sig = program.graph_signature
    state = {**program.state_dict, **getattr(program, "constants", {})}
    targets = {s.arg.name: s.target for s in sig.input_specs if s.target is not None}
    return fx_channel_graph(program.graph, targets, state, module)


def fx_channel_graph(fx_graph: torch.fx.Graph, targets: dict[str, str], state: dict[str, torch.Tensor],
                     module: nn.Module | None = None) -> tuple[ChannelGraph, dict[str, str]]:
    """Describe an aten-level fx graph (placeholders carrying ``val`` metadata) as a channel graph.

    Args:
        targets: Placeholder name -> module state name, for parameters, buffers and constants.
        state: Module state name -> tensor.
        module: The traced module, whose size attributes the ops name (see :class:`~graphprune.ir.graph.ArgRef`).
    """
    b = Builder(module)
    batch: dict[str, str] = {}
    state_names: dict[str, str] = {}
    inputs: list[str] = []
    scalars: set[str] = set()
    for node in fx_graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder":
            if node.name in targets:
                qual = targets[node.name]
                b.alias[node.name] = qual
                state_names[qual] = qual
                b.tensor(qual, dims(val, batch), dtype_name(val), "param")
                b.consts[qual] = state[qual].detach().cpu().numpy()
            else:
                inputs.append(node.name)
                b.tensor(node.name, dims(val, batch), dtype_name(val), "input")
        elif node.op == "call_function":
            key = str(node.target)
            if _is_shape_arithmetic(val):
                scalars.add(node.name)
                continue
            if key == "<built-in function getitem>":
                b.alias[node.name] = f"{b.name(node.args[0])}.{int(node.args[1])}"
                continue
            conv = CONVERTERS.get(key)
            b.converting(node, state_names)
            if isinstance(val, (tuple, list)):
                for i, v in enumerate(val):
                    b.tensor(f"{node.name}.{i}", dims(v, batch), dtype_name(v), "activation")
            else:
                b.tensor(node.name, dims(val, batch), dtype_name(val), "activation")
            try:
                if conv is None:
                    raise NotConverted(key)
                conv(b, node, node.name)
            except NotConverted:
                _aten_op(b, node, scalars)
            b.converting(None)
            if _is_in_place(node):
                # Later readers of the mutated tensor see the op's result (a view's base is not tracked).
                b.alias[node.args[0].name] = b.name(node)
    out_node = next(n for n in fx_graph.nodes if n.op == "output")
    outputs = tuple(b.name(a) for a in out_node.args[0] if isinstance(a, torch.fx.Node))
    infos = {k: dataclasses.replace(v, is_output=k in outputs) for k, v in b.tensors.items()}
    consts = b.consts
    graph = ChannelGraph(infos, live_nodes(b.nodes, outputs), tuple(inputs), outputs, lambda name: consts[name])
    return graph, state_names


def _aten_op(b: Builder, node: torch.fx.Node, scalars: set[str]) -> None:
    """A call without a converter: an ``aten``-domain op (its channels freeze), replayed as traced when it reads
    no shape arithmetic."""
    val = node.meta.get("val")
    found = call_tensors(node)
    tensors = [a for a in found if a.name not in scalars]
    outs = [f"{node.name}.{i}" for i in range(len(val))] if isinstance(val, (tuple, list)) else [node.name]
    attrs = {TORCH_CALL: _replay(node)} if len(tensors) == len(found) else {}
    b.nodes.append(OpNode(node.name, "aten", str(node.target), tuple(b.name(a) for a in tensors), tuple(outs), attrs, 1,
                          origin=b.origin()))


def _short(exc: BaseException) -> str:
    return short_message(exc, 300)


def load_module(module: nn.Module, example_inputs: Sequence[torch.Tensor], dynamic_batch: bool = True) -> TorchModel:
    """Trace ``module`` (eval mode) with torch.export (a dynamic batch when possible), else torch.fx.

    The fallback, for modules torch.export refuses (custom ops without a fake
    kernel, Python it cannot follow), checks the forward with
    ``torch.fx.symbolic_trace`` (which refuses data-dependent control flow) and
    lowers it to the same aten ops by running it once on the example inputs.

    Raises:
        BadInputError: When neither can trace the module; the message names the
            failing op or construct and suggests pruning the ONNX export instead.
    """
    module = module.eval()
    args = tuple(example_inputs)
    with swapped_attention(module):
        program, error = _export(module, args, dynamic_batch)
        if program is None:
            try:
                fx_graph, targets, state = _trace_fx(module, args)
            except Exception as exc:  # noqa: BLE001
                raise BadInputError(
                    f"cannot trace {type(module).__name__}: torch.export: {error}; torch.fx: {_short(exc)}; "
                    "export the model to ONNX and prune the ONNX file instead"
                ) from None
    if program is None:
        log.warning("torch.export cannot trace %s (%s); traced with torch.fx instead (static shapes)",
                    type(module).__name__, error)
        graph, names = fx_channel_graph(fx_graph, targets, state, module)
        return TorchModel(module, None, fuse_rms_modules(graph, module, names), names)
    graph, names = to_channel_graph(program, module)
    return TorchModel(module, program, fuse_rms_modules(graph, module, names), names)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], dynamic_batch: bool) -> tuple[Any, str]:
    """torch.export with a dynamic batch, else static; (program or None, the last error)."""
    attempts: list[dict[str, Any]] = []
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        attempts.append({"dynamic_shapes": tuple({0: batch} for _ in args)})
    attempts.append({})
    error = ""
    for extra in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.export.export(module, args, **extra), ""
        except Exception as exc:  # noqa: BLE001 - tracing failures are the user's model
            error = _short(exc)
    return None, error


class _LeafAttention(torch.fx.Tracer):
    """symbolic_trace, with the attention stand-in kept whole (its forward branches on its arguments)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, HeadPrunableAttention) or super().is_leaf_module(m, qualname)


def _trace_fx(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.fx.Graph, dict[str, str], dict[str, torch.Tensor]]:
    """symbolic_trace (no data-dependent Python), then make_fx on real tensors with the state as inputs.

    Passing parameters and buffers as inputs keeps their qualified names.
    """
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = torch.fx.GraphModule(module, _LeafAttention().trace(module))
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}

    def run(params: dict[str, torch.Tensor], *xs: torch.Tensor) -> Any:
        return functional_call(gm, params, xs)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = make_fx(run, tracing_mode="real", pre_dispatch=True)({k: v.detach() for k, v in state.items()}, *args)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    targets = {p.name: name for p, name in zip(placeholders, state)}
    return traced.graph, targets, {k: v.detach() for k, v in state.items()}


def load_exported_program(path: str | os.PathLike[str]) -> TorchModel:
    """Load a ``.pt2`` file saved with ``torch.export.save``.

    Raises:
        BadInputError: When the file is missing or not an ExportedProgram.
    """
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{p}: no such file")
    try:
        program = torch.export.load(str(p))
    except Exception as exc:  # noqa: BLE001
        raise BadInputError(f"{p}: not a saved ExportedProgram ({_short(exc)})") from None
    return program_torch_model(program)


def program_torch_model(program: torch.export.ExportedProgram) -> TorchModel:
    """A program with no module at hand as a TorchModel (its RMSNorm modules' arithmetic fused, :func:`fuse_rms_calls`)."""
    graph, names = to_channel_graph(program)
    return TorchModel(None, program, fuse_rms_calls(graph, program, names), names)
