"""The hidden-size rotation on an ONNX model: stream moments on onnxruntime, the onnx-ir rewrite, the measured error.

:func:`slice_hidden` finds the stream (:func:`graphprune.coupling.stream.find_stream`),
measures its second moments at every norm input on calibration data, takes
the PCA basis (:mod:`graphprune.recovery.rotation`), writes the rotated and
sliced constants, replaces every norm by a unit-scale RMS norm that divides
by the original width (``RMSNormalization`` from opset 23, else
Pow/ReduceMean/Add/Sqrt/Div/Mul, which onnxruntime fuses; onnxruntime's
fused ``SkipLayerNormalization`` becomes one ``SkipSimplifiedLayerNormalization``),
and measures the output error against the input model. Norms an exporter wrote as arithmetic (below opset 17
for LayerNorm, 23 for RMSNorm) are fused into one op first (:func:`graphprune.frontends.canonical.fuse_decomposed_norms`),
on a copy; the rotation then replaces them like any norm. It also checks that the full-width rotation reproduces the
input model; when it does not, nothing is returned.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from graphprune.coupling.stream import Norm, Stream, find_stream
from graphprune.frontends.canonical import fuse_decomposed_norms
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import OnnxModel, prepare
from graphprune.ir.onnx import clone_model, inline_proto, model_session, new_const, node_map
from graphprune.ops.contrib import SKIP_NORMS
from graphprune.recovery.rotation import HiddenOptions, HiddenReport, add_moment, rotated_constants, slice_measured

__all__ = ["rotatable", "rotate_onnx", "slice_hidden", "stream_moments", "unshared", "with_sums"]

log = logging.getLogger(__name__)

Status = Callable[[str], None]


def stream_moments(om: OnnxModel, names: Sequence[str], data: Calibration, batch_size: int, centre: bool = False) -> dict[str, np.ndarray]:
    """Second moment (D x D, float64) of the unit-length tokens of each named tensor (hidden axis last) on ``data``
    (:func:`graphprune.recovery.rotation.add_moment`)."""
    from graphprune.execution.sessions import make_session

    proto = inline_proto(om.model)
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    session = make_session(proto.SerializeToString())
    feeds = [i.name for i in session.get_inputs()]
    sums: dict[str, np.ndarray] = {}
    for _, inputs, _ in data.batches(batch_size):
        outs = session.run(list(names), dict(zip(feeds, inputs)))
        for name, x in zip(names, outs):
            add_moment(sums, name, x, centre)
    return sums


def _unit_rms(norm: Norm, width: int, kept: int, graph: ir.Graph, dtype: np.dtype) -> tuple[ir.Value, float]:
    """The scale constant ``sqrt(width / kept)`` and the epsilon ``eps * width / kept`` that make an RMS norm over
    ``kept`` entries divide by the original ``width``."""
    scale = new_const(graph, f"{norm.node}_rms_scale", np.full(kept, np.sqrt(width / kept), dtype=dtype))
    return scale, float(norm.epsilon * width / kept)


def _rms_nodes(norm: Norm, x: ir.Value, width: int, kept: int, opset: int, graph: ir.Graph, dtype: np.dtype) -> list[ir.Node]:
    """Unit-scale RMS norm over the last axis of ``x`` (``kept`` wide) dividing by the original ``width``: x / sqrt(sum x^2 / width + eps).

    Over ``kept`` entries that is ``x * s / sqrt(mean x^2 + eps * width / kept)`` with ``s = sqrt(width / kept)``:
    ``RMSNormalization`` from opset 23, else Pow/ReduceMean/Add/Sqrt/Div/Mul, the pattern onnxruntime fuses into
    one ``SimplifiedLayerNormalization`` when it loads the model."""
    scale, eps = _unit_rms(norm, width, kept, graph, dtype)
    if opset >= 23:
        return [ir.node("RMSNormalization", [x, scale], {"axis": -1, "epsilon": eps}, name=f"{norm.node}_rms")]
    two = new_const(graph, f"{norm.node}_two", np.array(2.0, dtype=dtype))
    sq = ir.node("Pow", [x, two], name=f"{norm.node}_sq")
    if opset >= 18:
        axes = new_const(graph, f"{norm.node}_axes", np.array([-1], dtype=np.int64))
        mean = ir.node("ReduceMean", [sq.outputs[0], axes], {"keepdims": 1}, name=f"{norm.node}_mean")
    else:
        mean = ir.node("ReduceMean", [sq.outputs[0]], {"axes": [-1], "keepdims": 1}, name=f"{norm.node}_mean")
    epsilon = new_const(graph, f"{norm.node}_eps", np.array(eps, dtype=dtype))
    var = ir.node("Add", [mean.outputs[0], epsilon], name=f"{norm.node}_var")
    root = ir.node("Sqrt", [var.outputs[0]], name=f"{norm.node}_root")
    div = ir.node("Div", [x, root.outputs[0]], name=f"{norm.node}_div")
    out = ir.node("Mul", [div.outputs[0], scale], name=f"{norm.node}_rms")
    return [sq, mean, var, root, div, out]


def _skip_rms_node(norm: Norm, node: ir.Node, width: int, kept: int, graph: ir.Graph, dtype: np.dtype) -> ir.Node:
    """onnxruntime's fused residual Add + norm as a unit-scale ``SkipSimplifiedLayerNormalization`` over ``kept`` entries
    dividing by the original ``width`` (the fusion stays one op; its bias, already rotated, moves to input 3).

    Without a bias of its own it takes one from a bias ``Add`` that feeds only it (onnxruntime folds such an Add into
    ``SkipLayerNormalization`` when it loads the model, not into the simplified op: left alone it would add an op)."""
    index = SKIP_NORMS[node.op_type][2]
    bias = node.inputs[index] if len(node.inputs) > index else None
    inputs = [node.inputs[0], node.inputs[1]]
    if bias is None:
        for i, value in enumerate(inputs):
            folded = _bias_add(value, kept)
            if folded is not None:
                inputs[i], bias = folded
                break
    scale, eps = _unit_rms(norm, width, kept, graph, dtype)
    new = ir.node("SkipSimplifiedLayerNormalization", [*inputs, scale] + ([bias] if bias is not None else []),
                  {"epsilon": eps}, domain="com.microsoft", num_outputs=4, name=f"{norm.node}_rms")
    for value in new.outputs[1:3]:
        value.name = ""
    return new


def _bias_add(value: ir.Value | None, kept: int) -> tuple[ir.Value, ir.Value] | None:
    """(the other addend, the bias) when ``value`` is ``Add(y, bias)`` with a constant ``bias`` of ``kept`` entries used
    once, ``y`` not a constant, and ``value`` read by one op only."""
    add = value.producer() if value is not None else None
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(value.uses()) != 1:  # type: ignore[union-attr]
        return None
    a, b = add.inputs[0], add.inputs[1]
    for y, bias in ((a, b), (b, a)):
        if (y is not None and bias is not None and y.const_value is None and bias.const_value is not None
                and tuple(bias.const_value.shape) == (kept,) and len(bias.uses()) == 1):
            return y, bias
    return None


def with_sums(om: OnnxModel) -> OnnxModel:
    """``om`` with every fused ``Skip(Simplified)LayerNormalization`` giving its sum as output 3 (the stream point the
    hidden pass measures and rotates), or ``om`` when all do."""
    model = clone_model(om.model)
    return prepare(model, om.path) if _add_sums(model) else om


def _add_sums(model: ir.Model) -> bool:
    """:func:`with_sums` in place; whether anything changed."""
    changed = False
    for node in model.graph:
        if node.domain != "com.microsoft" or node.op_type not in SKIP_NORMS:
            continue
        if len(node.outputs) > 3 and node.outputs[3].name:
            continue
        count = len(node.outputs)
        node.resize_outputs(4)
        for value in node.outputs[count:3]:
            value.name = ""
        node.outputs[3].name = f"{node.name}_sum"
        changed = True
    return changed


def rotatable(om: OnnxModel) -> tuple[OnnxModel, int]:
    """What the walk reads: ``om`` with each use of a shared constant its own (:func:`unshared`), every fused norm's
    sum output (:func:`with_sums`) and every norm written as arithmetic fused into one op (the walk puts every norm
    on one stream or freezes it, so when the pass goes on it replaces every fused op); one copy, shapes inferred once.
    ``om`` itself when nothing changes; and how many norms were fused."""
    model = clone_model(om.model)
    copied, summed = _unshare(model), _add_sums(model)
    count = len(fuse_decomposed_norms(model))
    return (prepare(model, om.path), count) if copied or summed or count else (om, 0)


def _replace(graph: ir.Graph, old: ir.Node, new: list[ir.Node]) -> None:
    ir.convenience.replace_nodes_and_values(graph, old, [old], new, [old.outputs[0]], [new[-1].outputs[0]])


def rotate_onnx(om: OnnxModel, stream: Stream, basis: np.ndarray) -> OnnxModel:
    """A copy of ``om`` with the stream rotated into ``basis`` (D x k) and its norms made unit-scale RMS norms."""
    model = clone_model(om.model)
    graph = model.graph
    values, added = rotated_constants(stream, om.graph.param, basis)
    for name, arr in values.items():
        value = graph.initializers[name]
        value.const_value = ir.tensor(arr, name=name)
        value.shape = ir.Shape(arr.shape)
    nodes = node_map(graph)
    opset = model.opset_imports.get("", 17)
    kept = basis.shape[1]
    for norm in stream.norms:
        node = nodes[norm.node]
        x = node.inputs[0]
        assert x is not None  # the walk found the norm's input
        dtype = np.dtype(x.dtype.numpy()) if x.dtype is not None else np.dtype(np.float32)
        if norm.skip:
            fused = _skip_rms_node(norm, node, stream.width, kept, graph, dtype)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [fused], [node.outputs[0], node.outputs[3]],
                                                    [fused.outputs[0], fused.outputs[3]])
            continue
        _replace(graph, node, _rms_nodes(norm, x, stream.width, kept, opset, graph, dtype))
    for reader, shift in added.items():
        node = nodes[reader]
        bias = new_const(graph, f"{reader}_shift", shift)
        if node.op_type == "Gemm":
            node.resize_inputs(3)
            node.replace_input_with(2, bias)
            continue
        product = ir.node(node.op_type, list(node.inputs), node.attributes, name=f"{reader}_rotated")
        add = ir.node("Add", [product.outputs[0], bias], name=f"{reader}_shift")
        _replace(graph, node, [product, add])
    for name in stream.widths:  # the width read at run time for tensors off the stream stays the original one
        node = nodes[name]
        width = new_const(graph, f"{name}_width", np.array(stream.width, dtype=np.int64))
        ir.convenience.replace_all_uses_with(node.outputs[0], width)
    RemoveUnusedNodesPass()(model)
    graph_outputs = set(id(v) for v in graph.outputs)
    for node in graph:  # shapes inferred for the old width are stale; prepare infers them again
        for value in node.outputs:
            if id(value) not in graph_outputs:
                value.shape = None
    return prepare(model, om.path)


def unshared(om: OnnxModel) -> OnnxModel:
    """``om`` with every initializer read by several ops copied once per op (exporters share equal constants, such as
    the zero biases of several layers or a Reshape target; the rotation rewrites each use on its own), or ``om`` when none is."""
    model = clone_model(om.model)
    return prepare(model, om.path) if _unshare(model) else om


def _unshare(model: ir.Model) -> bool:
    """:func:`unshared` in place; whether anything changed."""
    graph = model.graph
    changed = False
    for name, value in list(graph.initializers.items()):
        users = [(node, i) for node, i in value.uses()]
        if len(users) < 2 or value.const_value is None:
            continue
        arr = value.const_value.numpy()
        for node, i in users[1:]:
            node.replace_input_with(i, new_const(graph, name, arr.copy()))
        changed = True
    return changed


def _outputs(om: OnnxModel, data: Calibration, batch_size: int) -> np.ndarray:
    """The first output of ``om`` on every sample of ``data``."""
    with model_session(om.model) as session:
        feeds = [i.name for i in session.get_inputs()]
        parts = [session.run(None, dict(zip(feeds, inputs)))[0] for _, inputs, _ in data.batches(batch_size)]
    return np.concatenate(parts)


def slice_hidden(om: OnnxModel, data: Calibration, eval_data: Calibration | None, options: HiddenOptions,
                 status: Status | None = None) -> tuple[OnnxModel, HiddenReport]:
    """Rotate and slice the hidden stream of ``om`` (the input is not modified).

    Returns:
        (the new model, or ``om`` itself when the stream is frozen; the report).

    Raises:
        BadInputError: No norm over a hidden axis in the model.
        ValidationError: The full-width rotation does not reproduce the model (a bug or an op the walk misread).
    """
    say = status or (lambda _: None)
    original = om
    om, fused = rotatable(om)
    stream = find_stream(om.graph)  # a model with no norm is bad input
    if stream.frozen:
        return original, HiddenReport(stream.width, frozen=stream.frozen)
    if fused:
        say(f"fused {fused} norms written as arithmetic (Pow/ReduceMean/Sqrt...) into one op each")
    say(f"measuring the hidden stream ({len(stream.norms)} norms, width {stream.width})")
    calib = data.subset(options.samples, options.seed)
    moments = stream_moments(om, [n.input for n in stream.norms], calib, options.batch_size, stream.centred)
    return slice_measured(stream, moments, original, data, eval_data, options, lambda basis: rotate_onnx(om, stream, basis),
                          lambda m, d: _outputs(m, d, options.batch_size), "model", say)
