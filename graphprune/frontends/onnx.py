"""ONNX frontend: load a model with onnx-ir and describe it as a ChannelGraph."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    RemoveInitializersFromInputsPass,
    ShapeInferencePass,
)
from onnxscript.optimizer import fold_constants

from graphprune.errors import BadInputError, short_message
from graphprune.execution.sessions import make_session, sample_inputs
from graphprune.frontends.canonical import fold_batch_transposes
from graphprune.frontends.symbolic_shapes import symbolic_shapes
from graphprune.ir.dtypes import WEIGHT_TYPES
from graphprune.ir.graph import ChannelGraph, Dim, OpNode, TensorInfo, TensorKind
from graphprune.ir.onnx import inline_proto, node_name

__all__ = ["COPY_OF", "ORT_DEFAULT_DOMAIN_OPS", "OnnxModel", "check_onnx", "load_onnx", "prepare", "to_channel_graph", "unshare_constants"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class OnnxModel:
    """An ONNX model ready for analysis.

    Attributes:
        model: The onnx-ir model (constants lifted, shapes inferred).
        graph: Its channel graph.
        path: Where it was loaded from, if anywhere.
    """

    model: ir.Model
    graph: ChannelGraph
    path: Path | None = None


def load_onnx(path: str | os.PathLike[str]) -> OnnxModel:
    """Load, check and prepare an ONNX file.

    Raises:
        BadInputError: When the file is missing, empty, corrupt or not valid ONNX.
    """
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise BadInputError(f"{p}: file is empty")
    try:
        model = ir.load(p)
    except Exception as exc:  # noqa: BLE001 - any parser failure means bad input
        raise BadInputError(f"{p}: not a readable ONNX model ({_short(exc)})") from None
    _check_external_paths(model, p)
    try:
        check_onnx(p)
    except Exception as exc:  # noqa: BLE001 - the checker raises several unrelated types, all meaning bad input
        raise BadInputError(f"{p}: invalid ONNX model ({_short(exc)})") from None
    return prepare(model, p)


ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})
"""Ops onnxruntime registers in the default domain that the ONNX standard does not define (its transformer optimizer
writes RMS norms as ``SimplifiedLayerNormalization``): a model holding them is checked with them as contrib ops."""


def check_onnx(path: Path, full_check: bool = False) -> None:
    """``onnx.checker.check_model`` on the file, with :data:`ORT_DEFAULT_DOMAIN_OPS` checked as contrib ops (moved to
    a contrib domain in a copy; the file is not changed) when they are what the check fails on.

    Raises:
        Exception: The checker's error (several types) on any other failure.
    """
    try:
        onnx.checker.check_model(str(path), full_check=full_check)
        return
    except Exception as exc:  # re-raised unless only the onnxruntime ops failed
        if not any(f"No Op registered for {op} " in str(exc) for op in ORT_DEFAULT_DOMAIN_OPS):
            raise
    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in ORT_DEFAULT_DOMAIN_OPS:
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(proto)  # no full check: shape inference does not know the moved ops


def prepare(model: ir.Model, path: Path | None = None) -> OnnxModel:
    """Normalise an in-memory model (lift constants, infer shapes) and build its graph.

    Raises:
        BadInputError: When the graph has a cycle or reads undefined tensors.
    """
    RemoveInitializersFromInputsPass()(model)
    try:
        fold_constants(model, should_fold=_keeps_stored_dtype)
    except Exception as exc:  # noqa: BLE001 - folding is an optimisation only
        log.warning("constant folding failed: %s", _short(exc))
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    unshare_constants(model)
    try:
        ShapeInferencePass(strict_mode=False)(model)
    except Exception as exc:  # noqa: BLE001 - shape inference is best effort
        log.warning("shape inference failed: %s", _short(exc))
    graph = to_channel_graph(model)
    known: dict[str, tuple[Dim, ...]] | None = None
    if _unresolved(graph):
        shapes = _better_shapes(graph, symbolic_shapes(model))
        if shapes:
            known = shapes
            graph = to_channel_graph(model, known)
        if _unresolved(graph):
            observed = observe_shapes(model, graph)
            if observed:
                known = {**shapes, **observed}
                graph = to_channel_graph(model, known)
    if fold_batch_transposes(model, graph):
        graph = to_channel_graph(model, known)
    return OnnxModel(model, graph, path)


COPY_OF = "graphprune.copy_of"
"""``Value.meta`` key naming the initializer a load-time copy was made from."""


def unshare_constants(model: ir.Model) -> int:
    """Give every further use of a shared uniform weight constant its own initializer (the same tensor, not copied).

    Exporters and optimizers share equal constants (onnxruntime's optimizer
    leaves the zero biases of a randomly initialised BERT's query, key and
    value layers and of its norms as one tensor); read as one tensor, they
    would tie the heads to the frozen hidden stream and the layers to each
    other. Only constants whose elements are all equal (zeros, ones) are
    copied: a shared tensor of distinct values is a deliberate tie (one
    weight read by two layers), and its layers keep losing the same channels.
    A copy is marked in ``Value.meta`` (:data:`COPY_OF`); the ONNX
    backend merges copies that are still equal after pruning, and the cost
    model does not count them. Integer constants (shape vectors, indices)
    and constants without an axis longer than 1 stay shared.

    Returns:
        The number of copies made.
    """
    graph = model.graph
    made = 0
    taken: set[str | None] = {*graph.initializers, *(v.name for v in graph.inputs)}
    taken |= {v.name for n in graph.all_nodes() for v in n.outputs}
    outputs = {id(v) for v in graph.outputs}
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        uses = list(value.uses())
        if len(uses) < 2 or tensor is None or id(value) in outputs or value.dtype is None:
            continue
        if value.dtype.name not in WEIGHT_TYPES or not any(isinstance(d, int) and d > 1 for d in tensor.shape):
            continue
        values = tensor.numpy()
        if values.size == 0 or not np.all(values == values.flat[0]):
            continue  # distinct values: a deliberate tie
        for node, index in uses[1:]:
            k = 1
            while f"{name}_use{k}" in taken:
                k += 1
            copy = ir.Value(name=f"{name}_use{k}", shape=value.shape, type=value.type, const_value=tensor)
            copy.meta[COPY_OF] = name
            taken.add(copy.name)
            graph.register_initializer(copy)
            node.replace_input_with(index, copy)
            made += 1
    if made:
        log.debug("%d uses of shared constants got their own initializer", made)
    return made


def _better_shapes(graph: ChannelGraph, found: dict[str, tuple[Dim, ...]]) -> dict[str, tuple[Dim, ...]]:
    """Symbolically inferred activation shapes that resolve more dims than ONNX's inference did."""
    named = _named_dims(graph)
    out: dict[str, tuple[Dim, ...]] = {}
    for name, dims in found.items():
        info = graph.tensors.get(name)
        if info is None or info.kind != "activation":
            continue
        if info.shape is None or (len(info.shape) == len(dims) and _resolved(dims, named) > _resolved(info.shape, named)):
            out[name] = dims
    return out


_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _named_dims(graph: ChannelGraph) -> set[str]:
    return {d for n in graph.inputs for d in graph.tensors[n].shape or () if isinstance(d, str)}


def _known(d: Dim, named: set[str]) -> bool:
    """A static dim, an input's named dim, or an expression of input dims (``4*batch``)."""
    if isinstance(d, int):
        return True
    return isinstance(d, str) and (d in named or (all(s in named for s in _SYMBOL.findall(d)) and bool(_SYMBOL.search(d))))


def _resolved(dims: tuple[Dim, ...], named: set[str]) -> int:
    return sum(_known(d, named) for d in dims)


_DTYPE_CHANGES = {"Cast", "CastLike", "DequantizeLinear", "QuantizeLinear"}


def _keeps_stored_dtype(node: ir.Node) -> bool | None:
    """Folding must not turn fp16/bf16/int8 weights into float32 ones: dtype changes of weights stay in the graph."""
    if node.op_type not in _DTYPE_CHANGES:
        return None
    for value in node.inputs:
        if value is not None and value.is_initializer() and value.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
            return False
    return None


def _unresolved(graph: ChannelGraph) -> bool:
    """Whether some activation shape is unknown or has a dim not named by an input."""
    named = _named_dims(graph)
    for info in graph.tensors.values():
        if info.kind != "activation":
            continue
        if info.shape is None or not all(_known(d, named) for d in info.shape):
            return True
    return False


def observe_shapes(model: ir.Model, graph: ChannelGraph) -> dict[str, tuple[Dim, ...]]:
    """Shapes seen by running the model twice with different dynamic dims.

    Dims equal in both runs are static; the others get a shared symbolic
    name. Returns {} when the model cannot run on onnxruntime.
    """
    try:
        proto = inline_proto(model)
        known = {o.name for o in proto.graph.output}
        for node in proto.graph.node:
            for name in node.output:
                if name and name not in known:
                    proto.graph.output.append(onnx.ValueInfoProto(name=name))
                    known.add(name)
        session = make_session(proto.SerializeToString(), optimize=False, threads=1)
        names = [o.name for o in session.get_outputs()]
        runs = []
        for batch, scale in ((1, 1), (2, 2)):
            feeds = sample_inputs(graph, batch=batch, scale=scale)
            outs = session.run(None, feeds)
            runs.append({**{k: v.shape for k, v in feeds.items()}, **{n: np.shape(o) for n, o in zip(names, outs)}})
    except Exception as exc:  # noqa: BLE001 - observation is best effort
        log.warning("could not run the model to observe shapes: %s", _short(exc))
        return {}
    shapes: dict[str, tuple[Dim, ...]] = {}
    for name, a in runs[0].items():
        b = runs[1].get(name)
        if b is None or len(a) != len(b):
            continue
        shapes[name] = tuple(int(x) if x == y else f"?{x}/{y}" for x, y in zip(a, b))
    return _declared_names(shapes, graph)


def _declared_names(shapes: dict[str, tuple[Dim, ...]], graph: ChannelGraph) -> dict[str, tuple[Dim, ...]]:
    """Inputs keep their declared dims; an observed dim that only one declared input dim explains takes its name."""
    seen: dict[Dim, set[str]] = {}
    for name in graph.inputs:
        for declared, observed in zip(graph.tensors[name].shape or (), shapes.get(name, ())):
            if isinstance(declared, str) and isinstance(observed, str):
                seen.setdefault(observed, set()).add(declared)
    rename = {tok: next(iter(names)) for tok, names in seen.items() if len(names) == 1}
    return {n: tuple(rename.get(d, d) for d in dims) for n, dims in shapes.items() if n not in graph.inputs}


def _short(exc: BaseException) -> str:
    return short_message(exc)


def _check_external_paths(model: ir.Model, path: Path) -> None:
    """Refuse external data that points outside the model's folder."""
    root = path.resolve().parent
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            target = (root / tensor.location).resolve()
            if root not in target.parents:
                raise BadInputError(f"{path}: external data '{tensor.location}' lies outside the model's folder")


def _value_name(value: ir.Value) -> str:
    """The name of a graph input, initializer or output; every such value must have one."""
    if value.name is None:
        raise BadInputError("the graph has an unnamed input, initializer or output: give every graph value a name")
    return value.name


def _dims(value: ir.Value) -> tuple[Dim, ...] | None:
    if value.shape is None:
        return None
    out: list[Dim] = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value if isinstance(d.value, str) else None)
    return tuple(out)


def _attr(attr: Any) -> Any:
    kind = attr.type
    if kind == ir.AttributeType.TENSOR:
        return attr.value.numpy()
    if kind in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return "<graph>"
    if kind in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return tuple(attr.value)
    return attr.value


def _outer_refs(node: ir.Node) -> tuple[str, ...]:
    """Names used inside the node's subgraphs but defined outside them."""
    defined: set[str] = set()
    used: set[str] = set()
    for attr in node.attributes.values():
        if attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            continue
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else list(attr.value)
        for sub in graphs:
            defined.update(v.name for v in sub.inputs if v.name)
            defined.update(sub.initializers)
            for inner in ir.traversal.RecursiveGraphIterator(sub):
                defined.update(o.name for o in inner.outputs if o.name)
                used.update(i.name for i in inner.inputs if i is not None and i.name)
            used.update(o.name for o in sub.outputs if o.name)
    return tuple(sorted(used - defined))


def _topological(nodes: list[OpNode], produced: dict[str, int]) -> list[OpNode]:
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(nodes)))
    for k, node in enumerate(nodes):
        for name in (*node.inputs, *node.subgraph_refs):
            if name in produced and produced[name] != k:
                dag.add_edge(produced[name], k)
    try:
        order = list(nx.lexicographical_topological_sort(dag))
    except nx.NetworkXUnfeasible:
        raise BadInputError("the graph has a cycle") from None
    return [nodes[k] for k in order]


def to_channel_graph(model: ir.Model, shapes: dict[str, tuple[Dim, ...]] | None = None) -> ChannelGraph:
    """Describe an onnx-ir model as a format-agnostic channel graph.

    Args:
        model: The model.
        shapes: Observed shapes that replace the inferred ones.

    Raises:
        BadInputError: On duplicate tensor names, undefined inputs or cycles.
    """
    g = model.graph
    tensors: dict[str, TensorInfo] = {}
    outputs = {v.name for v in g.outputs}
    copies: dict[str, str] = {}

    def add(value: ir.Value, kind: TensorKind) -> None:
        name = _value_name(value)
        if name in tensors:
            raise BadInputError(f"tensor '{name}' is defined twice")
        dtype = value.dtype.name if value.dtype is not None else "UNDEFINED"
        shape = shapes[name] if shapes and name in shapes else _dims(value)
        tensors[name] = TensorInfo(name, shape, dtype, kind, name in outputs)
        original = value.meta.get(COPY_OF)
        if kind == "param" and isinstance(original, str) and original in g.initializers:
            copies[name] = original

    for value in g.inputs:
        add(value, "input")
    for value in g.initializers.values():
        add(value, "param")
    nodes: list[OpNode] = []
    produced: dict[str, int] = {}
    opsets = dict(model.opset_imports)
    for k, node in enumerate(g):
        refs = _outer_refs(node)
        has_sub = any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
        for out in node.outputs:
            if out.name:
                add(out, "activation")
                produced[out.name] = k
        domain = "" if node.domain == "ai.onnx" else node.domain
        nodes.append(
            OpNode(
                name=node_name(node, k),
                domain=domain,
                op_type=node.op_type,
                inputs=tuple((i.name or "") if i is not None else "" for i in node.inputs),
                outputs=tuple(o.name or "" for o in node.outputs),
                attrs={name: _attr(a) for name, a in node.attributes.items()},
                opset=int(opsets.get(domain, opsets.get("ai.onnx", 0)) or 0),
                subgraph_refs=refs,
                has_subgraph=has_sub,
            )
        )
    for op in nodes:
        for name in (*op.inputs, *op.subgraph_refs):
            if name and name not in tensors:
                raise BadInputError(f"node '{op.name}' reads undefined tensor '{name}'")
    for value in g.outputs:
        if value.name not in tensors:
            raise BadInputError(f"graph output '{value.name}' is never produced")
    cache: dict[str, np.ndarray] = {}

    def load(name: str) -> np.ndarray:
        """In-memory weights are cached; external ones are read afresh, so only the arrays in use stay resident."""
        if name in cache:
            return cache[name]
        tensor = g.initializers[name].const_value
        if tensor is None:
            raise BadInputError(f"initializer '{name}' has no data")
        try:
            if isinstance(tensor, ir.ExternalTensor):
                arr = np.array(tensor.numpy())
                tensor.release()
                return arr
            cache[name] = tensor.numpy()
        except ValueError as exc:  # raw bytes that do not fit the declared type and shape
            raise BadInputError(f"initializer '{name}' is corrupt: its data does not match its type and shape ({exc})") from exc
        return cache[name]

    return ChannelGraph(
        tensors=tensors,
        nodes=_topological(nodes, produced),
        inputs=tuple(_value_name(v) for v in g.inputs),
        outputs=tuple(_value_name(v) for v in g.outputs),
        constant_loader=load,
        copies=copies,
    )
