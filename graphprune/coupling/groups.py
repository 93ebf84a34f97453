"""Coupling groups: the sets of channels that must be removed together.

Every axis of every tensor is split into elements; the op semantics table
links elements that are the same channel. Connected elements form one
channel; channels that touch the same axes the same number of times form one
group (a conv's filters, the BN after it, the next conv's inputs...). A
channel that touches a frozen axis cannot be removed.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import networkx as nx
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from graphprune.errors import BadInputError
from graphprune.ir.dtypes import WEIGHT_TYPES
from graphprune.ir.graph import Axis, ChannelGraph, OpNode
from graphprune.ops import Factor, Freeze, Link, Semantics, lookup
from graphprune.ops._common import freeze_node

__all__ = ["Coupling", "Group", "Member", "build_groups", "node_semantics"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Member:
    """Where a group's channels live in one tensor axis.

    Attributes:
        tensor: Tensor name.
        axis: Axis of that tensor.
        indices: (channels, m) element indices: channel c is elements
            ``indices[c]`` of this axis (m > 1 for grouped or reshaped axes).
        kind: ``param``, ``activation`` or ``input``.
    """

    tensor: str
    axis: int
    indices: np.ndarray
    kind: str

    @property
    def label(self) -> str:
        return f"{self.tensor}[{self.axis}]"


@dataclasses.dataclass(frozen=True)
class Group:
    """Channels removed together.

    Attributes:
        id: Stable index (graph order).
        channels: Number of channels.
        members: Every tensor axis the channels live in.
        frozen: Why the group cannot be pruned; empty when it can.
    """

    id: int
    channels: int
    members: tuple[Member, ...]
    frozen: tuple[str, ...]

    @property
    def prunable(self) -> bool:
        return not self.frozen

    @property
    def anchor(self) -> str:
        """A stable name: the first weight axis the group lives in."""
        params = [m for m in self.members if m.kind == "param"]
        return (params or list(self.members))[0].label

    def params(self) -> list[Member]:
        return [m for m in self.members if m.kind == "param"]


@dataclasses.dataclass(frozen=True)
class Coupling:
    """All weight-carrying groups of a graph.

    Attributes:
        groups: Groups that live in at least one weight and one activation.
        structural_axes: Number of other axis groups (batch, spatial, ...).
    """

    groups: tuple[Group, ...]
    structural_axes: int

    @property
    def prunable(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def by_id(self, gid: int) -> Group:
        return self.groups[gid]


def node_semantics(node: OpNode, graph: ChannelGraph) -> Semantics:
    """The table's answer for one node; unknown ops and failures freeze."""
    if node.has_subgraph or node.subgraph_refs:
        return freeze_node(node, graph, f"control flow op '{node.op_type}' (subgraphs are not pruned)")
    spec = lookup(node.domain, node.op_type)
    if spec is None or spec.couple is None:
        name = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        return freeze_node(node, graph, f"unsupported op '{name}'")
    try:
        return spec.couple(node, graph)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        log.debug("handler for %s failed on %s", node.op_type, node.name, exc_info=True)
        return freeze_node(node, graph, f"{node.op_type}: could not analyse ({exc})")


MAX_AXIS = 1 << 17
"""Axes longer than this are treated like dynamic ones (one frozen element): no channel axis is that long."""

MAX_ELEMENTS = 1 << 26
"""Refuse graphs whose axes add up to more elements than this (memory for the channel solve)."""


@dataclasses.dataclass
class _Elements:
    """Every axis of every tensor laid out as one array of elements."""

    axes: list[Axis]
    sizes: np.ndarray
    offsets: np.ndarray
    index: dict[Axis, int]
    dynamic: np.ndarray

    @classmethod
    def of(cls, graph: ChannelGraph) -> _Elements:
        axes: list[Axis] = []
        sizes: list[int] = []
        dynamic: list[bool] = []
        for name in _graph_order(graph):
            info = graph.tensors[name]
            for i, d in enumerate(info.shape or ()):
                axes.append(Axis(info.name, i))
                size = d if isinstance(d, int) and 0 <= d <= MAX_AXIS else None
                sizes.append(1 if size is None else size)
                dynamic.append(size is None)
        size_arr = np.asarray(sizes, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(size_arr)]).astype(np.int64)
        if offsets[-1] > MAX_ELEMENTS:
            raise BadInputError(f"the model's tensors have {int(offsets[-1]):,} axis elements in all: too many to analyse")
        return cls(axes, size_arr, offsets, {a: k for k, a in enumerate(axes)}, np.asarray(dynamic, bool))

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def axis_of_elements(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.axes)), self.sizes)


def _graph_order(graph: ChannelGraph) -> list[str]:
    """Tensor names in execution order (constants at their first use)."""
    seen: dict[str, None] = dict.fromkeys(graph.inputs)
    for node in graph.nodes:
        seen.update(dict.fromkeys(n for n in (*node.inputs, *node.subgraph_refs, *node.outputs) if n))
    seen.update(dict.fromkeys(graph.tensors))
    return [n for n in seen if n in graph.tensors]


def _link_edges(el: _Elements, links: Iterable[Link]) -> tuple[np.ndarray, np.ndarray, list[Axis]]:
    """Element pairs of all links; axes of malformed links are returned to freeze."""
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    bad: list[Axis] = []
    for link in links:
        ka, kb = el.index.get(link.a), el.index.get(link.b)
        if ka is None or kb is None:
            continue
        na, nb = int(el.sizes[ka]), int(el.sizes[kb])
        if link.a_idx is None:
            if el.dynamic[ka] or el.dynamic[kb]:
                # A dynamic axis is one frozen pseudo element: tie the other side to it.
                if nb == 1:
                    ia, ib = np.arange(na), np.zeros(na, np.int64)
                else:
                    ia, ib = np.zeros(nb, np.int64), np.arange(nb)
            elif na != nb:
                bad += [link.a, link.b]
                continue
            else:
                ia = ib = np.arange(na)
        else:
            ia, ib = np.asarray(link.a_idx, np.int64), np.asarray(link.b_idx, np.int64)
            if el.dynamic[ka] or el.dynamic[kb] or ia.max(initial=0) >= na or ib.max(initial=0) >= nb:
                bad += [link.a, link.b]
                continue
        src.append(el.offsets[ka] + ia)
        dst.append(el.offsets[kb] + ib)
    empty = np.zeros(0, np.int64)
    return (np.concatenate(src) if src else empty, np.concatenate(dst) if dst else empty, bad)


@dataclasses.dataclass
class _Solution:
    """Channel labels per element and group id per label."""

    label: np.ndarray
    group_of_label: np.ndarray
    label_frozen: np.ndarray
    n_groups: int


def _solve(el: _Elements, links: list[Link], frozen_axes: dict[Axis, list[str]]) -> tuple[_Solution, dict[Axis, list[str]]]:
    src, dst, bad = _link_edges(el, links)
    reasons = {a: list(r) for a, r in frozen_axes.items()}
    for a in bad:
        reasons.setdefault(a, []).append("inconsistent channel mapping")
    n = el.total
    adj = coo_matrix((np.ones(src.size, np.int8), (src, dst)), shape=(n, n))
    _, label = connected_components(adj, directed=False)
    frozen_el = np.zeros(n, bool)
    frozen_el[el.offsets[np.flatnonzero(el.dynamic)]] = True
    for a in reasons:
        k = el.index.get(a)
        if k is not None:
            frozen_el[el.offsets[k] : el.offsets[k + 1]] = True
    n_labels = int(label.max()) + 1 if n else 0
    label_frozen = np.zeros(n_labels, bool)
    label_frozen[label[frozen_el]] = True
    # A channel's signature: which axes it touches, how often (two random hashes).
    axis_of = el.axis_of_elements()
    rng = np.random.default_rng(0)
    sig = np.zeros((n_labels, 2), np.int64)
    for col in range(2):
        np.add.at(sig[:, col], label, rng.integers(1, 2**40, len(el.axes))[axis_of])
    _, group_of_label = np.unique(sig, axis=0, return_inverse=True)
    group_of_label = group_of_label.reshape(-1)
    return _Solution(label, group_of_label, label_frozen, int(group_of_label.max()) + 1 if n else 0), reasons


def _axis_groups(el: _Elements, sol: _Solution, axis: Axis) -> set[int]:
    k = el.index[axis]
    return set(sol.group_of_label[sol.label[el.offsets[k] : el.offsets[k + 1]]].tolist())


def _choose_factors(
    el: _Elements, sol: _Solution, factors: list[tuple[OpNode, Factor]], status: _GroupStatus
) -> tuple[list[Link], dict[Axis, list[str]]]:
    """Link each reshaped axis to one factor, consistently across reshapes.

    Preference: a factor whose groups another reshape already chose, then the
    one the op prefers (attention heads), then one that carries weights of
    its own, then the innermost; a factor another reshape froze is avoided.
    """
    chosen: set[frozenset[int]] = set()
    rejected: set[frozenset[int]] = set()
    links: list[Link] = []
    freezes: dict[Axis, list[str]] = {}
    for node, f in factors:
        cands = []
        for p, (part, size) in enumerate(zip(f.parts, f.part_sizes)):
            groups = frozenset(_axis_groups(el, sol, part))
            if size > 1 and not groups & status.frozen:
                cands.append((p, groups))
        ranked = sorted(
            (c for c in cands if c[1] not in rejected or c[1] in chosen),
            key=lambda c: (c[1] not in chosen, c[0] != f.prefer, not c[1] <= status.weighted, -c[0]),
        )
        total = int(np.prod(f.part_sizes, dtype=np.float64))
        if not ranked or total > MAX_AXIS:
            reason = f"{node.op_type}: axis too large" if ranked else _no_factor_reason(node, f, el, sol, status)
            for a in (f.whole, *f.parts):
                freezes.setdefault(a, []).append(reason)
            continue
        p, groups = ranked[0]
        chosen.add(groups)
        stride = int(np.prod(f.part_sizes[p + 1 :], dtype=np.int64))
        whole = np.arange(total)
        links.append(Link(f.whole, f.parts[p], whole, (whole // stride) % f.part_sizes[p]))
        for q, (part, size) in enumerate(zip(f.parts, f.part_sizes)):
            if q != p and size > 1:
                rejected.add(frozenset(_axis_groups(el, sol, part)))
                freezes.setdefault(part, []).append(
                    f"{node.op_type}: another factor of this merged or split axis is pruned"
                )
    return links, freezes


def _no_factor_reason(node: OpNode, f: Factor, el: _Elements, sol: _Solution, status: _GroupStatus) -> str:
    """Why no factor of a merged or split axis can be pruned: its parts' own reasons, when they have some."""
    why: list[str] = []
    for part, size in zip(f.parts, f.part_sizes):
        if size > 1:
            for g in sorted(_axis_groups(el, sol, part)):
                why += [r for r in status.reasons.get(g, ()) if r not in why]
    base = f"{node.op_type}: merged or split axis with no prunable factor"
    return f"{base} ({'; '.join(why[:3])})" if why else base


def _collect(graph: ChannelGraph) -> tuple[list[Link], dict[Axis, list[str]], list[tuple[OpNode, Factor]]]:
    links: list[Link] = []
    freezes: dict[Axis, list[str]] = {}
    factors: list[tuple[OpNode, Factor]] = []

    def add(fr: Iterable[Freeze]) -> None:
        for f in fr:
            freezes.setdefault(f.axis, []).append(f.reason)

    for node in graph.nodes:
        sem = node_semantics(node, graph)
        links += sem.links
        add(sem.freezes)
        factors += [(node, f) for f in sem.factors]
    for name in graph.inputs:
        add(Freeze(Axis(name, i), "graph input") for i in range(len(graph.shape(name) or ())))
    for name in graph.outputs:
        add(Freeze(Axis(name, i), "graph output") for i in range(len(graph.shape(name) or ())))
    return links, freezes, factors


@dataclasses.dataclass(frozen=True)
class _GroupStatus:
    """Pass-one facts per group: frozen ones, and ones that carry weights."""

    frozen: frozenset[int]
    weighted: frozenset[int]
    reasons: dict[int, list[str]]


def _groups_with(sol: _Solution, kind_of_element: np.ndarray, kind: str) -> np.ndarray:
    """Per group: whether any of its elements lies in a tensor of ``kind``."""
    found = np.zeros(sol.n_groups, bool)
    found[sol.group_of_label[sol.label][kind_of_element == kind]] = True
    return found


def _element_kinds(el: _Elements, graph: ChannelGraph) -> np.ndarray:
    return np.array([_kind(graph, a) for a in el.axes])[el.axis_of_elements()]


def _group_status(el: _Elements, sol: _Solution, graph: ChannelGraph, reasons: dict[Axis, list[str]]) -> _GroupStatus:
    has_param = _groups_with(sol, _element_kinds(el, graph), "param")
    frozen = np.zeros(sol.n_groups, bool)
    frozen[sol.group_of_label[sol.label_frozen]] = True
    by_group: dict[int, list[str]] = {}
    for axis, why in reasons.items():
        if axis in el.index:
            for g in _axis_groups(el, sol, axis):
                by_group.setdefault(g, []).extend(r for r in why if r not in by_group.get(g, ()))
    return _GroupStatus(frozenset(np.flatnonzero(frozen).tolist()), frozenset(np.flatnonzero(has_param).tolist()), by_group)


def _kind(graph: ChannelGraph, axis: Axis) -> str:
    info = graph.tensors[axis.tensor]
    if info.kind == "param" and info.dtype not in WEIGHT_TYPES:
        return "index"
    return info.kind


def build_groups(graph: ChannelGraph) -> Coupling:
    """Compute the coupling groups of a channel graph.

    Args:
        graph: The graph, with shapes.

    Returns:
        The weight-carrying groups, frozen ones with their reasons.
    """
    el = _Elements.of(graph)
    links, freezes, factors = _collect(graph)
    sol, first_reasons = _solve(el, links, freezes)
    extra_links, extra_freezes = _choose_factors(el, sol, factors, _group_status(el, sol, graph, first_reasons))
    for a, r in extra_freezes.items():
        freezes.setdefault(a, []).extend(r)
    sol, reasons = _solve(el, links + extra_links, freezes)
    return _groups(graph, el, sol, reasons)


def _groups(graph: ChannelGraph, el: _Elements, sol: _Solution, reasons: dict[Axis, list[str]]) -> Coupling:
    axis_of = el.axis_of_elements()
    kinds = np.array([_kind(graph, a) for a in el.axes])
    local = np.arange(el.total) - el.offsets[axis_of]
    g_of_el = sol.group_of_label[sol.label]
    element_kinds = kinds[axis_of]
    keep = _groups_with(sol, element_kinds, "param") & _groups_with(sol, element_kinds, "activation")
    # Channel order inside a group: by first element; groups ordered the same way.
    first = np.full(sol.label_frozen.size, el.total, np.int64)
    np.minimum.at(first, sol.label, np.arange(el.total))
    sel = np.flatnonzero(keep[g_of_el])
    order = np.lexsort((local[sel], first[sol.label[sel]], axis_of[sel], g_of_el[sel]))
    sel = sel[order]
    g_sel = g_of_el[sel]
    bounds = np.flatnonzero(np.diff(g_sel)) + 1
    chunks = np.split(sel, bounds) if sel.size else []
    raw: list[tuple[int, int, tuple[Member, ...], tuple[str, ...]]] = []
    for chunk in chunks:
        gid = int(g_of_el[chunk[0]])
        labels = np.unique(sol.label[chunk])
        n_ch = labels.size
        members: list[Member] = []
        why: list[str] = []
        ax = axis_of[chunk]
        cuts = np.flatnonzero(np.diff(ax)) + 1
        for part in np.split(chunk, cuts):
            axis = el.axes[int(axis_of[part[0]])]
            members.append(Member(axis.tensor, axis.axis, local[part].reshape(n_ch, -1), str(kinds[axis_of[part[0]]])))
            why += [r for r in reasons.get(axis, ()) if r not in why]
        if sol.label_frozen[labels].any() and not why:
            why.append("dynamic (or oversized) axis")
        if n_ch < 2 and not why:
            why.append("single channel")
        raw.append((int(first[labels].min()), gid, tuple(members), tuple(why)))
    raw.sort(key=lambda r: r[0])
    groups = tuple(
        Group(i, members[0].indices.shape[0], members, why) for i, (_, _, members, why) in enumerate(raw)
    )
    return Coupling(groups, int(sol.n_groups - keep.sum()))


def to_networkx(coupling: Coupling) -> nx.Graph:
    """Bipartite view: groups linked to the tensors they live in (for tools and plots)."""
    g = nx.Graph()
    for group in coupling.groups:
        g.add_node(("group", group.id), channels=group.channels, prunable=group.prunable)
        for m in group.members:
            g.add_edge(("group", group.id), ("tensor", m.tensor), axis=m.axis)
    return g
