"""The hidden-size rotation on a saved ``.pt2`` program: the same stream, math and report as on ONNX and modules.

:func:`slice_hidden_program` measures the stream's second moments at every
norm's input by interpreting the unlifted program (``program.module()``,
whose parameters keep their qualified names), takes the PCA basis
(:mod:`graphprune.recovery.rotation`), and writes a rotated copy: the
rotated and sliced parameters set on the unlifted module, every norm call
(``layer_norm``, or the ops of a fused RMSNorm module) replaced by a
:class:`~graphprune.backends.torch_rotation.UnitRMSNorm` call, a bias added
to a bias-free ``linear`` that takes a norm's shift, and the literal widths
of ``view`` / ``reshape`` / ``expand`` calls on the stream patched through
the argument their converter recorded. The copy is exported again (dynamic
batch when the original had one). A width hard-coded anywhere else fails
the slice with the reason; the full-width rotation is checked against the
input before anything is returned.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from graphprune.backends.exported_program import _dynamic_batch, _get_arg, _patched_list, _set_arg, example_inputs
from graphprune.backends.torch_rotation import UnitRMSNorm, _first_outputs, _owner, _set_parameter, _Unsupported
from graphprune.coupling.stream import Stream, find_stream
from graphprune.frontends.data import Calibration
from graphprune.ir.graph import ChannelGraph
from graphprune.recovery.rotation import HiddenOptions, HiddenReport, add_moment, rotated_constants, slice_measured

if TYPE_CHECKING:
    from graphprune.backends.torch_model import ProgramPrunable

__all__ = ["rotate_program", "slice_hidden_program", "untie_program"]

log = logging.getLogger(__name__)

Status = Callable[[str], None]


def _fx_nodes(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Graph tensor name -> fx node: a node's own name, and ``base.i`` for the ``getitem`` of output ``i`` of ``base``."""
    out = {n.name: n for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(n.target) == "<built-in function getitem>" and isinstance(n.args[0], torch.fx.Node):
            out.setdefault(f"{n.args[0].name}.{int(n.args[1])}", n)
    return out


def _node(nodes: Mapping[str, torch.fx.Node], tensor: str) -> torch.fx.Node:
    if tensor not in nodes:
        raise _Unsupported(f"the stream tensor '{tensor}' is not a value of the program's graph")
    return nodes[tensor]


class _Moments(torch.fx.Interpreter):
    """Run the unlifted program and add the second moment of every named node's value to ``sums``."""

    def __init__(self, gm: torch.fx.GraphModule, names: Mapping[str, str], centre: bool, sums: dict[str, np.ndarray]) -> None:
        super().__init__(gm)
        self.names, self.centre, self.sums = names, centre, sums

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names:
            add_moment(self.sums, self.names[n.name], value.detach().cpu().numpy(), self.centre)
        return value


def _measure(model: ProgramPrunable, stream: Stream, data: Calibration, options: HiddenOptions) -> dict[str, np.ndarray]:
    gm = model.program.module()
    nodes = _fx_nodes(gm)
    names = {_node(nodes, n.input).name: n.input for n in stream.norms}
    sums: dict[str, np.ndarray] = {}
    interpreter = _Moments(gm, names, stream.centred, sums)
    with torch.no_grad():
        for _, inputs, _ in data.subset(options.samples, options.seed).batches(options.batch_size):
            interpreter.run(*(torch.from_numpy(a) for a in inputs))
    return sums


def _replace_norms(gm: torch.fx.GraphModule, nodes: Mapping[str, torch.fx.Node], stream: Stream) -> None:
    """Every norm's output is read from a new :class:`UnitRMSNorm` call on its input (the old ops become dead)."""
    for i, norm in enumerate(stream.norms):
        x, out = _node(nodes, norm.input), _node(nodes, norm.output)
        qual = f"graphprune_unit_rms_{i}"
        gm.add_submodule(qual, UnitRMSNorm(stream.width, norm.epsilon))
        with gm.graph.inserting_before(out):
            new = gm.graph.call_module(qual, (x,))
        out.replace_all_uses_with(new)


def _add_biases(gm: torch.fx.GraphModule, graph: ChannelGraph, nodes: Mapping[str, torch.fx.Node], stream: Stream,
                state_names: Mapping[str, str], added: Mapping[str, np.ndarray]) -> None:
    """A bias on each bias-free ``linear`` reader that takes its norm's shift."""
    ops = {n.name: n for n in graph.nodes}
    readers = {r.node: r for r in stream.readers}
    for op_name, shift in added.items():
        origin = ops[op_name].origin
        call = nodes.get(origin.call) if origin is not None else None
        if call is None or str(call.target) != "aten.linear.default" or (len(call.args) > 2 and call.args[2] is not None):
            raise _Unsupported(f"'{op_name}' reads the stream with no bias to take its norm's shift")
        owner_name, leaf = _owner(state_names[readers[op_name].weight.tensor])
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if hasattr(owner, "bias"):
            raise _Unsupported(f"'{owner_name}' has a 'bias' attribute its linear call does not read")
        weight = getattr(owner, leaf)
        owner.register_parameter("bias", torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(shift)).to(weight.dtype)))
        with gm.graph.inserting_before(call):
            bias = gm.graph.get_attr(f"{owner_name}.bias" if owner_name else "bias")
        call.args = (call.args[0], call.args[1], bias)


def _patch_widths(graph: ChannelGraph, nodes: Mapping[str, torch.fx.Node], stream: Stream, kept: int) -> None:
    """Literal widths in ``view`` / ``reshape`` / ``expand`` calls on the stream follow the kept width."""
    users = {n.inputs[1]: n for n in graph.nodes if len(n.inputs) > 1}
    for side in stream.reshapes:
        op = users.get(side.tensor)
        origin = op.origin if op is not None else None
        ref = origin.inputs.get(1) if origin is not None else None
        call = nodes.get(origin.call) if origin is not None else None
        if ref is None or call is None:
            continue  # computed from tensors at run time: it follows the new width
        current = _get_arg(call, ref)
        if isinstance(current, (list, tuple)):
            _set_arg(call, ref, _patched_list(current, {side.axis: kept}, ref.offset))


def untie_program(program: torch.export.ExportedProgram) -> tuple[torch.export.ExportedProgram, list[str]]:
    """The program with every further op reading a parameter given its own copy (a GPT-2 LM head tied to its token
    embedding is a writer and a reader of the stream, which rotate differently); the names that got copies."""
    gm = program.module()
    copied = []
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or len(node.users) < 2:
            continue
        owner_name, leaf = _owner(str(node.target))
        owner = gm.get_submodule(owner_name) if owner_name else gm
        value = getattr(owner, leaf)
        if not isinstance(value, torch.nn.Parameter):
            continue
        for k, user in enumerate(list(node.users)[1:], 1):
            new_leaf = f"{leaf}_untied{k}"
            owner.register_parameter(new_leaf, torch.nn.Parameter(value.detach().clone(), value.requires_grad))
            with gm.graph.inserting_before(user):
                copy = gm.graph.get_attr(f"{owner_name}.{new_leaf}" if owner_name else new_leaf)
            user.replace_input_with(node, copy)
            copied.append(str(node.target))
    if not copied:
        return program, []
    gm.recompile()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(gm, example_inputs(program), dynamic_shapes=_dynamic_batch(program)), copied


def rotate_program(model: ProgramPrunable, stream: Stream, basis: np.ndarray) -> torch.export.ExportedProgram:
    """A new program with the stream rotated into ``basis`` (D x k) and its norms made :class:`UnitRMSNorm`.

    Raises:
        _Unsupported: A constant of the stream is not a program parameter, a bias-free reader is not a ``linear``
            call, or the rotated program does not export again.
    """
    tm = model.tm
    values, added = rotated_constants(stream, tm.graph.param, basis)
    frontend = {s.tensor for s in stream.reshapes}
    gm = model.program.module()
    nodes = _fx_nodes(gm)
    with torch.no_grad():
        for name, value in values.items():
            if name in frontend:
                continue
            if name not in tm.state_names:
                raise _Unsupported(f"'{name}' is a constant of the traced graph, not a parameter of the program")
            _set_parameter(gm, tm.state_names[name], value)
        _add_biases(gm, tm.graph, nodes, stream, tm.state_names, added)
    _replace_norms(gm, nodes, stream)
    _patch_widths(tm.graph, nodes, stream, basis.shape[1])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(gm, example_inputs(model.program), dynamic_shapes=_dynamic_batch(model.program))
    except Exception as exc:  # noqa: BLE001 - a width the rewrite did not reach
        raise _Unsupported(f"the rotated program does not export again ({str(exc).splitlines()[0][:200]}): a width "
                           "is hard-coded where the rewrite does not reach; rotate the ONNX export instead") from None


def _program_outputs(program: torch.export.ExportedProgram, data: Calibration, batch_size: int) -> np.ndarray:
    return _first_outputs(program.module(), data, batch_size, set_eval=False)


def slice_hidden_program(model: ProgramPrunable, data: Calibration, eval_data: Calibration | None,
                         options: HiddenOptions, status: Status | None = None) -> tuple[ProgramPrunable, HiddenReport]:
    """Rotate and slice the hidden stream of a program (the input is not modified).

    Returns:
        (the new model, or ``model`` itself when the stream is frozen; the report).

    Raises:
        BadInputError: No norm over a hidden axis in the model.
        ValidationError: The full-width rotation does not reproduce the program.
    """
    from graphprune.backends.torch_model import program_model

    say = status or (lambda _: None)
    original = model
    program, copied = untie_program(model.program)
    if copied:
        say(f"untied {len(copied)} shared parameter(s) ({', '.join(copied[:3])}): a tied writer and reader rotate differently")
        model = program_model(program)
    stream = find_stream(model.graph)  # a model with no norm is bad input
    if stream.frozen:
        return original, HiddenReport(stream.width, frozen=stream.frozen)
    say(f"measuring the hidden stream ({len(stream.norms)} norms, width {stream.width})")
    try:
        moments = _measure(model, stream, data, options)
        sliced, report = slice_measured(stream, moments, original.program, data, eval_data, options,
                                        lambda basis: rotate_program(model, stream, basis),
                                        lambda p, d: _program_outputs(p, d, options.batch_size), "program", say)
    except _Unsupported as exc:
        return original, HiddenReport(stream.width, frozen=str(exc))
    return program_model(sliced), report
