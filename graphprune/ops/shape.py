"""Ops that move, split, join, slice or reshape axes."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graphprune.ir.graph import Axis, ChannelGraph, Dim, OpNode
from graphprune.ops._common import (
    axes_of,
    freeze_axes,
    freeze_node,
    identity_links,
    needs_shapes,
    norm_axis,
)
from graphprune.ops.registry import (
    AdjustContext,
    Adjustment,
    Factor,
    Freeze,
    Link,
    Semantics,
    attr_or_input,
    register,
)

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


def factorize(
    a: Sequence[Dim], b: Sequence[Dim]
) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of axes of ``a`` and ``b`` with equal products (row-major).

    Size-1 axes form runs of their own with nothing on the other side. A
    symbolic dim only pairs with the same symbol. Returns None when the
    shapes cannot be matched statically.
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
        ai, bj = a[i], b[j]
        if not isinstance(ai, int) or not isinstance(bj, int):
            if ai is None or ai != bj:
                return None
            runs.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        pa, pb, ia, jb = ai, bj, [i], [j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                da = a[i] if i < len(a) else None
                if not isinstance(da, int):
                    return None
                pa, ia = pa * da, [*ia, i]
                i += 1
            else:
                db = b[j] if j < len(b) else None
                if not isinstance(db, int):
                    return None
                pb, jb = pb * db, [*jb, j]
                j += 1
        runs.append((ia, jb))
    return runs


def _reshape_adjust(node: OpNode, ctx: AdjustContext) -> Adjustment:
    """A Reshape's target shape follows the new sizes of its output axes."""
    if node.op_type != "Reshape":
        return Adjustment()
    y = node.outputs[0]
    shape = ctx.graph.shape(y) or ()
    override = {j: int(k.size) for j in range(len(shape)) if (k := ctx.kept_of(Axis(y, j))) is not None}
    return Adjustment(shape_overrides={1: override}) if override else Adjustment()


@register(
    "Reshape", "Flatten", "Squeeze", "Unsqueeze",
    adjust=_reshape_adjust,
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
        elif len(ia) == 1 and len(jb) > 1:
            factors.append(Factor(Axis(x, ia[0]), tuple(Axis(y, j) for j in jb), tuple(int(ys[j]) for j in jb)))  # type: ignore[arg-type]
        elif len(jb) == 1 and len(ia) > 1:
            factors.append(Factor(Axis(y, jb[0]), tuple(Axis(x, i) for i in ia), tuple(int(xs[i]) for i in ia)))  # type: ignore[arg-type]
        elif ia and jb:
            reason = f"{node.op_type} regroups axes {ia} -> {jb}"
            freezes += freeze_axes([*(Axis(x, i) for i in ia), *(Axis(y, j) for j in jb)], reason)
    return Semantics(links=tuple(links), freezes=tuple(freezes), factors=tuple(factors))


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


@register("Split", adjust=_split_adjust)
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
    return [attr_or_input(node, graph, name, i + 1) for i, name in enumerate(_SLICE_OPERANDS)]


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
    if not ranges or all(ctx.kept_of(Axis(x, a)) is None for a in ranges):
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
    """Sizes read at run time must not change: the axes read are frozen."""
    x = node.inputs[0]
    axes = axes_of(graph, x)
    if node.op_type == "Shape" and axes:
        r = len(axes)
        start = int(node.attrs.get("start", 0))
        end = int(node.attrs.get("end", r))
        read = range(r)[slice(start, end)]
        axes = [Axis(x, i) for i in _gathered(node, graph, read)]
    return Semantics(freezes=freeze_axes(axes, f"{node.op_type} reads this axis's size at run time"))


def _gathered(node: OpNode, graph: ChannelGraph, read: range) -> list[int]:
    """Axes whose sizes are used, following constant Gathers and Slices of the shape."""
    return sorted(_read_axes(graph, node.outputs[0], list(read), depth=0))


def _read_axes(graph: ChannelGraph, shape_tensor: str, axes: list[int], depth: int) -> set[int]:
    uses = graph.consumers().get(shape_tensor, [])
    if depth > 4 or not uses or graph.shape(shape_tensor) is None or len(graph.shape(shape_tensor) or ()) != 1:
        return set(axes)
    read: set[int] = set()
    for use in uses:
        picked = _picked(use, graph, axes)
        if picked is None:
            return set(axes)
        if use.op_type == "Gather":
            read.update(picked)
        else:
            read.update(_read_axes(graph, use.outputs[0], picked, depth + 1))
    return read


def _picked(use: OpNode, graph: ChannelGraph, axes: list[int]) -> list[int] | None:
    """Entries of a shape vector that a constant Gather or unit-step Slice keeps."""
    try:
        if use.op_type == "Gather" and int(use.attrs.get("axis", 0)) == 0 and use.inputs[0]:
            idx = graph.const(use.inputs[1])
            return None if idx is None else [axes[int(i)] for i in idx.reshape(-1)]
        if use.op_type == "Slice" and use.opset >= 10:
            starts, ends, steps = (graph.const(use.inputs[i]) if len(use.inputs) > i and use.inputs[i] else None for i in (1, 2, 4))
            if starts is None or ends is None or (steps is not None and int(steps.reshape(-1)[0]) != 1):
                return None
            return axes[int(starts.reshape(-1)[0]) : int(ends.reshape(-1)[0])] if starts.size == 1 else None
    except (IndexError, ValueError):
        return None
    return None


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
