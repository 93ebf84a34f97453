"""The constants recovery refits, as float values: a float constant, or an integer one read through DequantizeLinear.

Compensation, reconstruction and bias correction fold their fits into float
weights and biases. In a QDQ model (onnxruntime's static quantization) a
Conv, Gemm or MatMul reads its weight and bias as ``DequantizeLinear(q,
scale, zero_point)`` of integer constants. Here such a tensor is read as its
dequantized float value (:func:`float_const`) and written back by
requantizing (:func:`stored_values`):

- the scale stays where the refitted values fit the integer range ([-64, 64] where
  the original's int8 values lie in it, as ``reduce_range`` writes them), and grows
  (per tensor, or per channel where the scale is per channel) just enough
  where they do not, so nothing saturates;
- a Conv / Gemm bias quantized with ``scale = x_scale * w_scale`` (int32,
  what onnxruntime's fused QLinearConv assumes) has its scale multiplied by
  the same factor as its weight's, then is requantized.

Anything else (blocked quantization, a scale computed at run time) is not a
stored constant: the consumer is skipped with the reason, as before.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from graphprune.ir.graph import ChannelGraph

__all__ = ["Quantized", "constant_names", "float_const", "is_stored", "quantized_source", "stored_values", "weight_shape"]

_RANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255), np.dtype(np.int16): (-32768, 32767),
          np.dtype(np.uint16): (0, 65535), np.dtype(np.int32): (-2**31, 2**31 - 1)}


@dataclasses.dataclass(frozen=True)
class Quantized:
    """``name = DequantizeLinear(q, scale, zero_point)`` of constants; ``axis`` of a per-axis scale (None: per tensor)."""

    name: str
    q: str
    scale: str
    zero_point: str
    axis: int | None


def quantized_source(graph: ChannelGraph, name: str) -> Quantized | None:
    """The DequantizeLinear of integer constants that produces ``name`` (per-tensor or per-axis), else None."""
    info = graph.info(name)
    node = graph.producers().get(name) if info is not None and info.kind != "param" else None
    if node is None or node.op_type != "DequantizeLinear" or int(node.attrs.get("block_size", 0)):
        return None
    q, scale = node.inputs[0], node.inputs[1]
    zp = node.inputs[2] if len(node.inputs) > 2 else ""
    qv, sv = graph.const(q), graph.const(scale)
    if qv is None or sv is None or np.dtype(qv.dtype) not in _RANGE or (zp and graph.const(zp) is None):
        return None
    axis = None if sv.size == 1 else int(node.attrs.get("axis", 1)) % max(qv.ndim, 1)
    if axis is not None and (sv.ndim != 1 or sv.size != qv.shape[axis]):
        return None
    return Quantized(name, q, scale, zp, axis)


def _along(v: np.ndarray, qz: Quantized, ndim: int) -> np.ndarray:
    """A scale or zero point shaped to broadcast over the quantized tensor."""
    if qz.axis is None:
        return v.reshape(())
    shape = [1] * ndim
    shape[qz.axis] = v.size
    return v.reshape(shape)


def _zero_point(graph: ChannelGraph, qz: Quantized, like: np.ndarray) -> np.ndarray:
    return np.zeros(1, like.dtype) if not qz.zero_point else graph.param(qz.zero_point)


def float_const(graph: ChannelGraph, name: str) -> np.ndarray | None:
    """A float constant's value, or the dequantized value of a :func:`quantized_source` (float64), else None."""
    value = graph.const(name)
    if value is not None:
        return value if np.issubdtype(value.dtype, np.floating) else None
    qz = quantized_source(graph, name)
    if qz is None:
        return None
    q = graph.param(qz.q)
    scale = _along(graph.param(qz.scale).astype(np.float64), qz, q.ndim)
    zp = _along(_zero_point(graph, qz, q).astype(np.float64), qz, q.ndim)
    return (q.astype(np.float64) - zp) * scale


def constant_names(graph: ChannelGraph, name: str) -> tuple[str, ...]:
    """The constants holding ``name``: itself, or a :func:`quantized_source`'s integer constant and scale."""
    qz = quantized_source(graph, name)
    return (name,) if qz is None else (qz.q, qz.scale)


def weight_shape(graph: ChannelGraph, name: str) -> tuple[int, ...]:
    """Shape of a stored weight (a float constant, or the integer constant a dequantized one is read from)."""
    shape = graph.shape(constant_names(graph, name)[0])
    assert shape is not None, name
    dims = tuple(d for d in shape if isinstance(d, int))
    assert len(dims) == len(shape), name  # constants have static shapes
    return dims


def is_stored(graph: ChannelGraph, name: str) -> bool:
    """True when ``name`` is a float constant or a :func:`quantized_source`."""
    if not name:
        return False
    value = graph.const(name)
    if value is not None:
        return bool(np.issubdtype(value.dtype, np.floating))
    return quantized_source(graph, name) is not None


def _range_in_use(q: np.ndarray) -> tuple[int, int]:
    """The integer range requantized values may take: [-64, 64] where int8 values already lie in it (onnxruntime's
    ``reduce_range``, symmetric 7-bit weights, which keep u8s8 kernels without VNNI from saturating their int16
    sums), else the type's whole range."""
    if q.dtype == np.int8 and q.size and int(q.min()) >= -64 and int(q.max()) <= 64:
        return -64, 64
    return _RANGE[np.dtype(q.dtype)]


def _requantize(graph: ChannelGraph, qz: Quantized, w: np.ndarray, ratio: np.ndarray | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """New (q, scale) values of ``w``; ``ratio`` given: the scale is multiplied by it, else grown to fit. Returns the ratio used."""
    q = graph.param(qz.q)
    lo, hi = _range_in_use(q)
    scale = graph.param(qz.scale)
    zp = _zero_point(graph, qz, q).astype(np.float64).reshape(-1)
    if ratio is None:
        axes = tuple(a for a in range(w.ndim) if a != qz.axis)
        top = w.max(axis=axes) if qz.axis is not None else np.array([w.max()])
        bottom = w.min(axis=axes) if qz.axis is not None else np.array([w.min()])
        s = scale.astype(np.float64).reshape(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.maximum(np.where(hi - zp > 0, top / (hi - zp), 0.0), np.where(lo - zp < 0, bottom / (lo - zp), 0.0))
        ratio = np.maximum(1.0, np.where(s > 0, need / np.where(s > 0, s, 1.0), 1.0))
    new_scale = (scale.astype(np.float64).reshape(-1) * ratio).astype(scale.dtype).reshape(scale.shape)
    s = _along(new_scale.astype(np.float64), qz, w.ndim)
    z = _along(zp, qz, w.ndim)
    values = np.clip(np.round(w / s) + z, lo, hi).astype(q.dtype)
    return {qz.q: values, qz.scale: new_scale}, ratio


def _tied_bias(graph: ChannelGraph, weight: str, bias: str) -> bool:
    """True when a Conv / Gemm reads ``weight`` and ``bias`` as inputs 1 and 2 (an int32 bias scaled by x_scale * w_scale)."""
    users = graph.consumers().get(weight, [])
    return any(n.op_type in ("Conv", "Gemm") and len(n.inputs) > 2 and n.inputs[1] == weight and n.inputs[2] == bias
               for n in users)


def stored_values(graph: ChannelGraph, values: Mapping[str, np.ndarray],
                  pairs: Iterable[tuple[str, str | None]] = ()) -> dict[str, np.ndarray]:
    """Float working ``values`` (by the tensor the consumers read) as the graph's own constants.

    Float constants are cast to their dtype; quantized ones requantized into their integer constant and scale.
    ``pairs`` are (weight, bias) of one consumer: a bias tied to its weight's scale follows its scale's growth.
    """
    out: dict[str, np.ndarray] = {}
    ratios: dict[str, np.ndarray] = {}
    tied = [(w, b) for w, b in pairs if b]
    biases = {b for _, b in tied}
    for name, v in values.items():  # weights (and unpaired tensors) first: their growth decides tied biases' scales
        qz = quantized_source(graph, name)
        if qz is None:
            out[name] = np.asarray(v).astype(graph.param(name).dtype)
        elif name not in biases:
            new, ratios[name] = _requantize(graph, qz, np.asarray(v, np.float64), None)
            out.update(new)
    for weight, bias in tied:
        qz = quantized_source(graph, bias)
        ratio = ratios.get(weight) if qz is not None and _tied_bias(graph, weight, bias) else None
        if qz is None or qz.q in out or (bias not in values and (ratio is None or np.all(ratio == 1.0))):
            continue
        size = graph.param(qz.scale).size
        if ratio is not None and ratio.size != size:  # a per-tensor weight scale over a per-channel bias scale
            ratio = np.full(size, float(ratio[0])) if ratio.size == 1 else None
        value = values[bias] if bias in values else float_const(graph, bias)
        assert value is not None
        out.update(_requantize(graph, qz, np.asarray(value, np.float64), ratio)[0])
    return out
