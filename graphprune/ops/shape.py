"""Ops that move, split, join, slice or reshape axes."""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from graphprune.ir.graph import Axis, ChannelGraph, Dim, OpNode
from graphprune.ops._common import (
    broadcast_links,
    freeze_axes,
    freeze_node,
    identity_links,
    needs_shapes,
    norm_axis,
)
from graphprune.ops.registry import (
    AdjustContext,
    Adjustment,
    AxisOf,
    Factor,
    Freeze,
    Link,
    ModuleRule,
    Semantics,
    attr_or_input,
    register,
)
from graphprune.ops.shape_values import rewritten_uses, shape_values, static_value

__all__ = ["concat", "factorize", "gather", "pad", "reshape", "slice_", "split", "transpose"]


def _shapes(node: OpNode, graph: ChannelGraph) -> tuple[tuple[Dim, ...], tuple[Dim, ...]]:
    xs, ys = graph.shape(node.inputs[0]), graph.shape(node.outputs[0])
    assert xs is not None and ys is not None
    return xs, ys


@register("Transpose")
def transpose(node: OpNode, graph: ChannelGraph) -> Semantics:
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y])
    if missing is not None:
        return missing
    r = len(_shapes(node, graph)[0])
    perm = [int(p) for p in node.attrs.get("perm", range(r - 1, -1, -1))]
    return Semantics(links=tuple(identity_links(x, y, ((p, i) for i, p in enumerate(perm)))))


Monomial = tuple[int, tuple[str, ...]]
"""A dim as a product: integer factor and sorted symbols (``4*batch`` -> (4, ("batch",)))."""

_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _monomial(d: Dim) -> Monomial | None:
    """A static dim, a symbol, or a product of them (as symbolic inference writes ``seq*batch``); else None."""
    if isinstance(d, int):
        return (d, ())
    if not isinstance(d, str):
        return None
    coef, syms = 1, []
    for part in (p.strip() for p in d.split("*")):
        if part.isdigit():
            coef *= int(part)
        elif _SYMBOL.fullmatch(part):
            syms.append(part)
        else:
            return None
    return (coef, tuple(sorted(syms)))


def _times(m: Monomial, n: Monomial) -> Monomial:
    return (m[0] * n[0], tuple(sorted(m[1] + n[1])))


def _divides(m: Monomial, n: Monomial) -> bool:
    """Whether ``n`` is ``m`` times a product of dims (an int and symbols)."""
    rest = list(n[1])
    for s in m[1]:
        if s not in rest:
            return False
        rest.remove(s)
    return m[0] != 0 and n[0] % m[0] == 0


def factorize(
    a: Sequence[Dim], b: Sequence[Dim]
) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of axes of ``a`` and ``b`` with equal products (row-major).

    Size-1 axes form runs of their own with nothing on the other side.
    Symbolic dims are products of symbols and ints (``seq*batch`` equals
    ``batch`` then ``seq``); other expressions only pair with the same
    expression. Returns None when the shapes cannot be matched statically.
    """
    runs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1:
            runs.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1:
            runs.append(([], [j]))
            j += 1
            continue
        if i == len(a) or j == len(b):
            return None
        pa, pb = _monomial(a[i]), _monomial(b[j])
        if pa is None or pb is None:
            if a[i] is None or a[i] != b[j]:
                return None
            runs.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        ia, jb = [i], [j]
        i, j = i + 1, j + 1
        while pa != pb:
            static = not pa[1] and not pb[1]  # plain ints: extend the smaller product (6 x 2 = 4 x 3)
            if _divides(pa, pb) or (static and pa[0] < pb[0]):
                da = _monomial(a[i]) if i < len(a) else None
                if da is None:
                    return None
                pa, ia = _times(pa, da), [*ia, i]
                i += 1
            elif _divides(pb, pa) or static:
                db = _monomial(b[j]) if j < len(b) else None
                if db is None:
                    return None
                pb, jb = _times(pb, db), [*jb, j]
                j += 1
            else:
                return None
        runs.append((ia, jb))
    return runs


def _reshape_adjust(node: OpNode, ctx: AdjustContext) -> Adjustment:
    """A Reshape's target (an Expand's shape) follows the new sizes of its output axes.

    A constant target changes where an output axis lost elements. A target
    computed at run time is rewritten when the plan touches the node or any
    size it reads: every static entry becomes the new size (a head count,
    or ``size // heads``, would otherwise be computed from the old
    structure) unless it reads no pruned size and keeps its value; dynamic
    entries keep their run-time value.
    """
    if node.op_type not in ("Reshape", "Expand"):
        return Adjustment()
    y = node.outputs[0]
    shape = ctx.graph.shape(y) or ()
    target = node.inputs[1]
    if ctx.graph.const(target) is None:
        return _computed_target(node, ctx, shape)
    override = {j: int(k.size) for j in range(len(shape)) if (k := ctx.kept_of(Axis(y, j))) is not None}
    if node.op_type == "Expand":
        const = ctx.graph.param(target).reshape(-1)
        off = len(shape) - const.size
        override = {j - off: n for j, n in override.items() if j >= off and int(const[j - off]) != 1}
    return Adjustment(shape_overrides={1: override}) if override else Adjustment()


def _computed_target(node: OpNode, ctx: AdjustContext, shape: tuple[Dim, ...]) -> Adjustment:
    entries = shape_values(ctx.graph).get(node.inputs[1])
    if entries is None or len(entries) != len(shape):
        # not followed: only the pruned output axes are set (the sizes it reads kept theirs: Shape froze them)
        y = node.outputs[0]
        pruned = {j: int(k.size) for j in range(len(shape)) if (k := ctx.kept_of(Axis(y, j))) is not None}
        return Adjustment(shape_overrides={1: pruned}) if pruned else Adjustment()
    touched = any(ctx.kept_of(Axis(t, a)) is not None for t in (node.inputs[0], node.outputs[0]) for a in range(len(shape)))
    touched = touched or any(a in ctx.kept for e in entries for a in e.reads)
    if not touched:
        return Adjustment()
    override: dict[int, int] = {}
    for j, e in enumerate(entries):
        if e.value is None or (node.op_type == "Expand" and e.value == 1):
            continue
        new = ctx.new_size(Axis(node.outputs[0], j))
        unchanged = e.value == new and not any(a in ctx.kept for a in e.reads)  # computes the same size after pruning
        if new is not None and not unchanged:
            override[j] = int(new)
    return Adjustment(shape_overrides={1: override}) if override else Adjustment()


def _heads_part(whole: list[int], parts: list[int], whole_rank: int, parts_rank: int, node: OpNode, head_entry: int | None) -> int | None:
    """The head count (0) when the last (feature) axis splits into (heads, head size) or merges back from them.

    Pruning whole heads keeps attention's structure (every head keeps its
    size); the coupling prefers that factor over the head size in ONNX
    graphs. A traced torch module's forward holds its sizes as Python ints
    no rewrite reaches: there a split prefers the head count only when the
    call gives it as -1 (output entry ``head_entry``: ``view(*s, -1, head_dim)``,
    as Hugging Face's attention does), which follows the kept heads at run
    time, or as a head-count attribute of the calling module
    (``view(*s, self.heads, d)``), which the module backend sets; a merge
    (``head_entry`` None) states no preference, and the head size stays
    preferred otherwise.
    """
    if not _head_split(whole, parts, whole_rank, parts_rank):
        return None
    if node.origin is None:
        return 0
    ref = node.origin.inputs.get(1)
    follows = () if ref is None else (*ref.inferred, *(j for j, _ in ref.attributes))
    return 0 if head_entry is not None and head_entry in follows else None


def _head_split(whole: list[int], parts: list[int], whole_rank: int, parts_rank: int) -> bool:
    """The last axis of one side is the last two of the other: (heads, head size)."""
    return len(parts) == 2 and whole == [whole_rank - 1] and parts == [parts_rank - 2, parts_rank - 1]


def _literal_heads(node: OpNode, ia: list[int], jb: list[int], x_rank: int, y_rank: int, prefer: int | None) -> bool:
    """A traced torch split into (heads, head size) whose head count the call gives as a number: the module's
    forward keeps that count whatever is pruned, so the head axis cannot lose entries (an attention op after it
    would otherwise prune whole heads the forward still reshapes into the old count)."""
    return node.origin is not None and prefer is None and _head_split(ia, jb, x_rank, y_rank)


@register(
    "Reshape", "Flatten", "Squeeze", "Unsqueeze",
    adjust=_reshape_adjust, module=ModuleRule(call_sizes=1),
)
def reshape(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Axes that survive unchanged are linked; a merged or split axis is a Factor."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y])
    if missing is not None:
        return missing
    xs, ys = _shapes(node, graph)
    runs = factorize(xs, ys)
    if runs is None:
        return freeze_node(node, graph, f"{node.op_type}: shapes {list(xs)} -> {list(ys)} not matched statically")
    links: list[Link] = []
    factors: list[Factor] = []
    freezes: list[Freeze] = []
    for ia, jb in runs:
        if len(ia) == 1 and len(jb) == 1:
            links.append(Link(Axis(x, ia[0]), Axis(y, jb[0])))
        elif not all(isinstance(xs[i], int) for i in ia) or not all(isinstance(ys[j], int) for j in jb):
            reason = f"{node.op_type} merges axes {ia} -> {jb} of dynamic size"
            freezes += freeze_axes([*(Axis(x, i) for i in ia), *(Axis(y, j) for j in jb)], reason)
        elif len(ia) == 1 and len(jb) > 1:
            prefer = _heads_part(ia, jb, len(xs), len(ys), node, jb[0])
            if _literal_heads(node, ia, jb, len(xs), len(ys), prefer):
                freezes += freeze_axes([Axis(y, jb[0])], f"{node.op_type}: the head count {ys[jb[0]]} is a Python int in the "
                                       "traced forward (give it as -1, view(*s, -1, head_dim), or read it from "
                                       "self.num_heads, to prune whole heads)")
            factors.append(Factor(Axis(x, ia[0]), tuple(Axis(y, j) for j in jb), tuple(int(ys[j]) for j in jb), prefer))  # type: ignore[arg-type]
        elif len(jb) == 1 and len(ia) > 1:
            prefer = _heads_part(jb, ia, len(ys), len(xs), node, None)
            factors.append(Factor(Axis(y, jb[0]), tuple(Axis(x, i) for i in ia), tuple(int(xs[i]) for i in ia), prefer))  # type: ignore[arg-type]
        elif ia and jb:
            reason = f"{node.op_type} regroups axes {ia} -> {jb}"
            freezes += freeze_axes([*(Axis(x, i) for i in ia), *(Axis(y, j) for j in jb)], reason)
    return Semantics(links=tuple(links), freezes=tuple(freezes), factors=tuple(factors))


@register("Expand", adjust=_reshape_adjust)
def expand(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Broadcast to a shape: axes that keep their size pass, broadcast ones start new channels.

    The shape must be a constant or shape arithmetic the rewrite follows
    (:mod:`graphprune.ops.shape_values`) of the output's rank; otherwise every axis freezes.
    """
    target, ys = node.inputs[1], graph.shape(node.outputs[0])
    entries = shape_values(graph).get(target)
    const = graph.const(target)
    rank = const.size if const is not None else (len(entries) if entries is not None else None)
    if ys is None or rank != len(ys):
        return freeze_node(node, graph, "Expand: shape computed at run time in a way not followed, or of another rank")
    return broadcast_links(node, graph, [node.inputs[0]])


@register("Concat")
def concat(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Input k's slice of the concat axis sits at its offset in the output."""
    y = node.outputs[0]
    ins = [n for n in node.inputs if n]
    missing = needs_shapes(node, graph, [*ins, y])
    if missing is not None:
        return missing
    ys = graph.shape(y)
    assert ys is not None
    a = norm_axis(int(node.attrs["axis"]), len(ys))
    links: list[Link] = []
    off = 0
    for name in ins:
        shape = graph.shape(name)
        assert shape is not None
        links += identity_links(name, y, ((i, i) for i in range(len(ys)) if i != a))
        n = shape[a]
        if not isinstance(n, int):
            reason = "Concat: input size along the concat axis is dynamic"
            return Semantics(links=tuple(links), freezes=freeze_axes([Axis(m, a) for m in (*ins, y)], reason))
        if n:
            links.append(Link(Axis(name, a), Axis(y, a), np.arange(n), off + np.arange(n)))
        off += n
    return Semantics(links=tuple(links))


def _split_adjust(node: OpNode, ctx: AdjustContext) -> Adjustment:
    """Split sizes follow the new sizes of the outputs."""
    xs = ctx.graph.shape(node.inputs[0]) or ctx.graph.shape(node.outputs[0]) or ()
    if not xs:
        return Adjustment()
    a = norm_axis(int(node.attrs.get("axis", 0)), len(xs))
    if all(ctx.kept_of(Axis(o, a)) is None for o in node.outputs):
        return Adjustment()
    sizes = np.array([ctx.new_size(Axis(o, a)) for o in node.outputs], dtype=np.int64)
    if node.opset < 13:
        return Adjustment(attrs={"split": [int(s) for s in sizes]})
    attrs = {"num_outputs": None} if "num_outputs" in node.attrs else {}
    return Adjustment(attrs=attrs, const_inputs={1: sizes})


SPLIT_MODULE = ModuleRule(sizes={"split_size": AxisOf(0, output=True, axis_attr="axis")})
"""``x.split(self.split_size)`` in the module that made the call (Hugging Face GPT-2's fused QKV) follows the first
part's new size."""


@register("Split", adjust=_split_adjust, module=SPLIT_MODULE)
def split(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Output k is the slice of the split axis at its offset in the input."""
    x = node.inputs[0]
    outs = list(node.outputs)
    missing = needs_shapes(node, graph, [x, *outs])
    if missing is not None:
        return missing
    xs = graph.shape(x)
    assert xs is not None
    a = norm_axis(int(node.attrs.get("axis", 0)), len(xs))
    links: list[Link] = []
    off = 0
    for name in outs:
        shape = graph.shape(name)
        assert shape is not None
        links += identity_links(x, name, ((i, i) for i in range(len(xs)) if i != a))
        n = shape[a]
        if not isinstance(n, int):
            reason = "Split: output size along the split axis is dynamic"
            return Semantics(links=tuple(links), freezes=freeze_axes([Axis(m, a) for m in (x, *outs)], reason))
        links.append(Link(Axis(x, a), Axis(name, a), off + np.arange(n), np.arange(n)))
        off += n
    return Semantics(links=tuple(links))


_SLICE_OPERANDS = ("starts", "ends", "axes", "steps")


def _slice_params(node: OpNode, graph: ChannelGraph) -> list[np.ndarray | None]:
    """Starts, ends, axes, steps: attributes, constants, or shape arithmetic with static results."""
    out: list[np.ndarray | None] = []
    for i, name in enumerate(_SLICE_OPERANDS):
        if name in node.attrs:
            out.append(np.asarray(node.attrs[name]))
        elif i + 1 < len(node.inputs) and node.inputs[i + 1]:
            out.append(static_value(graph, node.inputs[i + 1]))
        else:
            out.append(None)
    return out


def _computed_bounds(node: OpNode, graph: ChannelGraph) -> bool:
    """Whether a bound is computed at run time (the rewrite then writes it as a constant)."""
    return any(graph.const(n) is None for n in node.inputs[1:] if n)


def _slice_ranges(node: OpNode, graph: ChannelGraph) -> dict[int, tuple[int, int, int]] | None:
    """Axis -> (start, stop, step) normalised to the input size, or None."""
    xs = graph.shape(node.inputs[0])
    starts, ends, axes, steps = _slice_params(node, graph)
    if xs is None or starts is None or ends is None:
        return None
    given = [(len(node.inputs) > i + 1 and bool(node.inputs[i + 1])) for i in range(4)]
    if (given[2] and axes is None) or (given[3] and steps is None):
        return None
    r = len(xs)
    axes_l = list(range(len(starts))) if axes is None else [norm_axis(int(v), r) for v in axes.reshape(-1)]
    steps_l = [1] * len(axes_l) if steps is None else [int(v) for v in steps.reshape(-1)]
    out: dict[int, tuple[int, int, int]] = {}
    for a, s, e, st in zip(axes_l, starts.reshape(-1), ends.reshape(-1), steps_l):
        size = xs[a]
        if not isinstance(size, int):
            return None
        start, stop, step = slice(int(s), int(e), st).indices(size)
        out[a] = (start, stop, step)
    return out


def _slice_adjust(node: OpNode, ctx: AdjustContext) -> Adjustment:
    """Starts and ends are recounted over the kept input elements."""
    ranges = _slice_ranges(node, ctx.graph)
    x = node.inputs[0]
    if not ranges or (all(ctx.kept_of(Axis(x, a)) is None for a in ranges) and not _computed_bounds(node, ctx.graph)):
        return Adjustment()
    starts, ends = [], []
    for a, (start, stop, _step) in ranges.items():
        kept = ctx.kept_of(Axis(x, a))
        if kept is None:
            starts.append(start)
            ends.append(stop)
            continue
        new_start = int(np.count_nonzero(kept < start))
        starts.append(new_start)
        ends.append(new_start + int(np.count_nonzero((kept >= start) & (kept < stop))))
    axes = np.array(list(ranges), dtype=np.int64)
    if node.opset < 10:
        return Adjustment(attrs={"starts": starts, "ends": ends, "axes": [int(v) for v in axes]})
    return Adjustment(
        const_inputs={
            1: np.array(starts, dtype=np.int64),
            2: np.array(ends, dtype=np.int64),
            3: axes,
            4: np.array([ranges[int(a)][2] for a in axes], dtype=np.int64),
        }
    )


@register("Slice", adjust=_slice_adjust)
def slice_(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Unit-step slices map output element i to input element start+i."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y])
    if missing is not None:
        return missing
    ranges = _slice_ranges(node, graph)
    if ranges is None:
        return freeze_node(node, graph, "Slice: bounds are not static")
    r = len(_shapes(node, graph)[0])
    links = identity_links(x, y, ((i, i) for i in range(r) if i not in ranges))
    freezes: list[Freeze] = []
    for a, (start, stop, step) in ranges.items():
        n = len(range(start, stop, step))
        if step != 1:
            freezes += freeze_axes([Axis(x, a), Axis(y, a)], "Slice with a step other than 1")
        elif n:
            links.append(Link(Axis(x, a), Axis(y, a), start + np.arange(n), np.arange(n)))
    return Semantics(links=tuple(links), freezes=tuple(freezes))


@register("Gather")
def gather(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Axes other than the gathered one pass; index axes map to the output."""
    data, idx, y = node.inputs[0], node.inputs[1], node.outputs[0]
    missing = needs_shapes(node, graph, [data, idx, y])
    if missing is not None:
        return missing
    ds, is_ = graph.shape(data), graph.shape(idx)
    assert ds is not None and is_ is not None
    a = norm_axis(int(node.attrs.get("axis", 0)), len(ds))
    ni = len(is_)
    links = identity_links(data, y, ((i, i) for i in range(a)))
    links += identity_links(idx, y, ((i, a + i) for i in range(ni)))
    links += identity_links(data, y, ((i, i - 1 + ni) for i in range(a + 1, len(ds))))
    return Semantics(links=tuple(links), freezes=(Freeze(Axis(data, a), "Gather selects elements along this axis"),))


@register("Shape", "Size")
def shape_of(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Sizes read at run time must not change, unless every use is rewritten with the plan.

    The entries are followed through the shape arithmetic
    (:mod:`graphprune.ops.shape_values`); a read that reaches only the
    static entries of Reshape targets, Expand shapes or static Slice bounds
    (which the rewrite replaces by the new sizes) leaves its axis free.
    """
    _, bad = rewritten_uses(graph, node.outputs[0])
    x = node.inputs[0]
    axes = sorted(a for a in bad if a.tensor == x)
    return Semantics(freezes=freeze_axes(axes, f"{node.op_type} reads this axis's size at run time"))


def _pads(node: OpNode, graph: ChannelGraph) -> np.ndarray | None:
    return attr_or_input(node, graph, "pads", 1)


def _pad_adjust(node: OpNode, ctx: AdjustContext) -> Adjustment:
    """Pads count the kept elements before and after the input's elements."""
    y = node.outputs[0]
    pads = _pads(node, ctx.graph)
    ys = ctx.graph.shape(y)
    if pads is None or ys is None or (len(node.inputs) > 3 and node.inputs[3]):
        return Adjustment()
    r = len(ys)
    new = pads.astype(np.int64).reshape(-1).copy()
    changed = False
    for a in range(r):
        kept = ctx.kept_of(Axis(y, a))
        if kept is None or (pads[a] == 0 and pads[a + r] == 0):
            continue
        size = int(ys[a])  # type: ignore[arg-type]
        before, after = int(pads[a]), int(pads[a + r])
        new[a] = int(np.count_nonzero(kept < before))
        new[a + r] = int(np.count_nonzero(kept >= size - after))
        changed = True
    if not changed:
        return Adjustment()
    if node.opset < 11:
        return Adjustment(attrs={"pads": [int(v) for v in new]})
    return Adjustment(const_inputs={1: new})


@register("Pad", adjust=_pad_adjust)
def pad(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Constant padding shifts elements; padded elements are channels of their own."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y])
    if missing is not None:
        return missing
    pads = _pads(node, graph)
    if pads is None or (len(node.inputs) > 3 and node.inputs[3]):
        return freeze_node(node, graph, "Pad: pads or axes not static")
    xs, _ = _shapes(node, graph)
    r = len(xs)
    pads = pads.reshape(-1)
    mode = node.attrs.get("mode", "constant")
    links: list[Link] = []
    freezes: list[Freeze] = []
    for a in range(r):
        before, after = int(pads[a]), int(pads[a + r])
        if before == 0 and after == 0:
            links.append(Link(Axis(x, a), Axis(y, a)))
        elif mode == "constant" and before >= 0 and after >= 0 and isinstance(n := xs[a], int):
            links.append(Link(Axis(x, a), Axis(y, a), np.arange(n), before + np.arange(n)))
        else:
            freezes += freeze_axes([Axis(x, a), Axis(y, a)], f"Pad ({mode}) along this axis")
    return Semantics(links=tuple(links), freezes=tuple(freezes))


def _resize_adjust(node: OpNode, ctx: AdjustContext) -> Adjustment:
    y = node.outputs[0]
    if len(node.inputs) < 4 or not node.inputs[3]:
        return Adjustment()
    override = {a: int(k.size) for a in (0, 1) if (k := ctx.kept_of(Axis(y, a))) is not None}
    return Adjustment(shape_overrides={3: override}) if override else Adjustment()


@register("Resize", "Upsample", adjust=_resize_adjust)
def resize(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Batch and channel axes pass when they are not resized."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y])
    if missing is not None:
        return missing
    xs, ys = _shapes(node, graph)
    links = [Link(Axis(x, a), Axis(y, a)) for a in (0, 1) if a < len(xs) and xs[a] == ys[a]]
    reason = "Resize changes the size of this axis"
    freezes = freeze_axes([Axis(x, a) for a in (0, 1) if a < len(xs) and xs[a] != ys[a]], reason)
    return Semantics(links=tuple(links), freezes=freezes)
