"""Keep masks: the one description of "the original with the removed channels zeroed".

A plan's kept elements (:func:`graphprune.ir.plan.kept_elements`) become, for
every tensor they shrink, a boolean mask that broadcasts against the tensor:
multiplying a tensor by its mask zeroes exactly what pruning removes. The ONNX
masked model (:func:`graphprune.execution.validate.masked_model`) and the torch
masked reference (:func:`graphprune.backends.torch_module.masked_reference`) are
both built from these masks.

Example:
    >>> keep_vector(4, np.array([0, 2]))
    array([ True, False,  True, False])
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from graphprune.ir.graph import Axis, ChannelGraph

__all__ = ["keep_masks", "keep_vector"]


def keep_vector(size: int, kept: np.ndarray) -> np.ndarray:
    """A boolean vector of ``size`` entries, true at the ``kept`` indices."""
    out = np.zeros(size, bool)
    out[np.asarray(kept, dtype=np.int64)] = True
    return out


def keep_masks(graph: ChannelGraph, kept: Mapping[Axis, np.ndarray], kinds: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Per tensor with kept elements, a boolean mask broadcastable to it (false where pruning removes elements).

    Args:
        graph: Supplies each tensor's rank and axis sizes.
        kept: Sorted kept element indices per axis.
        kinds: Only tensors of these kinds (``"param"``, ``"activation"``, ...); all when None.

    Returns:
        Tensor name -> mask of the tensor's rank, of size 1 on every axis not shrunk
        (several shrunk axes of one tensor combine).
    """
    masks: dict[str, np.ndarray] = {}
    for axis, k in kept.items():
        info = graph.tensors[axis.tensor]
        if kinds is not None and info.kind not in kinds:
            continue
        size = info.size(axis.axis)
        if size is None:
            raise ValueError(f"tensor '{axis.tensor}' axis {axis.axis} has no static size to mask")
        shape = [1] * (info.rank or 0)
        shape[axis.axis] = size
        mask = keep_vector(size, k).reshape(shape)
        masks[axis.tensor] = masks[axis.tensor] & mask if axis.tensor in masks else mask
    return masks
