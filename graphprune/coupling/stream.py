"""The hidden stream of a transformer: its norms, writers and readers, found on the channel graph.

A pre-norm transformer adds every sub-layer's output to one residual stream
and reads the stream only through norms over its last axis
(``LayerNormalization``, ``RMSNormalization``, ``SimplifiedLayerNormalization``,
and onnxruntime's fused residual Add + norm ``Skip(Simplified)LayerNormalization``,
whose addends and sum output lie on the stream).
:func:`find_stream` walks the graph from those norms and classifies every op
that touches the stream:

- **writers**: constants whose output axis is the stream (linear, conv and
  embedding weights, biases and constants added to the stream);
- **norms**: read the stream, write the normalised stream;
- **readers**: linear weights that read the normalised stream (after
  pass-through ops such as a mean over tokens or a class-token gather);
- layout ops (Transpose, Reshape, Flatten...) that move the stream's axis.

Anything else freezes the stream with the reason (an op that reads the
stream without a norm, a post-LN residual Add on a norm's output, a shared
weight...); the walk never guesses. The result is plain data
(:class:`Stream`) that the rotation (:mod:`graphprune.recovery.rotation`)
turns into new constants.

Example:
    >>> Side("w", 1)
    Side(tensor='w', axis=1)
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from graphprune.errors import BadInputError
from graphprune.ir.dtypes import by_code
from graphprune.ir.graph import ChannelGraph, OpNode
from graphprune.ops.contrib import SKIP_NORMS

__all__ = ["BIASED_ACTIVATIONS", "NORM_OPS", "Norm", "Reader", "Side", "Stream", "find_stream"]

log = logging.getLogger(__name__)

NORM_OPS = {("", "LayerNormalization"): True, ("", "RMSNormalization"): False,
            ("", "SimplifiedLayerNormalization"): False, ("com.microsoft", "SimplifiedLayerNormalization"): False,
            ("com.microsoft", "SkipLayerNormalization"): True, ("com.microsoft", "SkipSimplifiedLayerNormalization"): False}
"""Norms the stream is read through, and whether each subtracts the mean (LayerNorm) or not (RMS)."""

BIASED_ACTIVATIONS = {"BiasGelu", "FastGelu", "BiasAdd"}
"""com.microsoft ops that add their input 1 (a constant bias) to input 0: a reader's bias when they follow it."""


@dataclasses.dataclass(frozen=True)
class Side:
    """One constant and the axis of it that lies along the stream."""

    tensor: str
    axis: int


@dataclasses.dataclass(frozen=True)
class Norm:
    """A norm over the stream: its tensors, constants, epsilon and whether it centres (LayerNorm)."""

    node: str
    input: str
    output: str
    scale: str
    bias: str
    epsilon: float
    centred: bool
    skip: bool = False
    """onnxruntime's ``Skip(Simplified)LayerNormalization``: ``input`` is its sum output (output 3)."""


@dataclasses.dataclass(frozen=True)
class Reader:
    """A linear op that reads the normalised stream.

    Attributes:
        node: The op (MatMul or Gemm).
        weight: Its weight and the weight's axis along the stream.
        bias: Its bias constant ("" when none: the rewrite adds one when a norm shift needs it).
        norm: The norm whose output it reads (its scale and shift fold into this reader).
        output: The op's output tensor (a new bias is added there).
    """

    node: str
    weight: Side
    bias: str
    norm: str
    output: str


@dataclasses.dataclass(frozen=True)
class Stream:
    """The stream of one model: width, norms, writers, readers, and the reason it is frozen ("" when it is not)."""

    width: int
    norms: tuple[Norm, ...] = ()
    writers: tuple[Side, ...] = ()
    readers: tuple[Reader, ...] = ()
    reshapes: tuple[Side, ...] = ()
    """Constant Reshape targets that hold the width at the given entry (updated when the stream is sliced)."""
    widths: tuple[str, ...] = ()
    """Ops (``Gather`` of a stream tensor's ``Shape``) that read the width at run time for tensors off the stream:
    the rewrite replaces their output by the original width."""
    frozen: str = ""

    @property
    def centred(self) -> bool:
        """Whether the norms are LayerNorms (writers must be made mean-free); all are the one kind or the stream is frozen."""
        return any(n.centred for n in self.norms)


class _Frozen(Exception):
    """Internal: the walk met something it cannot rotate (the message is the reason)."""


def _pos(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _input(node: OpNode, index: int) -> str:
    """Input ``index`` of ``node``, "" when absent (or index -1)."""
    return node.inputs[index] if 0 <= index < len(node.inputs) else ""


class _Walk:
    """The fixed point: every stream tensor with its (negative) axis and kind, every op classified once."""

    def __init__(self, graph: ChannelGraph, width: int) -> None:
        self.g, self.width = graph, width
        self.producer = graph.producers()
        self.consumers = graph.consumers()
        self.tensors: dict[str, tuple[int, str]] = {}
        self.done: set[str] = set()
        self.todo: list[str] = []
        self.norms: dict[str, Norm] = {}
        self.writers: list[Side] = []
        self.readers: list[Reader] = []
        self.reshapes: list[Side] = []
        self.shape_reads: list[tuple[OpNode | None, OpNode]] = []  # (Gather of the width or None, the Shape op)
        self.readers_of: dict[str, str] = {}  # normalised tensor -> the norm it comes from

    def rank(self, name: str) -> int:
        shape = self.g.shape(name)
        if shape is None:
            raise _Frozen(f"the rank of '{name}' is unknown")
        return len(shape)

    def mark(self, name: str, axis: int, kind: str, norm: str = "") -> None:
        """Put tensor ``name`` on the stream with ``axis`` (negative) of ``kind`` (stream / normed)."""
        axis = axis - self.rank(name) if axis >= 0 else axis
        seen = self.tensors.get(name)
        if seen is not None:
            if seen != (axis, kind):
                raise _Frozen(f"'{name}' is reached as {seen[1]} axis {seen[0]} and as {kind} axis {axis}")
            return
        shape = self.g.shape(name)
        size = shape[axis] if shape is not None else None
        if isinstance(size, int) and size != self.width:
            raise _Frozen(f"'{name}' axis {axis} has size {size}, not the stream's {self.width}")
        if name in self.g.outputs:
            raise _Frozen(f"the stream tensor '{name}' is a graph output (its basis would change)")
        if self.g.tensors[name].kind == "input":
            raise _Frozen(f"the stream starts at the graph input '{name}' (no writer to rotate)")
        self.tensors[name] = (axis, kind)
        if kind == "normed":
            self.readers_of[name] = norm
        self.todo.append(name)

    def run(self, starts: Sequence[OpNode]) -> None:
        for node in starts:
            self.visit(node)
        while self.todo:
            name = self.todo.pop()
            producer = self.producer.get(name)
            if producer is not None:
                self.visit(producer)
            for node in self.consumers.get(name, []):
                self.visit(node)

    def visit(self, node: OpNode) -> None:
        if node.name in self.done:
            return
        self.done.add(node.name)
        if node.has_subgraph or node.subgraph_refs:
            raise _Frozen(f"{node.op_type} '{node.name}' holds a subgraph that touches the stream")
        key = (node.domain, node.op_type)
        handler = getattr(self, f"_op_{node.op_type}", None)
        if key in NORM_OPS:
            self._norm(node)
        elif handler is not None and node.domain in ("", "ai.onnx"):
            handler(node)
        else:
            raise _Frozen(f"{node.op_type} '{node.name}' touches the stream and is not a known writer, reader or norm")

    # -- helpers ---------------------------------------------------------------------------------------
    def on(self, name: str) -> tuple[int, str] | None:
        return self.tensors.get(name) if name else None

    def const(self, name: str, node: OpNode) -> np.ndarray:
        value = self.g.const(name)
        if value is None:
            raise _Frozen(f"{node.op_type} '{node.name}': '{name}' is not a constant")
        users = {c.name for c in self.consumers.get(name, [])}
        if len(users) > 1:
            raise _Frozen(f"the constant '{name}' of {node.op_type} '{node.name}' is shared by {len(users)} ops")
        return value

    def writer(self, name: str, axis: int, node: OpNode) -> None:
        value = self.const(name, node)
        axis = _pos(axis, value.ndim)
        if value.ndim == 0 or not 0 <= axis < value.ndim or value.shape[axis] != self.width:
            raise _Frozen(f"{node.op_type} '{node.name}' adds '{name}' of shape {value.shape} to the stream (not along its width)")
        self.writers.append(Side(name, axis))

    def stream_out(self, node: OpNode, axis: int) -> None:
        """A writer op: its output lies on the stream, its data input must not."""
        if self.on(node.inputs[0]) is not None:
            raise _Frozen(f"{node.op_type} '{node.name}' reads the stream without a norm")
        self.mark(node.outputs[0], axis, "stream")

    # -- ops ---------------------------------------------------------------------------------------------
    def _norm(self, node: OpNode) -> None:
        skip = SKIP_NORMS.get(node.op_type) if node.domain == "com.microsoft" else None
        x, out = node.inputs[0], node.outputs[0]
        rank = self.rank(x)
        axis = _pos(int(node.attrs.get("axis", -1)), rank)
        if axis != rank - 1:
            raise _Frozen(f"{node.op_type} '{node.name}' normalises from axis {axis}, not over the last axis only")
        kept_outputs = node.outputs[1:3] if skip else node.outputs[1:]
        if any(o and self.consumers.get(o) for o in kept_outputs) or (node.op_type == "LayerNormalization" and node.attrs.get("stash_type", 1) != 1):
            raise _Frozen(f"{node.op_type} '{node.name}' has outputs or settings the rotation cannot keep")
        seen_out = self.on(out)
        if seen_out is not None and seen_out[1] != "normed":
            raise _Frozen(f"the output of {node.op_type} '{node.name}' is added to the residual stream (a post-LN model: "
                          "its scale cannot be folded into the readers)")
        if skip:
            x = self._skip_inputs(node, skip[2])
        scale = _input(node, skip[0] if skip else 1)
        bias = _input(node, skip[1] if skip else 2)
        for name in (scale, bias):  # read only (the norm is replaced), so they may be shared
            if name:
                value = self.g.const(name)
                if value is None:
                    raise _Frozen(f"{node.op_type} '{node.name}': '{name}' is not a constant")
                if value.shape != (self.width,):
                    raise _Frozen(f"{node.op_type} '{node.name}': '{name}' has shape {value.shape}, not ({self.width},)")
        eps = float(node.attrs.get("epsilon", 1e-12 if skip else 1e-5))
        self.norms[node.name] = Norm(node.name, x, out, scale, bias, eps, NORM_OPS[(node.domain, node.op_type)], skip is not None)
        self.mark(x, -1, "stream")
        self.mark(out, -1, "normed", node.name)

    def _skip_inputs(self, node: OpNode, bias_index: int) -> str:
        """A fused residual Add + norm: both addends and the sum lie on the stream, a constant bias writes it.

        Returns the sum (output 3), the tensor the norm normalises."""
        total = node.outputs[3] if len(node.outputs) > 3 else ""
        if not total:
            raise _Frozen(f"{node.op_type} '{node.name}' does not output its sum (output 3; the hidden pass adds it)")
        for name in node.inputs[:2]:
            seen = self.on(name)
            if seen is not None and seen[1] == "normed":
                raise _Frozen(f"{node.op_type} '{node.name}' adds a norm's output to the residual stream (a post-LN model: "
                              "its scale cannot be folded into the readers)")
            if self.g.const(name) is not None:
                self.writer(name, -1, node)
            else:
                self.mark(name, -1, "stream")
        bias = _input(node, bias_index)
        if bias:
            self.writer(bias, -1, node)
        return total

    def _op_Add(self, node: OpNode) -> None:
        sides = [self.on(n) for n in (*node.inputs, node.outputs[0])]
        known = next(s for s in sides if s is not None)
        if known[1] != "stream":
            raise _Frozen(f"Add '{node.name}' adds to a norm's output (a post-LN residual: the norm's scale cannot be folded)")
        self.joined(node, known[0])

    def joined(self, node: OpNode, axis: int) -> None:
        """Every input and the output of ``node`` lie on the stream at ``axis``; a constant input is a writer."""
        for name in node.inputs:
            value = self.g.const(name)
            if value is not None:
                if value.ndim < -axis:
                    raise _Frozen(f"{node.op_type} '{node.name}' adds '{name}' broadcast across the stream's width")
                self.writer(name, axis, node)
            else:
                self.mark(name, axis, "stream")
        self.mark(node.outputs[0], axis, "stream")

    def _op_MatMul(self, node: OpNode) -> None:
        a, b = node.inputs
        if self.on(b) is not None:
            raise _Frozen(f"MatMul '{node.name}' multiplies by the stream on the right")
        weight, flipped = self._matmul_weight(b)
        seen = self.on(a)
        if seen is not None:
            self.reader(node, Side(weight, 1 if flipped else 0), seen)
            return
        value = self.g.const(weight)
        if value is None or value.ndim != 2:
            raise _Frozen(f"MatMul '{node.name}' writes the stream with a weight that is not a 2-D constant")
        self.writer(weight, 0 if flipped else 1, node)
        self.stream_out(node, -1)

    def _matmul_weight(self, b: str) -> tuple[str, bool]:
        """The constant a MatMul multiplies by, and whether it is stored transposed: ``x @ W^T`` as the torch
        frontend writes ``nn.Linear`` (a ``Transpose`` of a 2-D constant read by nothing else)."""
        producer = self.producer.get(b)
        if (producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx")
                and tuple(producer.attrs.get("perm") or (1, 0)) == (1, 0) and len(self.consumers.get(b, [])) == 1):
            w = self.g.const(producer.inputs[0])
            if w is not None and w.ndim == 2:
                return producer.inputs[0], True
        return b, False

    def _op_Gemm(self, node: OpNode) -> None:
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else ""
        trans_b = int(node.attrs.get("transB", 0))
        if int(node.attrs.get("transA", 0)) or self.on(b) is not None:
            raise _Frozen(f"Gemm '{node.name}' reads the stream transposed")
        seen = self.on(a)
        if seen is not None:
            self.reader(node, Side(b, 1 if trans_b else 0), seen, c)
            return
        self.writer(b, 0 if trans_b else 1, node)
        if c:
            self.writer(c, -1, node)
        self.stream_out(node, -1)

    def reader(self, node: OpNode, weight: Side, seen: tuple[int, str], bias: str = "") -> None:
        if seen != (-1, "normed"):
            raise _Frozen(f"{node.op_type} '{node.name}' reads the stream without a norm (centring would change what it reads)")
        w = self.const(weight.tensor, node)
        if w.ndim != 2 or w.shape[weight.axis] != self.width:
            raise _Frozen(f"{node.op_type} '{node.name}' reads the stream with a weight of shape {w.shape}")
        out = node.outputs[0]
        width_out = w.shape[1 - weight.axis]
        if not bias and node.op_type == "MatMul":
            users = self.consumers.get(out, [])
            if len(users) == 1 and users[0].op_type == "Add":
                other = [n for n in users[0].inputs if n != out]
                value = self.g.const(other[0]) if len(other) == 1 else None
                if value is not None and value.shape == (width_out,) and len(self.consumers.get(other[0], [])) == 1:
                    bias = other[0]
            elif len(users) == 1 and users[0].domain == "com.microsoft" and users[0].op_type in BIASED_ACTIVATIONS:
                fused = _input(users[0], 1)  # BiasGelu / FastGelu / BiasAdd add it before their activation
                value = self.g.const(fused) if fused and users[0].inputs[0] == out else None
                if value is not None and value.shape == (width_out,) and len(self.consumers.get(fused, [])) == 1:
                    bias = fused
        if bias and self.const(bias, node).size != width_out:
            raise _Frozen(f"{node.op_type} '{node.name}': bias '{bias}' does not match its outputs")
        norm = self.readers_of[node.inputs[0]]
        self.readers.append(Reader(node.name, weight, bias, norm, out))

    def readers_that_write(self) -> None:
        """A reader whose output is added to the stream (``x + fc(norm(x))``) is a writer too, along its other axis
        (with its bias): the rotation applies to both sides of its weight."""
        for r in self.readers:
            seen = self.tensors.get(r.output)
            if seen is None or seen[1] != "stream":
                continue
            side = Side(r.weight.tensor, 1 - r.weight.axis)
            if side not in self.writers:
                self.writers.append(side)
            if r.bias and all(s.tensor != r.bias for s in self.writers):
                self.writers.append(Side(r.bias, 0))  # a reader's bias is 1-D (checked when it was found)

    def _op_Conv(self, node: OpNode) -> None:
        if int(node.attrs.get("group", 1)) != 1:
            raise _Frozen(f"Conv '{node.name}' is grouped: its output channels cannot be rotated")
        self.writer(node.inputs[1], 0, node)
        if len(node.inputs) > 2 and node.inputs[2]:
            self.writer(node.inputs[2], 0, node)
        self.stream_out(node, 1)

    def _op_Gather(self, node: OpNode) -> None:
        data = node.inputs[0]
        axis = int(node.attrs.get("axis", 0))
        if self.on(data) is None and self.g.const(data) is not None:  # an embedding table
            value = self.const(data, node)
            if value.ndim != 2 or _pos(axis, 2) != 0:
                raise _Frozen(f"Gather '{node.name}' reads a table of shape {value.shape} along axis {axis}")
            self.writer(data, 1, node)
            self.mark(node.outputs[0], -1, "stream")
            return
        self.through(node, self._gather_axis(node, axis))

    def _gather_axis(self, node: OpNode, axis: int) -> dict[int, int]:
        idx = self.g.const(node.inputs[1])
        if idx is None:
            raise _Frozen(f"Gather '{node.name}' on the stream takes indices computed at run time")
        rank = self.rank(node.inputs[0])
        axis = _pos(axis, rank)
        mapping = {}
        for d in range(rank):
            if d < axis:
                mapping[d] = d
            elif d > axis:
                mapping[d] = d - 1 + idx.ndim
        return mapping

    def _op_Transpose(self, node: OpNode) -> None:
        rank = self.rank(node.inputs[0])
        perm = node.attrs.get("perm") or list(range(rank))[::-1]
        self.through(node, {int(p): j for j, p in enumerate(perm)})

    def _op_Identity(self, node: OpNode) -> None:
        rank = self.rank(node.inputs[0])
        self.through(node, {d: d for d in range(rank)})

    _op_Dropout = _op_Identity

    def _op_Cast(self, node: OpNode) -> None:
        """A cast between floating types passes the stream (torch's ``.to(dtype)``); any other freezes it."""
        try:
            floating = by_code(int(node.attrs.get("to", 0))).floating
        except KeyError:
            floating = False
        if not floating:
            raise _Frozen(f"Cast '{node.name}' casts the stream to a non-floating type")
        self._op_Identity(node)

    def _op_ReduceMean(self, node: OpNode) -> None:
        rank = self.rank(node.inputs[0])
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1]:
            value = self.g.const(node.inputs[1])
            axes = None if value is None else value.tolist()
        if axes is None:
            raise _Frozen(f"ReduceMean '{node.name}' reduces over every axis of the stream (or axes computed at run time)")
        reduced = {_pos(int(a), rank) for a in axes}
        keep = int(node.attrs.get("keepdims", 1))
        mapping, j = {}, 0
        for d in range(rank):
            if d in reduced:
                j += keep
                continue
            mapping[d] = j
            j += 1
        self.through(node, mapping)

    def _op_Slice(self, node: OpNode) -> None:
        rank = self.rank(node.inputs[0])
        axes_value = self.g.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else np.arange(rank)
        if axes_value is None:
            raise _Frozen(f"Slice '{node.name}' on the stream takes axes computed at run time")
        self.through(node, {d: d for d in range(rank)}, blocked={_pos(int(a), rank) for a in np.ravel(axes_value)})

    def _op_Concat(self, node: OpNode) -> None:
        """Tokens joined along another axis (a class token before the patches): every input lies on the stream, a
        constant one is a writer."""
        known = next(s for s in (self.on(n) for n in (*node.inputs, node.outputs[0])) if s is not None)
        axis, kind = known
        rank = self.rank(node.outputs[0])
        if kind != "stream":
            raise _Frozen(f"Concat '{node.name}' joins normalised stream tensors")
        if _pos(int(node.attrs.get("axis", 0)), rank) == _pos(axis, rank):
            raise _Frozen(f"Concat '{node.name}' joins along the stream's width")
        self.joined(node, axis)

    def _op_Expand(self, node: OpNode) -> None:
        """A broadcast copy (a class token expanded over the batch): a constant input is a writer; a constant target
        that holds the width is updated with it."""
        x, out = node.inputs[0], node.outputs[0]
        rin, rout = self.rank(x), self.rank(out)
        if self.g.const(x) is not None:
            seen = self.on(out)
            if seen is None:
                raise _Frozen(f"Expand '{node.name}' expands a constant onto the stream from its shape input")
            shape = self.g.shape(x) or ()
            j = _pos(seen[0], rout) - (rout - rin)
            if not 0 <= j < len(shape) or shape[j] != self.width:
                raise _Frozen(f"Expand '{node.name}' broadcasts '{x}' across the stream's width")
            self.writer(x, seen[0], node)
        else:
            self.through(node, {d: d + rout - rin for d in range(rin)})
        seen = self.on(out)
        target = self.g.const(node.inputs[1])
        if seen is not None and target is not None:  # the target aligns with the output's trailing axes
            entry = _pos(seen[0], rout) - (rout - target.size)
            if 0 <= entry < target.size and int(np.ravel(target)[entry]) == self.width:
                self.reshapes.append(Side(node.inputs[1], entry))

    def _op_Squeeze(self, node: OpNode) -> None:
        self._reshape_like(node)

    _op_Unsqueeze = _op_Squeeze
    _op_Flatten = _op_Squeeze

    def _op_Reshape(self, node: OpNode) -> None:
        self._reshape_like(node)

    def _op_Shape(self, node: OpNode) -> None:
        """Record where the stream's width is read at run time; :meth:`check_shape_reads` decides once the walk is done."""
        seen = self.on(node.inputs[0])
        if seen is None:
            return
        rank = self.rank(node.inputs[0])
        hidden = _pos(seen[0], rank)
        start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
        if _pos(start, rank) > hidden or (end is not None and _pos(int(end), rank) <= hidden):
            return  # the width is not among the entries read
        for c in self.consumers.get(node.outputs[0], []):
            idx = self.g.const(c.inputs[1]) if c.op_type == "Gather" and len(c.inputs) > 1 else None
            if idx is not None and start == 0:
                if hidden not in {_pos(int(i), rank) for i in np.ravel(idx)}:
                    continue  # entries other than the width
                self.shape_reads.append((c, node) if idx.ndim == 0 else (None, node))
            else:
                self.shape_reads.append((None, node))

    def check_shape_reads(self) -> list[str]:
        """Ops whose runtime width must stay the original one; raises when a read feeds tensors on and off the stream."""
        fixed = []
        for gather, shape in self.shape_reads:
            targets = self._shape_targets(gather.outputs[0] if gather is not None else shape.outputs[0])
            on = {t is not None and t in self.tensors for t in targets}
            if on == {True}:
                continue  # reshapes of stream tensors: they follow the new width
            if gather is not None and on == {False}:
                fixed.append(gather.name)
                continue
            raise _Frozen(f"Shape '{shape.name}' reads the stream's width at run time for tensors the rotation cannot follow")
        return fixed

    def _shape_targets(self, start: str) -> list[str | None]:
        """The data tensors of the Reshapes a shape value reaches (None: it reaches something other than a Reshape target)."""
        arithmetic = {"Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Mul", "Div", "Add", "Sub", "Identity"}
        out: list[str | None] = []
        todo, seen = [start], {start}
        while todo:
            name = todo.pop()
            users = self.consumers.get(name, [])
            if name in self.g.outputs or not users:
                out.append(None)
            for c in users:
                if c.op_type == "Reshape" and c.inputs[1] == name:
                    out.append(c.inputs[0])
                elif c.op_type in arithmetic:
                    for o in c.outputs:
                        if o and o not in seen:
                            seen.add(o)
                            todo.append(o)
                else:
                    out.append(None)
        return out

    def _reshape_like(self, node: OpNode) -> None:
        src, dst = self.g.shape(node.inputs[0]), self.g.shape(node.outputs[0])
        if src is None or dst is None:
            raise _Frozen(f"{node.op_type} '{node.name}' on the stream has unknown shapes")
        mapping = {}
        for d in range(len(src)):
            for j in range(len(dst)):
                if src[:d] == dst[:j] and src[d] == dst[j]:
                    mapping[d] = j
                    break
        if src and dst and isinstance(src[-1], int) and src[-1] == dst[-1]:
            mapping[len(src) - 1] = len(dst) - 1  # an equal last axis is kept element for element (x.view(-1, d))
        self.through(node, mapping)
        seen = self.on(node.outputs[0])
        target = self.g.const(node.inputs[1]) if node.op_type == "Reshape" else None
        if seen is not None and target is not None:
            j = _pos(seen[0], len(dst))
            if int(target[j]) == self.width:
                self.reshapes.append(Side(node.inputs[1], j))

    def through(self, node: OpNode, mapping: dict[int, int], blocked: frozenset[int] | set[int] = frozenset()) -> None:
        """A pass-through op: the stream axis moves from input axis d to output axis ``mapping[d]``."""
        x, out = node.inputs[0], node.outputs[0]
        if any(self.on(n) is not None for n in node.inputs[1:]):
            raise _Frozen(f"{node.op_type} '{node.name}' takes the stream as a shape or index input")
        rin, rout = self.rank(x), self.rank(out)
        src, dst = self.on(x), self.on(out)
        kind = (src or dst)[1]  # type: ignore[index]
        norm = self.readers_of.get(x, self.readers_of.get(out, ""))
        if src is not None:
            d = _pos(src[0], rin)
            if d in blocked or d not in mapping:
                raise _Frozen(f"{node.op_type} '{node.name}' changes the stream's axis")
            self.mark(out, mapping[d] - rout, kind, norm)
        else:
            back = {j: d for d, j in mapping.items()}
            j = _pos(dst[0], rout)  # type: ignore[index]
            if j not in back or back[j] in blocked:
                raise _Frozen(f"{node.op_type} '{node.name}' changes the stream's axis")
            self.mark(x, back[j] - rin, kind, norm)


def find_stream(graph: ChannelGraph) -> Stream:
    """The model's hidden stream, or a frozen one with the reason.

    Raises:
        BadInputError: The model has no norm over a last axis (nothing for a hidden-size pass to slice).
    """
    norms = [n for n in graph.nodes if (n.domain, n.op_type) in NORM_OPS]
    if not norms:
        raise BadInputError("the model has no LayerNormalization or RMSNormalization over a hidden axis: "
                            "--hidden slices the hidden size of a transformer (use --ratio / --macs for its channels)")
    width = _width(graph, norms[0])
    walk = _Walk(graph, width)
    try:
        walk.run(norms[:1])
        walk.readers_that_write()
        missing = [n.name for n in norms if n.name not in walk.norms]
        if missing:
            raise _Frozen(f"norm(s) {', '.join(missing[:3])} lie outside the first norm's stream (one stream per model)")
        if len({n.centred for n in walk.norms.values()}) > 1:
            raise _Frozen("the stream mixes LayerNorm and RMSNorm")
        if not walk.writers or not walk.readers:
            raise _Frozen("the stream has no constant writer or no linear reader")
        widths = walk.check_shape_reads()
    except _Frozen as exc:
        log.info("hidden stream frozen: %s", exc)
        return Stream(width, frozen=str(exc))
    return Stream(width, tuple(walk.norms.values()), tuple(walk.writers), tuple(walk.readers), tuple(walk.reshapes), tuple(widths))


def _width(graph: ChannelGraph, norm: OpNode) -> int:
    shape = graph.shape(norm.inputs[0])
    last = shape[-1] if shape else None
    if isinstance(last, int):
        return last
    scale = graph.const(norm.inputs[1]) if len(norm.inputs) > 1 else None
    if scale is not None:
        return int(scale.size)
    raise BadInputError(f"{norm.op_type} '{norm.name}': the hidden width is unknown (run shape inference or export static hidden sizes)")
