"""The op table's handlers one by one: links, freezes, factors, adjustments and module rules on tiny graphs."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from graphprune.coupling.groups import build_groups, node_semantics
from graphprune.frontends.torch.builder import CONVERTERS
from graphprune.frontends.torch.trace import load_module
from graphprune.ir.graph import ArgRef, Axis, ChannelGraph, Dim, OpNode, TensorInfo
from graphprune.ops import AdjustContext, Adjustment, Semantics, add_torch_targets, lookup, registered_ops

LinkKey = tuple[str, str, tuple[int, ...] | None, tuple[int, ...] | None]


def _graph(nodes: Sequence[OpNode], shapes: Mapping[str, tuple[Dim, ...]],
           consts: Mapping[str, np.ndarray] | None = None) -> ChannelGraph:
    """A channel graph of ``nodes``: ``shapes`` are activations, ``consts`` constants."""
    values = dict(consts or {})
    tensors = {n: TensorInfo(n, s, "FLOAT", "activation") for n, s in shapes.items()}
    tensors.update({n: TensorInfo(n, tuple(a.shape), "INT64", "param") for n, a in values.items()})
    produced = {o for node in nodes for o in node.outputs}
    inputs = tuple(n for n, t in tensors.items() if t.kind == "activation" and n not in produced)
    return ChannelGraph(tensors, list(nodes), inputs, tuple(nodes[-1].outputs), lambda name: values[name])


def _op(op_type: str, inputs: Sequence[str], outputs: Sequence[str], opset: int = 18, **attrs: Any) -> OpNode:
    return OpNode(f"{op_type}_0", "", op_type, tuple(inputs), tuple(outputs), attrs, opset)


def _i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def _key(a: str, b: str, ai: Sequence[int] | None = None, bi: Sequence[int] | None = None) -> LinkKey:
    return (a, b, None if ai is None else tuple(ai), None if bi is None else tuple(bi))


def _links(sem: Semantics) -> set[LinkKey]:
    return {(str(lk.a), str(lk.b), None if lk.a_idx is None else tuple(int(v) for v in lk.a_idx),
             None if lk.b_idx is None else tuple(int(v) for v in lk.b_idx)) for lk in sem.links}


def _semantics(node: OpNode, graph: ChannelGraph) -> Semantics:
    spec = lookup(node.domain, node.op_type)
    assert spec is not None and spec.couple is not None
    return spec.couple(node, graph)


def _same(n: int) -> set[LinkKey]:
    return {_key(f"x[{i}]", f"y[{i}]") for i in range(n)}


# (id, node, activation shapes, constants, links, frozen axes)
CASES: list[tuple[str, OpNode, dict[str, tuple[Dim, ...]], dict[str, np.ndarray], set[LinkKey], set[str]]] = [
    ("conv", _op("Conv", ["x", "w", "b"], ["y"], group=1),
     {"x": ("N", 3, 8, 8), "w": (4, 3, 3, 3), "b": (4,), "y": ("N", 4, 8, 8)}, {},
     {_key("x[0]", "y[0]"), _key("w[0]", "y[1]"), _key("b[0]", "y[1]"), _key("x[1]", "w[1]")}, {"w[2]", "w[3]"}),
    ("conv_grouped", _op("Conv", ["x", "w"], ["y"], group=2),
     {"x": (1, 4, 8, 8), "w": (6, 2, 3, 3), "y": (1, 6, 8, 8)}, {},
     {_key("x[0]", "y[0]"), _key("w[0]", "y[1]"), _key("x[1]", "w[1]", range(4), [0, 1, 0, 1]),
      _key("y[1]", "y[1]", range(6), [0, 1, 2, 0, 1, 2])}, {"w[2]", "w[3]"}),
    ("conv_depthwise", _op("Conv", ["x", "w"], ["y"], group=2),
     {"x": (1, 2, 8, 8), "w": (4, 1, 3, 3), "y": (1, 4, 8, 8)}, {},
     {_key("x[0]", "y[0]"), _key("w[0]", "y[1]"), _key("x[1]", "y[1]", [0, 1], [0, 2]),
      _key("x[1]", "y[1]", [0, 1], [1, 3])}, {"w[2]", "w[3]"}),
    ("conv_transpose", _op("ConvTranspose", ["x", "w"], ["y"]),
     {"x": (1, 3, 4, 4), "w": (3, 5, 2, 2), "y": (1, 5, 8, 8)}, {},
     {_key("x[0]", "y[0]"), _key("x[1]", "w[0]"), _key("w[1]", "y[1]")}, {"w[2]", "w[3]"}),
    ("conv_transpose_depthwise", _op("ConvTranspose", ["x", "w"], ["y"], group=3),
     {"x": (1, 3, 4, 4), "w": (3, 1, 2, 2), "y": (1, 3, 8, 8)}, {},
     {_key("x[0]", "y[0]"), _key("x[1]", "w[0]"), _key("x[1]", "y[1]")}, {"w[2]", "w[3]"}),
    ("conv_transpose_grouped", _op("ConvTranspose", ["x", "w"], ["y"], group=2),
     {"x": (1, 4, 4, 4), "w": (4, 2, 2, 2), "y": (1, 4, 8, 8)}, {},
     {_key("x[0]", "y[0]")}, {"x[1]", "y[1]", "w[0]", "w[1]", "w[2]", "w[3]"}),
    ("batch_norm", _op("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"]),
     {"x": (1, 3, 4, 4), "y": (1, 3, 4, 4), **{p: (3,) for p in "sbmv"}}, {},
     _same(4) | {_key(f"{p}[0]", "y[1]") for p in "sbmv"}, set()),
    ("layer_norm", _op("LayerNormalization", ["x", "s"], ["y"], axis=-1),
     {"x": (2, 5, 8), "s": (8,), "y": (2, 5, 8)}, {}, _same(3) | {_key("s[0]", "y[2]")}, {"x[2]"}),
    ("group_norm", _op("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2),
     {"x": (1, 4, 3), "s": (4,), "b": (4,), "y": (1, 4, 3)}, {},
     _same(3) | {_key("x[1]", "x[1]", range(4), [0, 0, 2, 2]), _key("s[0]", "y[1]"), _key("b[0]", "y[1]")}, set()),
    ("gemm", _op("Gemm", ["a", "b", "c"], ["y"], transB=1),
     {"a": (2, 3), "b": (4, 3), "c": (4,), "y": (2, 4)}, {},
     {_key("a[0]", "y[0]"), _key("b[0]", "y[1]"), _key("a[1]", "b[1]"), _key("c[0]", "y[1]")}, set()),
    ("matmul_batched", _op("MatMul", ["a", "b"], ["y"]),
     {"a": (2, 1, 3, 4), "b": (5, 4, 6), "y": (2, 5, 3, 6)}, {},
     {_key("a[2]", "y[2]"), _key("b[2]", "y[3]"), _key("a[3]", "b[1]"), _key("a[0]", "y[0]"), _key("b[0]", "y[1]")},
     set()),
    ("matmul_1d", _op("MatMul", ["a", "b"], ["y"]), {"a": (3,), "b": (3, 4), "y": (4,)}, {},
     set(), {"a[0]", "b[0]", "b[1]", "y[0]"}),
    ("add_broadcast", _op("Add", ["x", "b"], ["y"]), {"x": (1, 4, 5, 5), "b": (4, 1, 1), "y": (1, 4, 5, 5)}, {},
     _same(4) | {_key("b[0]", "y[1]")}, set()),
    ("concat", _op("Concat", ["a", "b"], ["y"], axis=1), {"a": (1, 2, 3), "b": (1, 3, 3), "y": (1, 5, 3)}, {},
     {_key("a[0]", "y[0]"), _key("a[2]", "y[2]"), _key("b[0]", "y[0]"), _key("b[2]", "y[2]"),
      _key("a[1]", "y[1]", [0, 1], [0, 1]), _key("b[1]", "y[1]", [0, 1, 2], [2, 3, 4])}, set()),
    ("split", _op("Split", ["x", "sizes"], ["y0", "y1"], axis=1), {"x": (1, 5), "y0": (1, 2), "y1": (1, 3)},
     {"sizes": _i64(2, 3)},
     {_key("x[0]", "y0[0]"), _key("x[0]", "y1[0]"), _key("x[1]", "y0[1]", [0, 1], [0, 1]),
      _key("x[1]", "y1[1]", [2, 3, 4], [0, 1, 2])}, set()),
    ("slice", _op("Slice", ["x", "s", "e", "a"], ["y"]), {"x": (1, 6), "y": (1, 3)},
     {"s": _i64(1), "e": _i64(4), "a": _i64(1)}, {_key("x[0]", "y[0]"), _key("x[1]", "y[1]", [1, 2, 3], [0, 1, 2])},
     set()),
    ("slice_step", _op("Slice", ["x", "s", "e", "a", "st"], ["y"]), {"x": (1, 6), "y": (1, 3)},
     {"s": _i64(0), "e": _i64(6), "a": _i64(1), "st": _i64(2)}, {_key("x[0]", "y[0]")}, {"x[1]", "y[1]"}),
    ("transpose", _op("Transpose", ["x"], ["y"], perm=(0, 2, 1)), {"x": (1, 3, 4), "y": (1, 4, 3)}, {},
     {_key("x[0]", "y[0]"), _key("x[2]", "y[1]"), _key("x[1]", "y[2]")}, set()),
    ("pad", _op("Pad", ["x", "p"], ["y"]), {"x": (1, 3, 4), "y": (1, 3, 7)}, {"p": _i64(0, 0, 1, 0, 0, 2)},
     {_key("x[0]", "y[0]"), _key("x[1]", "y[1]"), _key("x[2]", "y[2]", range(4), [1, 2, 3, 4])}, set()),
    ("pad_reflect", _op("Pad", ["x", "p"], ["y"], mode="reflect"), {"x": (1, 3, 4), "y": (1, 3, 7)},
     {"p": _i64(0, 0, 1, 0, 0, 2)}, {_key("x[0]", "y[0]"), _key("x[1]", "y[1]")}, {"x[2]", "y[2]"}),
    ("reduce_sum", _op("ReduceSum", ["x", "axes"], ["y"], keepdims=1), {"x": (1, 3, 4), "y": (1, 3, 1)},
     {"axes": _i64(2)}, {_key("x[0]", "y[0]"), _key("x[1]", "y[1]")}, set()),
    ("reduce_mean", _op("ReduceMean", ["x", "axes"], ["y"], keepdims=0), {"x": (1, 3, 4), "y": (1, 4)},
     {"axes": _i64(1)}, {_key("x[0]", "y[0]"), _key("x[2]", "y[1]")}, {"x[1]"}),
    ("softmax", _op("Softmax", ["x"], ["y"], axis=-1), {"x": (2, 3, 4), "y": (2, 3, 4)}, {}, _same(3), {"x[2]"}),
    ("softmax_opset11", _op("Softmax", ["x"], ["y"], opset=11, axis=1), {"x": (2, 3, 4), "y": (2, 3, 4)}, {},
     _same(3), {"x[1]", "x[2]"}),
    ("attention", _op("Attention", ["q", "k", "v"], ["y"]), {n: (1, 2, 3, 4) for n in "qkvy"}, {},
     {_key("q[0]", f"{t}[0]") for t in "kvy"} | {_key("q[1]", f"{t}[1]") for t in "kvy"}
     | {_key("q[2]", "y[2]"), _key("k[2]", "v[2]"), _key("q[3]", "k[3]"), _key("v[3]", "y[3]")}, {"q[3]"}),
    ("attention_scaled", _op("Attention", ["q", "k", "v"], ["y"], scale=0.5), {n: (1, 2, 3, 4) for n in "qkvy"}, {},
     {_key("q[0]", f"{t}[0]") for t in "kvy"} | {_key("q[1]", f"{t}[1]") for t in "kvy"}
     | {_key("q[2]", "y[2]"), _key("k[2]", "v[2]"), _key("q[3]", "k[3]"), _key("v[3]", "y[3]")}, set()),
    ("qdq_per_tensor", _op("DequantizeLinear", ["x", "s", "z"], ["y"]), {"x": (1, 3, 4), "s": (), "z": (), "y": (1, 3, 4)},
     {}, _same(3), set()),
    ("qdq_per_axis", _op("QuantizeLinear", ["x", "s", "z"], ["y"], axis=0), {"x": (4, 3), "y": (4, 3)},
     {"s": np.ones(4, np.float32), "z": np.zeros(4, np.int8)}, _same(2) | {_key("s[0]", "y[0]"), _key("z[0]", "y[0]")},
     set()),
    ("qdq_other_shape", _op("DequantizeLinear", ["x", "s"], ["y"], axis=1), {"x": (4, 3), "y": (4, 3)},
     {"s": np.ones(2, np.float32)}, set(), {"x[0]", "x[1]", "s[0]", "y[0]", "y[1]"}),
    ("qdq_computed_scale", _op("DequantizeLinear", ["x", "s"], ["y"], axis=1), {"x": (4, 3), "s": (3,), "y": (4, 3)}, {},
     set(), {"x[0]", "x[1]", "s[0]", "y[0]", "y[1]"}),
    ("qdq_blocked", _op("DequantizeLinear", ["x", "s"], ["y"], opset=21, axis=1, block_size=2), {"x": (4, 4), "y": (4, 4)},
     {"s": np.ones((4, 2), np.float32)}, set(), {"x[0]", "x[1]", "s[0]", "s[1]", "y[0]", "y[1]"}),
    ("qlinear_conv", _op("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"]),
     {"x": ("N", 3, 8, 8), "w": (4, 3, 3, 3), "b": (4,), "y": ("N", 4, 8, 8), "xs": (), "xz": (), "ys": (), "yz": ()},
     {"ws": np.ones(4, np.float32), "wz": np.zeros(4, np.int8)},
     {_key("x[0]", "y[0]"), _key("w[0]", "y[1]"), _key("b[0]", "y[1]"), _key("x[1]", "w[1]"), _key("ws[0]", "y[1]"),
      _key("wz[0]", "y[1]")}, {"w[2]", "w[3]"}),
    ("qlinear_conv_per_channel_input", _op("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"]),
     {"x": (1, 3, 8, 8), "w": (4, 3, 3, 3), "y": (1, 4, 8, 8), "xs": (3,), "xz": (), "ws": (), "wz": (), "ys": (),
      "yz": ()}, {}, set(), {f"{t}[{i}]" for t in "xwy" for i in range(4)} | {"xs[0]"}),
    ("qlinear_matmul", _op("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"]),
     {"a": (2, 3), "b": (3, 4), "y": (2, 4), **{n: () for n in ("as", "az", "bs", "bz", "ys", "yz")}}, {},
     {_key("a[0]", "y[0]"), _key("b[1]", "y[1]"), _key("a[1]", "b[0]")}, set()),
    ("qgemm", OpNode("g", "com.microsoft", "QGemm", ("a", "as", "az", "b", "bs", "bz", "c", "ys", "yz"), ("y",),
                     {"transB": 1}, 1),
     {"a": (2, 3), "b": (4, 3), "c": (4,), "y": (2, 4), **{n: () for n in ("as", "az", "ys", "yz")}},
     {"bs": np.ones(4, np.float32), "bz": np.zeros(4, np.int8)},
     {_key("a[0]", "y[0]"), _key("b[0]", "y[1]"), _key("a[1]", "b[1]"), _key("c[0]", "y[1]"), _key("bs[0]", "y[1]"),
      _key("bz[0]", "y[1]")}, set()),
    ("qlinear_add", OpNode("q", "com.microsoft", "QLinearAdd", ("x", "s", "z", "b", "s", "z", "s", "z"), ("y",), {}, 1),
     {"x": (1, 4, 5), "b": (1, 4, 5), "y": (1, 4, 5), "s": (), "z": ()}, {},
     _same(3) | {_key(f"b[{i}]", f"y[{i}]") for i in range(3)}, set()),
    ("qlinear_sigmoid", OpNode("q", "com.microsoft", "QLinearSigmoid", ("x", "s", "z", "s", "z"), ("y",), {}, 1),
     {"x": (1, 4), "y": (1, 4), "s": (), "z": ()}, {}, _same(2), set()),
    ("qlinear_concat", OpNode("q", "com.microsoft", "QLinearConcat", ("s", "z", "a", "s", "z", "b", "s", "z"), ("y",),
                              {"axis": 1}, 1),
     {"a": (1, 2), "b": (1, 3), "y": (1, 5), "s": (), "z": ()}, {},
     {_key("a[0]", "y[0]"), _key("b[0]", "y[0]"), _key("a[1]", "y[1]", [0, 1], [0, 1]),
      _key("b[1]", "y[1]", [0, 1, 2], [2, 3, 4])}, set()),
    ("qlinear_global_average_pool", OpNode("q", "com.microsoft", "QLinearGlobalAveragePool", ("x", "s", "z", "s", "z"),
                                           ("y",), {"channels_last": 0}, 1),
     {"x": (1, 4, 3, 3), "y": (1, 4, 1, 1), "s": (), "z": ()}, {}, {_key("x[0]", "y[0]"), _key("x[1]", "y[1]")}, set()),
    ("matmul_nbits", OpNode("m", "com.microsoft", "MatMulNBits", ("a", "b", "s", "z"), ("y",),
                            {"K": 32, "N": 3, "bits": 4, "block_size": 16}, 1),
     {"a": (2, 5, 32), "b": (3, 2, 8), "y": (2, 5, 3)}, {"s": np.ones(6, np.float32), "z": np.zeros(3, np.uint8)},
     {_key("a[0]", "y[0]"), _key("a[1]", "y[1]"), _key("b[0]", "y[2]"), _key("s[0]", "y[2]", range(6), [0, 0, 1, 1, 2, 2]),
      _key("z[0]", "y[2]", range(3), range(3))}, {"a[2]", "b[1]", "b[2]"}),
    ("attention_3d", _op("Attention", ["q", "k", "v"], ["y"]), {n: (1, 3, 8) for n in "qkvy"}, {},
     set(), {f"{t}[{i}]" for t in "qkvy" for i in range(3)}),
]


@pytest.mark.parametrize(("node", "shapes", "consts", "links", "frozen"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_handler_links_and_freezes(node: OpNode, shapes: dict[str, tuple[Dim, ...]], consts: dict[str, np.ndarray],
                                   links: set[LinkKey], frozen: set[str]) -> None:
    sem = _semantics(node, _graph([node], shapes, consts))
    assert _links(sem) == links
    assert {str(f.axis) for f in sem.freezes} == frozen
    assert all(f.reason for f in sem.freezes)
    assert not sem.factors


@pytest.mark.parametrize(("node", "shapes", "consts", "whole", "parts", "sizes"), [
    (_op("Reshape", ["x", "shape"], ["y"]), {"x": (2, 8), "y": (2, 2, 4)}, {"shape": _i64(2, 2, 4)},
     "x[1]", ("y[1]", "y[2]"), (2, 4)),
    (_op("Flatten", ["x"], ["y"], axis=1), {"x": (2, 3, 4), "y": (2, 12)}, {}, "y[1]", ("x[1]", "x[2]"), (3, 4)),
], ids=["reshape_split", "flatten_merge"])
def test_reshape_and_flatten_make_factors(node: OpNode, shapes: dict[str, tuple[Dim, ...]],
                                          consts: dict[str, np.ndarray], whole: str, parts: tuple[str, ...],
                                          sizes: tuple[int, ...]) -> None:
    sem = _semantics(node, _graph([node], shapes, consts))
    assert _links(sem) == {_key("x[0]", "y[0]")}
    assert [(str(f.whole), tuple(str(p) for p in f.parts), f.part_sizes) for f in sem.factors] == [(whole, parts, sizes)]


def _adjust(node: OpNode, graph: ChannelGraph, kept: Mapping[str, Sequence[int]]) -> Adjustment:
    spec = lookup(node.domain, node.op_type)
    assert spec is not None and spec.adjust is not None
    ctx = AdjustContext({_axis(k): np.asarray(v, dtype=np.int64) for k, v in kept.items()}, graph)
    return spec.adjust(node, ctx)


def _axis(text: str) -> Axis:
    name, _, rest = text.partition("[")
    return Axis(name, int(rest.rstrip("]")))


def _plain(adj: Adjustment) -> tuple[dict[str, Any], dict[int, list[int]], dict[int, dict[int, int]]]:
    return (dict(adj.attrs), {i: [int(v) for v in np.asarray(a).reshape(-1)] for i, a in adj.const_inputs.items()},
            {i: dict(e) for i, e in adj.shape_overrides.items()})


_DW = (_op("Conv", ["x", "w"], ["y"], group=2), {"x": (1, 2, 8, 8), "w": (4, 1, 3, 3), "y": (1, 4, 8, 8)}, {})
_GN = (_op("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2),
       {"x": (1, 4, 3), "s": (4,), "b": (4,), "y": (1, 4, 3)}, {})
_SPLIT = {"x": (1, 5), "y0": (1, 2), "y1": (1, 3)}

# (id, node, shapes, consts, kept, (attrs, const inputs, shape overrides))
ADJUST_CASES: list[tuple[str, OpNode, dict[str, tuple[Dim, ...]], dict[str, np.ndarray], dict[str, list[int]],
                         tuple[dict[str, Any], dict[int, list[int]], dict[int, dict[int, int]]]]] = [
    ("conv_depthwise_groups", *_DW, {"x[1]": [1], "y[1]": [2, 3]}, ({"group": 1}, {}, {})),
    ("conv_plain_unchanged", _op("Conv", ["x", "w"], ["y"], group=1),
     {"x": (1, 2, 8, 8), "w": (4, 2, 3, 3), "y": (1, 4, 8, 8)}, {}, {"x[1]": [1], "w[1]": [1]}, ({}, {}, {})),
    ("conv_transpose_depthwise_groups", _op("ConvTranspose", ["x", "w"], ["y"], group=3),
     {"x": (1, 3, 4, 4), "w": (3, 1, 2, 2), "y": (1, 3, 8, 8)}, {}, {"x[1]": [0, 2]}, ({"group": 2}, {}, {})),
    ("group_norm_groups", *_GN, {"x[1]": [2, 3]}, ({"num_groups": 1}, {}, {})),
    ("split_sizes", _op("Split", ["x", "sizes"], ["y0", "y1"], axis=1), _SPLIT, {"sizes": _i64(2, 3)},
     {"y1[1]": [0, 2]}, ({}, {1: [2, 2]}, {})),
    ("split_opset11_attribute", _op("Split", ["x"], ["y0", "y1"], opset=11, axis=1, split=[2, 3]), _SPLIT, {},
     {"y0[1]": [1]}, ({"split": [1, 3]}, {}, {})),
    ("slice_bounds", _op("Slice", ["x", "s", "e", "a"], ["y"]), {"x": (1, 6), "y": (1, 3)},
     {"s": _i64(1), "e": _i64(4), "a": _i64(1)}, {"x[1]": [0, 2, 3, 5]}, ({}, {1: [1], 2: [3], 3: [1], 4: [1]}, {})),
    ("reshape_shape", _op("Reshape", ["x", "shape"], ["y"]), {"x": (2, 8), "y": (2, 2, 4)},
     {"shape": _i64(2, 2, 4)}, {"y[2]": [0, 1]}, ({}, {}, {1: {2: 2}})),
    ("qlinear_conv_depthwise_groups", _op("QLinearConv", ["x", "s", "z", "w", "s", "z", "s", "z"], ["y"], group=2),
     {"x": (1, 2, 8, 8), "w": (4, 1, 3, 3), "y": (1, 4, 8, 8), "s": (), "z": ()}, {}, {"x[1]": [1], "y[1]": [2, 3]},
     ({"group": 1}, {}, {})),
    ("matmul_nbits_n", OpNode("m", "com.microsoft", "MatMulNBits", ("a", "b", "s"), ("y",),
                              {"K": 32, "N": 3, "bits": 4, "block_size": 16}, 1),
     {"a": (2, 32), "b": (3, 2, 8), "s": (6,), "y": (2, 3)}, {}, {"y[1]": [0, 2]}, ({"N": 2}, {}, {})),
    ("pad_pads", _op("Pad", ["x", "p"], ["y"]), {"x": (1, 3, 4), "y": (1, 3, 7)}, {"p": _i64(0, 0, 1, 0, 0, 2)},
     {"y[2]": [1, 2, 6]}, ({}, {1: [0, 0, 0, 0, 0, 1]}, {})),
]


@pytest.mark.parametrize(("node", "shapes", "consts", "kept", "want"), [c[1:] for c in ADJUST_CASES],
                         ids=[c[0] for c in ADJUST_CASES])
def test_adjustments(node: OpNode, shapes: dict[str, tuple[Dim, ...]], consts: dict[str, np.ndarray],
                     kept: dict[str, list[int]], want: tuple[dict[str, Any], dict[int, list[int]], dict[int, dict[int, int]]]) -> None:
    adj = _adjust(node, _graph([node], shapes, consts), kept)
    assert _plain(adj) == want
    assert bool(adj) == any(want)


def test_group_norm_refuses_part_of_a_group() -> None:
    node, shapes, consts = _GN
    with pytest.raises(ValueError, match="whole groups of 2"):
        _adjust(node, _graph([node], shapes, consts), {"x[1]": [1, 2, 3]})


@pytest.mark.parametrize(("node", "shapes", "kept", "want"), [
    (*_DW[:2], {"x[1]": [1], "w[0]": [2, 3], "y[1]": [2, 3]},
     {"groups": (2, 1), "in_channels": (2, 1), "out_channels": (4, 2)}),
    (_op("ConvTranspose", ["x", "w"], ["y"]), {"x": (1, 3, 4, 4), "w": (3, 5, 2, 2), "y": (1, 5, 8, 8)},
     {"x[1]": [0], "w[0]": [0], "w[1]": [1, 2], "y[1]": [1, 2]}, {"in_channels": (3, 1), "out_channels": (5, 2)}),
    (*_GN[:2], {"x[1]": [0, 1], "y[1]": [0, 1], "s[0]": [0, 1], "b[0]": [0, 1]},
     {"num_groups": (2, 1), "num_channels": (4, 2)}),
    (_op("BatchNormalization", ["x", "s"], ["y"]), {"x": (1, 3, 4, 4), "s": (3,), "y": (1, 3, 4, 4)},
     {"x[1]": [2]}, {"num_features": (3, 1)}),
    (_op("LayerNormalization", ["x", "s"], ["y"]), {"x": (2, 5, 8), "s": (8,), "y": (2, 5, 8)}, {},
     {"normalized_shape": ((8,), (8,))}),
    (_op("MatMul", ["x", "wT"], ["y"]), {"x": (2, 3), "wT": (3, 4), "y": (2, 4)}, {"wT[1]": [0, 1], "y[1]": [0, 1]},
     {"in_features": (3, 3), "out_features": (4, 2), "nx": (3, 3), "nf": (4, 2)}),  # nn.Linear, HF Conv1D
    (_op("Split", ["x"], ["y0", "y1"], axis=2), {"x": (2, 5, 8), "y0": (2, 5, 4), "y1": (2, 5, 4)},
     {"x[2]": [0, 1, 4, 5], "y0[2]": [0, 1], "y1[2]": [0, 1]}, {"split_size": (4, 2)}),
], ids=["conv_depthwise", "conv_transpose", "group_norm", "batch_norm", "layer_norm", "linear", "split"])
def test_module_rules(node: OpNode, shapes: dict[str, tuple[Dim, ...]], kept: dict[str, list[int]],
                      want: dict[str, tuple[Any, Any]]) -> None:
    spec = lookup(node.domain, node.op_type)
    assert spec is not None and spec.module is not None
    graph = _graph([node], shapes)
    ctx = AdjustContext({_axis(k): np.asarray(v, dtype=np.int64) for k, v in kept.items()}, graph)
    adj = spec.adjust(node, ctx) if spec.adjust is not None else Adjustment()
    assert spec.module.edits(node, ctx, adj) == want


def test_unknown_op_freezes_every_axis_with_a_reason() -> None:
    node = OpNode("f", "custom", "Foo", ("x",), ("y",), {}, 1)
    graph = _graph([node], {"x": (1, 3), "y": (1, 3)})
    sem = node_semantics(node, graph)
    assert not sem.links
    assert {str(f.axis) for f in sem.freezes} == {"x[0]", "x[1]", "y[0]", "y[1]"}
    assert {f.reason for f in sem.freezes} == {"unsupported op 'custom::Foo'"}
    assert all(not g.prunable for g in build_groups(graph).groups)


def test_quantized_reasons_read_well() -> None:
    node = _op("DequantizeLinear", ["x", "s"], ["y"], axis=1)
    sem = _semantics(node, _graph([node], {"x": (4, 3), "s": (3,), "y": (4, 3)}))
    assert {f.reason for f in sem.freezes} == {"DequantizeLinear: per-channel quantization parameter 's' is computed at run time"}
    other = OpNode("q", "com.microsoft", "QAttention", ("x",), ("y",), {}, 1)
    assert {f.reason for f in node_semantics(other, _graph([other], {"x": (1, 3), "y": (1, 3)})).freezes} == {
        "unsupported op 'com.microsoft::QAttention'"}


def test_torch_targets_are_exactly_the_converter_registry() -> None:
    listed = {t for spec in registered_ops() for t in spec.torch_targets}
    assert listed == set(CONVERTERS)


def test_a_converter_must_write_ops_the_table_knows() -> None:
    with pytest.raises(ValueError, match="does not know"):
        add_torch_targets(["NoSuchOp"], ["aten.no_such_op.default"])


class _Tiny(nn.Module):
    """A depthwise conv, a GroupNorm, a split, a view, an unflatten and a linear: the ops with size arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gn(self.conv(x))
        a, b = torch.split(y, [3, 5], dim=1)
        z = torch.cat([b, a], dim=1).view(x.shape[0], 8, 16).unflatten(2, (4, 4)).flatten(2)
        return self.fc(z)


def test_converters_write_the_ops_they_declare_and_record_the_arguments() -> None:
    tm = load_module(_Tiny(), [torch.randn(2, 4, 4, 4)])
    converted = [op for op in tm.graph.nodes if op.origin is not None and op.domain == ""]
    for op in converted:
        spec = lookup(op.domain, op.op_type)
        assert spec is not None and op.origin is not None
        assert op.origin.target in spec.torch_targets, (op.op_type, op.origin.target)
    by_target = {(op.op_type, op.origin.target): op.origin for op in converted if op.origin is not None}
    assert by_target[("Conv", "aten.conv2d.default")].attrs == {"group": ArgRef(6, "groups")}
    assert by_target[("GroupNormalization", "aten.group_norm.default")].attrs == {"num_groups": ArgRef(1, "num_groups")}
    assert by_target[("Split", "aten.split_with_sizes.default")].inputs == {1: ArgRef(1, "split_sizes")}
    assert by_target[("Reshape", "aten.view.default")].inputs == {1: ArgRef(1, "size")}
    assert by_target[("Reshape", "aten.unflatten.int")].inputs == {1: ArgRef(2, "sizes", offset=2)}
    assert by_target[("Reshape", "aten.flatten.using_ints")].inputs == {}
    assert by_target[("MatMul", "aten.linear.default")].state == ("fc.weight", "fc.bias")
