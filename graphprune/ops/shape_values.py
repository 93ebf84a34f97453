"""Shape arithmetic evaluated symbolically: which sizes a computed shape vector holds, and which axes it reads.

``Shape -> Gather/Slice -> Unsqueeze -> Concat -> Reshape`` (with Div / Mul
by head counts, Cast, Squeeze, Where, Equal...) is how exporters compute a
reshape target at run time. Every small integer tensor derived from
``Shape`` and constants gets a :class:`ShapeValue`: per entry, its value
when it is static and the axes whose run-time sizes it reads. The op table
uses it to tell which reads are rewritten with the plan (a Reshape target,
an Expand shape, Slice bounds: their static entries are replaced by the new
sizes) and which must keep their sizes (anything else reading them).
"""
from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable

import numpy as np

from graphprune.ir.graph import Axis, ChannelGraph, OpNode

__all__ = ["Entry", "ShapeValue", "rewritten_uses", "shape_values", "static_value"]

MAX_ENTRIES = 64
"""Integer vectors longer than this are data, not shapes."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One element of a shape vector: its value (None when dynamic) and the axis sizes it is computed from."""

    value: int | float | None
    reads: frozenset[Axis] = frozenset()


ShapeValue = tuple[Entry, ...]
"""A 0-D (one entry) or 1-D integer tensor's elements."""

_BINARY: dict[str, Callable[[float, float], float]] = {
    "Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv,
    "Max": max, "Min": min, "Mod": operator.mod, "Equal": lambda a, b: float(a == b),
}
_PASS = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Floor", "Ceil", "Neg", "Abs", "Sqrt", "Reshape", "Flatten"}

_INT_TYPES = {2, 3, 4, 5, 6, 7, 12, 13}
"""ONNX integer element types (a Cast to one truncates)."""

REWRITTEN_INPUTS = {("Reshape", 1), ("Expand", 1), ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4)}
"""Inputs whose static entries the rewrite replaces by the plan's sizes (their reads need not keep their size)."""


def shape_values(graph: ChannelGraph) -> dict[str, ShapeValue]:
    """Every shape-like tensor's entries (computed once per graph)."""
    found = graph.memo.get("shape_values")
    if found is None:
        found = _evaluate(graph)
        graph.memo["shape_values"] = found
    return found


def static_value(graph: ChannelGraph, name: str) -> np.ndarray | None:
    """A constant, or a computed shape value whose entries are all static (as int64, its rank kept)."""
    const = graph.const(name)
    if const is not None:
        return const
    val = shape_values(graph).get(name)
    if val is None or any(e.value is None for e in val):
        return None
    arr = np.array([e.value for e in val], dtype=np.float64)
    info = graph.info(name)
    if info is not None and info.dtype not in ("FLOAT", "DOUBLE", "FLOAT16"):
        arr = arr.astype(np.int64)
    shape = graph.shape(name)
    return arr.reshape(()) if shape is not None and len(shape) == 0 else arr


def rewritten_uses(graph: ChannelGraph, name: str) -> tuple[set[Axis], set[Axis]]:
    """Axes read by the entries of ``name`` that reach (rewritten inputs, any other use)."""
    values = shape_values(graph)
    ok: set[Axis] = set()
    bad: set[Axis] = set()
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        reads = _reads(values.get(t, ()))
        uses = graph.consumers().get(t, [])
        if not uses and graph.info(t) is not None and graph.tensors[t].is_output:
            bad |= reads
        for use in uses:
            derived = [o for o in use.outputs if o in values]
            if derived:
                stack += derived
                continue
            slots = [i for i, n in enumerate(use.inputs) if n == t]
            if use.domain or not all((use.op_type, i) in REWRITTEN_INPUTS for i in slots):
                bad |= reads
            elif use.op_type == "Slice":
                (ok if static_value(graph, t) is not None else bad).update(reads)
            else:  # Reshape / Expand: static entries are rewritten, dynamic ones keep reading at run time
                for e in values.get(t, ()):
                    (ok if e.value is not None else bad).update(e.reads)
    return ok, bad


def _reads(val: Iterable[Entry]) -> set[Axis]:
    out: set[Axis] = set()
    for e in val:
        out |= e.reads
    return out


def _evaluate(graph: ChannelGraph) -> dict[str, ShapeValue]:
    values: dict[str, ShapeValue] = {}

    def get(name: str) -> ShapeValue | None:
        if not name:
            return None
        if name in values:
            return values[name]
        const = graph.const(name)
        if const is None or const.size > MAX_ENTRIES or const.ndim > 1 or const.dtype.kind not in "iuf":
            return None
        return tuple(Entry(v.item()) for v in const.reshape(-1))

    for node in graph.nodes:
        if node.domain or not node.outputs or not node.outputs[0]:
            continue
        try:
            out = _step(node, graph, get)
        except (ValueError, IndexError, KeyError, TypeError, ZeroDivisionError, OverflowError):
            out = None
        if out is not None and len(out) <= MAX_ENTRIES:
            values[node.outputs[0]] = out
    return values


def _step(node: OpNode, graph: ChannelGraph, get: Callable[[str], ShapeValue | None]) -> ShapeValue | None:
    op = node.op_type
    if op == "Shape":
        shape = graph.shape(node.inputs[0])
        if shape is None:
            return None
        r = len(shape)
        axes = range(r)[slice(int(node.attrs.get("start", 0)), int(node.attrs.get("end", r)))]
        return tuple(Entry(d if isinstance(d := shape[a], int) else None, frozenset({Axis(node.inputs[0], a)})) for a in axes)
    if op == "Size":
        shape = graph.shape(node.inputs[0])
        if shape is None:
            return None
        sizes = [d for d in shape if isinstance(d, int)]
        return (Entry(int(np.prod(sizes)) if len(sizes) == len(shape) else None, frozenset(Axis(node.inputs[0], a) for a in range(len(shape)))),)
    args = [get(n) for n in node.inputs]
    if op == "Constant":
        val = node.attrs.get("value")
        return None if val is None else tuple(Entry(v.item()) for v in np.asarray(val).reshape(-1))
    if not args or args[0] is None:
        return None
    x = args[0]
    if op == "ConstantOfShape":
        if len(x) != 1 or x[0].value is None or int(x[0].value) > MAX_ENTRIES:
            return None
        fill = node.attrs.get("value")
        v = 0 if fill is None else np.asarray(fill).reshape(-1)[0].item()
        return tuple(Entry(v) for _ in range(int(x[0].value)))
    if op == "Cast" and int(node.attrs.get("to", 0)) in _INT_TYPES:
        return tuple(Entry(None if e.value is None else int(e.value), e.reads) for e in x)
    if op in _PASS:
        return _unary(op, x)
    if op in _BINARY:
        return _binary(_BINARY[op], x, args[1] if len(args) > 1 else None)
    if op == "Concat":
        if any(a is None for a in args):
            return None
        return tuple(e for a in args for e in a)  # type: ignore[union-attr]
    if op == "Gather":
        idx = get(node.inputs[1])
        if idx is None or any(e.value is None for e in idx):
            return None
        return tuple(x[int(e.value)] for e in idx)  # type: ignore[arg-type]
    if op == "Slice":
        return _slice(node, x, get)
    if op == "Where":
        cond, a, b = args[0], args[1] if len(args) > 1 else None, args[2] if len(args) > 2 else None
        if a is None or b is None:
            return None
        n = max(len(cond), len(a), len(b))
        pick = [_at(cond, i) for i in range(n)]
        return tuple(
            Entry((_at(a, i).value if p.value else _at(b, i).value) if p.value is not None else None,
                  p.reads | _at(a, i).reads | _at(b, i).reads)
            for i, p in enumerate(pick)
        )
    return None


def _at(v: ShapeValue, i: int) -> Entry:
    return v[0] if len(v) == 1 else v[i]


def _unary(op: str, x: ShapeValue) -> ShapeValue:
    fns: dict[str, Callable[[float], float]] = {
        "Floor": np.floor, "Ceil": np.ceil, "Neg": operator.neg, "Abs": abs, "Sqrt": np.sqrt,
    }
    fn = fns.get(op)
    if fn is None:
        return x
    return tuple(Entry(None if e.value is None else float(fn(e.value)), e.reads) for e in x)


def _binary(fn: Callable[[float, float], float], a: ShapeValue, b: ShapeValue | None) -> ShapeValue | None:
    if b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
        return None
    out = []
    for i in range(max(len(a), len(b))):
        ea, eb = _at(a, i), _at(b, i)
        value = None if ea.value is None or eb.value is None else fn(ea.value, eb.value)
        if value is not None and fn is operator.truediv and isinstance(ea.value, int) and isinstance(eb.value, int):
            value = ea.value // eb.value  # integer Div truncates (sizes are non-negative)
        out.append(Entry(value, ea.reads | eb.reads))
    return tuple(out)


def _slice(node: OpNode, x: ShapeValue, get: Callable[[str], ShapeValue | None]) -> ShapeValue | None:
    if node.opset < 10:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
    else:
        s, e = (get(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2))
        if s is None or e is None or any(v.value is None for v in (*s, *e)):
            return None
        starts, ends = [v.value for v in s], [v.value for v in e]
    steps = get(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
    step = 1 if steps is None else steps[0].value
    if starts is None or ends is None or len(starts) != 1 or step is None:
        return None
    return x[slice(*slice(int(starts[0]), int(ends[0]), int(step)).indices(len(x)))]
