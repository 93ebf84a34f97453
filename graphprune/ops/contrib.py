"""onnxruntime's fused transformer ops (``com.microsoft``, as ``onnxruntime.transformers.optimizer`` writes them).

Feed-forward channels pass through the fused element-wise ops (BiasGelu,
FastGelu, QuickGelu, BiasAdd) and FusedMatMul; the fused normalisations
(SkipLayerNormalization, SkipSimplifiedLayerNormalization,
SimplifiedLayerNormalization) freeze the axes they normalise, as
LayerNormalization does. The fused attention ops (Attention,
MultiHeadAttention, GroupQueryAttention) lose whole heads (whole key/value
groups with their query heads for GroupQueryAttention): their head counts
follow the plan. EmbedLayerNormalization and RotaryEmbedding on merged
heads freeze, with the reason.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from graphprune.ir.graph import Axis, ChannelGraph, OpNode
from graphprune.ops._common import broadcast_links, freeze_axes, freeze_node, identity_links, needs_shapes
from graphprune.ops.registry import AdjustContext, Adjustment, Link, Semantics, register, register_run

__all__ = ["MS", "SKIP_NORMS"]

MS = "com.microsoft"
Args = list[Any]

SKIP_NORMS = {"SkipLayerNormalization": (2, 3, 4), "SkipSimplifiedLayerNormalization": (2, -1, 3)}
"""onnxruntime's fused residual Add + norm: input indices of (scale, shift, bias); -1: none. Output 3 is the sum
(``input + skip + bias``), the stream that goes on; output 0 is the normalised sum."""


def _rank(graph: ChannelGraph, name: str) -> int:
    shape = graph.shape(name)
    assert shape is not None
    return len(shape)


@register("BiasGelu", "FastGelu", "QuickGelu", "BiasAdd", domain=MS)
def fused_elementwise(node: OpNode, graph: ChannelGraph) -> Semantics:
    """Gelu(x + bias), x + bias + skip: element-wise with broadcasting."""
    return broadcast_links(node, graph, [n for n in node.inputs if n])


def _skip_norm(node: OpNode, graph: ChannelGraph, reason: str) -> Semantics:
    """input + skip (+ bias), normalised over the last axis; the sum output and the statistics follow."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [*node.inputs, *node.outputs])
    if missing is not None:
        return missing
    r = _rank(graph, x)
    sem = broadcast_links(node, graph, node.inputs[:2])
    links = list(sem.links)
    for p in node.inputs[2:]:
        if p:
            links.append(Link(Axis(p, _rank(graph, p) - 1), Axis(y, r - 1)))
    for extra in node.outputs[1:]:
        if extra and graph.shape(extra) is not None and _rank(graph, extra) == r:
            links += identity_links(y, extra, ((i, i) for i in range(r - 1)))
            if graph.shape(extra)[-1] == graph.shape(y)[-1]:  # type: ignore[index]
                links.append(Link(Axis(y, r - 1), Axis(extra, r - 1)))
    return Semantics(links=tuple(links), freezes=sem.freezes + freeze_axes([Axis(x, r - 1)], reason))


@register("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS)
def skip_layer_norm(node: OpNode, graph: ChannelGraph) -> Semantics:
    return _skip_norm(node, graph, f"{node.op_type} normalises over this axis (pruning would change its statistics)")


@register("SimplifiedLayerNormalization", "RMSNormalization")
def simplified_layer_norm(node: OpNode, graph: ChannelGraph) -> Semantics:
    """RMSNorm (onnxruntime registers it in the default domain; ONNX's own from opset 23): the normalised axes freeze."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [*node.inputs, y])
    if missing is not None:
        return missing
    r = _rank(graph, x)
    first = int(node.attrs.get("axis", -1)) % r
    links = identity_links(x, y, ((i, i) for i in range(r)))
    for p in node.inputs[1:]:
        if p:
            pr = _rank(graph, p)
            links += [Link(Axis(p, i), Axis(y, r - pr + i)) for i in range(pr)]
    reason = f"{node.op_type} (RMSNorm) normalises over this axis (pruning would change its statistics)"
    return Semantics(links=tuple(links), freezes=freeze_axes((Axis(x, i) for i in range(first, r)), reason))


@register("EmbedLayerNormalization", domain=MS)
def embed_layer_norm(node: OpNode, graph: ChannelGraph) -> Semantics:
    return freeze_node(node, graph, "EmbedLayerNormalization: embeddings summed and normalised over the hidden axis")


@register("RotaryEmbedding", domain=MS)
def rotary(node: OpNode, graph: ChannelGraph) -> Semantics:
    """(B, N, S, d) passes heads, batch and positions; the rotated head size freezes; 3-D input merges the heads."""
    x, y = node.inputs[0], node.outputs[0]
    missing = needs_shapes(node, graph, [x, y])
    if missing is not None:
        return missing
    if _rank(graph, x) != 4:
        return freeze_node(node, graph, "RotaryEmbedding: 3-D input merges the heads into the hidden axis")
    links = identity_links(x, y, ((i, i) for i in range(4)))
    return Semantics(links=tuple(links), freezes=freeze_axes([Axis(x, 3)], "RotaryEmbedding rotates pairs of this axis"))


def _fused_matmul_macs(node: OpNode, graph: ChannelGraph) -> int:
    a, y = graph.shape(node.inputs[0]), graph.shape(node.outputs[0])
    if a is None or y is None:
        return 0
    k = a[-2] if int(node.attrs.get("transA", 0)) else a[-1]
    return math.prod(d for d in (*y, k) if isinstance(d, int))


@register("FusedMatMul", domain=MS, macs=_fused_matmul_macs)
def fused_matmul(node: OpNode, graph: ChannelGraph) -> Semantics:
    """alpha * op(A) @ op(B), op a transpose of the last two axes when transA / transB."""
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    missing = needs_shapes(node, graph, [a, b, y])
    if missing is not None:
        return missing
    if int(node.attrs.get("transBatchA", 0)) or int(node.attrs.get("transBatchB", 0)):
        return freeze_node(node, graph, "FusedMatMul: batch transposes are not supported")
    ra, rb, ry = _rank(graph, a), _rank(graph, b), _rank(graph, y)
    if min(ra, rb) < 2:
        return freeze_node(node, graph, "FusedMatMul: 1-D operands are not supported")
    ta, tb = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    am, ak = (ra - 1, ra - 2) if ta else (ra - 2, ra - 1)
    bk, bn = (rb - 1, rb - 2) if tb else (rb - 2, rb - 1)
    links = [Link(Axis(a, am), Axis(y, ry - 2)), Link(Axis(b, bn), Axis(y, ry - 1)), Link(Axis(a, ak), Axis(b, bk))]
    ys = graph.shape(y)
    assert ys is not None
    for name, rank in ((a, ra), (b, rb)):
        shape = graph.shape(name)
        assert shape is not None
        off = (ry - 2) - (rank - 2)
        links += [Link(Axis(name, i), Axis(y, off + i)) for i in range(rank - 2) if not (shape[i] == 1 and ys[off + i] != 1)]
    return Semantics(links=tuple(links))


def _units(src: str, axis: int, offset: int, per: int, units: int, out: str, out_per: int) -> Link:
    """Elements ``offset + u * per + e`` of ``src`` belong to unit u: its representative is ``out[u * out_per]``."""
    idx = np.arange(units * per)
    return Link(Axis(src, axis), Axis(out, 2), offset + idx, (idx // per) * out_per)


def _unit_self(out: str, units: int, out_per: int) -> Link:
    """Every element of a unit in ``out`` is that unit's channel (a head goes whole)."""
    idx = np.arange(units * out_per)
    return Link(Axis(out, 2), Axis(out, 2), idx, idx // out_per * out_per)


def _static(graph: ChannelGraph, name: str, axis: int) -> int | None:
    return graph.tensors[name].size(axis) if name else None


def _heads_adjust(node: OpNode, ctx: AdjustContext) -> Adjustment:
    """num_heads (kv_num_heads, qkv_hidden_sizes) follow the kept heads of the output."""
    y = node.outputs[0]
    kept = ctx.kept_of(Axis(y, 2))
    old = ctx.old_size(Axis(y, 2))
    if kept is None or not old:
        return Adjustment()
    heads = int(node.attrs["num_heads"])
    per = old // heads
    if kept.size % per:
        raise ValueError(f"keeps {kept.size} output elements, not whole heads of {per}")
    attrs: dict[str, Any] = {"num_heads": int(kept.size) // per}
    if node.op_type == "GroupQueryAttention":
        rep = heads // int(node.attrs["kv_num_heads"])
        attrs["kv_num_heads"] = attrs["num_heads"] // rep
    sizes = node.attrs.get("qkv_hidden_sizes")
    if sizes is not None:
        attrs["qkv_hidden_sizes"] = [int(v) * attrs["num_heads"] // heads for v in sizes]
    return Adjustment(attrs=attrs)


@register("Attention", domain=MS, adjust=_heads_adjust)
def ms_attention(node: OpNode, graph: ChannelGraph) -> Semantics:
    """input (B, S, D) @ packed weights (D, Q | K | V) + bias -> (B, S, V): whole heads go.

    Past/present key-values, rotary and an explicit scale-free 3-D bias freeze every axis.
    """
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    bias = node.inputs[2] if len(node.inputs) > 2 else ""
    missing = needs_shapes(node, graph, [x, w, y, bias])
    if missing is not None:
        return missing
    if (len(node.inputs) > 4 and node.inputs[4]) or any(node.outputs[1:]) or int(node.attrs.get("do_rotary", 0)):
        return freeze_node(node, graph, "Attention: past/present key-values or rotary are not supported")
    heads = int(node.attrs["num_heads"])
    total, hv = _static(graph, w, 1), _static(graph, y, 2)
    sizes = [int(v) for v in node.attrs.get("qkv_hidden_sizes", ())] or ([total // 3] * 3 if total else [])
    if not sizes or hv is None or sum(sizes) != total or sizes[2] != hv or any(v % heads for v in sizes):
        return freeze_node(node, graph, "Attention: packed weight sizes not understood")
    dq, dk, dv = (v // heads for v in sizes)
    links = [Link(Axis(x, 2), Axis(w, 0)), Link(Axis(x, 0), Axis(y, 0)), Link(Axis(x, 1), Axis(y, 1)),
             _units(w, 1, 0, dq, heads, y, dv), _units(w, 1, sizes[0], dk, heads, y, dv),
             Link(Axis(w, 1), Axis(y, 2), sizes[0] + sizes[1] + np.arange(hv), np.arange(hv)), _unit_self(y, heads, dv)]
    if bias:
        links.append(Link(Axis(bias, 0), Axis(w, 1)))
    links += _head_bias(node, graph, 5, y, heads, dv)
    return Semantics(links=tuple(links))


def _head_bias(node: OpNode, graph: ChannelGraph, index: int, y: str, heads: int, dv: int) -> list[Link]:
    """An attention bias (B, N, S, T) follows the heads; a broadcast one (1 head) says nothing."""
    bias = node.inputs[index] if len(node.inputs) > index else ""
    shape = graph.shape(bias) if bias else None
    if shape is None or len(shape) != 4 or shape[1] != heads:
        return []
    return [Link(Axis(bias, 1), Axis(y, 2), np.arange(heads), np.arange(heads) * dv)]


@register("MultiHeadAttention", domain=MS, adjust=_heads_adjust)
def ms_multi_head_attention(node: OpNode, graph: ChannelGraph) -> Semantics:
    """query (B, S, N*d), key (B, L, N*d), value (B, L, N*dv) [+ bias (Q | K | V)] -> (B, S, N*dv): whole heads go.

    Packed or 4-D key/values and past/present key-values freeze every axis.
    """
    q, k, v = node.inputs[:3]
    bias = node.inputs[3] if len(node.inputs) > 3 else ""
    y = node.outputs[0]
    missing = needs_shapes(node, graph, [q, k, v, bias, y])
    if missing is not None:
        return missing
    if not k or not v or any(node.inputs[6:]) or any(node.outputs[1:]) or any(_rank(graph, t) != 3 for t in (q, k, v)):
        return freeze_node(node, graph, "MultiHeadAttention: packed, 4-D or cached key/values are not supported")
    heads = int(node.attrs["num_heads"])
    hq, hk, hv = (_static(graph, t, 2) for t in (q, k, v))
    if hq is None or hk is None or hv is None or any(n % heads for n in (hq, hk, hv)):
        return freeze_node(node, graph, "MultiHeadAttention: hidden sizes not static multiples of the heads")
    dq, dk, dv = hq // heads, hk // heads, hv // heads
    links = [Link(Axis(q, 0), Axis(y, 0)), Link(Axis(q, 1), Axis(y, 1)), Link(Axis(k, 0), Axis(y, 0)),
             Link(Axis(k, 1), Axis(v, 1)), _units(q, 2, 0, dq, heads, y, dv), _units(k, 2, 0, dk, heads, y, dv),
             Link(Axis(v, 2), Axis(y, 2)), _unit_self(y, heads, dv)]
    if bias:
        links += [_units(bias, 0, 0, dq, heads, y, dv), _units(bias, 0, hq, dk, heads, y, dv),
                  Link(Axis(bias, 0), Axis(y, 2), hq + hk + np.arange(hv), np.arange(hv))]
    links += _head_bias(node, graph, 5, y, heads, dv)
    return Semantics(links=tuple(links))


@register("GroupQueryAttention", domain=MS, adjust=_heads_adjust)
def ms_group_query_attention(node: OpNode, graph: ChannelGraph) -> Semantics:
    """query (B, S, N*d), key / value (B, S, G*d), past / present (B, G, T, d): whole key/value groups go with their query heads.

    Packed QKV (no key input) and a head size that changes freeze every axis;
    present key/values that are graph outputs (a decoder's cache) freeze
    the groups through the graph-output rule.
    """
    q, k, v = node.inputs[:3]
    y = node.outputs[0]
    missing = needs_shapes(node, graph, [n for n in (*node.inputs, *node.outputs) if n])
    if missing is not None:
        return missing
    if not k or not v:
        return freeze_node(node, graph, "GroupQueryAttention: packed QKV is not supported")
    heads, groups = int(node.attrs["num_heads"]), int(node.attrs["kv_num_heads"])
    hq, hk, hv = (_static(graph, t, 2) for t in (q, k, v))
    if hq is None or hk is None or hv is None or heads % groups or hq % heads or hk != hv or hk % groups:
        return freeze_node(node, graph, "GroupQueryAttention: hidden sizes not static multiples of the heads")
    d, rep = hq // heads, heads // groups
    if hk // groups != d:
        return freeze_node(node, graph, "GroupQueryAttention: key/value head size differs from the query's")
    unit = rep * d
    links = [Link(Axis(q, 0), Axis(y, 0)), Link(Axis(q, 1), Axis(y, 1)), Link(Axis(k, 0), Axis(y, 0)),
             _units(q, 2, 0, unit, groups, y, unit), _units(k, 2, 0, d, groups, y, unit),
             _units(v, 2, 0, d, groups, y, unit), Link(Axis(q, 2), Axis(y, 2)), _unit_self(y, groups, unit)]
    cache = [n for n in (*node.inputs[3:5], *node.outputs[1:3]) if n]
    for t in cache:
        if _rank(graph, t) != 4:
            return freeze_node(node, graph, "GroupQueryAttention: key/value cache is not (B, G, T, d)")
        links.append(Link(Axis(t, 1), Axis(y, 2), np.arange(groups), np.arange(groups) * unit))
    return Semantics(links=tuple(links))


@register_run("BiasGelu", domain=MS)
def _bias_gelu(_node: OpNode, args: Args) -> tuple[Any, ...]:
    return (F.gelu(args[0] + args[1]),)


@register_run("FastGelu", domain=MS)
def _fast_gelu(_node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0] + args[1] if len(args) > 1 and args[1] is not None else args[0]
    return (F.gelu(x, approximate="tanh"),)


@register_run("QuickGelu", domain=MS)
def _quick_gelu(node: OpNode, args: Args) -> tuple[Any, ...]:
    return (args[0] * torch.sigmoid(float(node.attrs.get("alpha", 1.702)) * args[0]),)


@register_run("BiasAdd", domain=MS)
def _bias_add(_node: OpNode, args: Args) -> tuple[Any, ...]:
    return (args[0] + args[1] + args[2],)


def _rms(x: torch.Tensor, axis: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    dims = tuple(range(axis, x.dim()))
    inv = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return x * inv, inv


@register_run("SimplifiedLayerNormalization", "RMSNormalization")
def _simplified_ln(node: OpNode, args: Args) -> tuple[Any, ...]:
    x = args[0]
    y, inv = _rms(x, int(node.attrs.get("axis", -1)) % x.dim(), float(node.attrs.get("epsilon", 1e-5)))
    return (y * args[1], inv)


@register_run("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS)
def _skip_ln(node: OpNode, args: Args) -> tuple[Any, ...]:
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    at = SKIP_NORMS[node.op_type][2]
    bias = args[at] if len(args) > at else None
    s = args[0] + args[1] + (bias if bias is not None else 0)
    eps = float(node.attrs.get("epsilon", 1e-12))
    if simplified:
        y, inv = _rms(s, s.dim() - 1, eps)
        mean = torch.zeros_like(inv)
        y = y * args[2]
    else:
        mean = s.mean(-1, keepdim=True)
        inv = torch.rsqrt((s - mean).pow(2).mean(-1, keepdim=True) + eps)
        y = (s - mean) * inv * args[2]
        beta = args[3] if len(args) > 3 else None
        y = y + beta if beta is not None else y
    return (y, mean, inv, s)


@register_run("FusedMatMul", domain=MS)
def _fused_matmul(node: OpNode, args: Args) -> tuple[Any, ...]:
    a, b = args[0], args[1]
    if int(node.attrs.get("transA", 0)):
        a = a.transpose(-1, -2)
    if int(node.attrs.get("transB", 0)):
        b = b.transpose(-1, -2)
    return (torch.matmul(a, b) * float(node.attrs.get("alpha", 1.0)),)
