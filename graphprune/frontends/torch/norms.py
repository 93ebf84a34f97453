"""RMSNorm modules as one op: their forward traces as arithmetic, and the stream needs to see a norm.

``torch.export`` writes an RMSNorm module's forward (``x * rsqrt(mean(x^2) + eps) * w``, Hugging Face's
``LlamaRMSNorm`` with its float32 casts, ``nn.RMSNorm``) as Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul (and Cast)
ops. :func:`fuse_rms_modules` replaces the ops of one such module's call by one ``RMSNormalization`` op when

- the ops are exactly the calls the module made (``Origin.module``), reading one activation ``x`` and the module's
  1-D weight (or nothing) and producing one tensor read outside;
- the module computes RMSNorm: run on random input, it matches ``x / sqrt(mean(x^2, -1) + eps) * weight`` (float
  tolerance), with ``eps`` from its ``eps`` or ``variance_epsilon`` attribute.

Anything else is left as traced. The fused op runs in the interpreter and freezes the hidden axis as the
decomposed ops did; the hidden pass (:mod:`graphprune.backends.torch_rotation`) then sees a norm it can replace.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from graphprune.ir.graph import ChannelGraph, OpNode, Origin

__all__ = ["RMS_TARGET", "fuse_rms_modules", "rms_epsilon"]

log = logging.getLogger(__name__)

RMS_TARGET = "module RMSNorm"
"""The ``Origin.target`` of a fused RMSNorm op (the call was the module's whole forward)."""


def rms_epsilon(module: nn.Module) -> float | None:
    """The epsilon of an RMSNorm-like module (``eps`` or ``variance_epsilon``; ``nn.RMSNorm``'s None is its dtype's
    machine epsilon), or None when it names none."""
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if eps is None and isinstance(module, nn.RMSNorm):
        return float(torch.finfo(torch.float32).eps)
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None


def _computes_rms(module: nn.Module, width: int, eps: float) -> bool:
    """Whether ``module`` maps random (2, 3, width) input to its RMSNorm (float tolerance)."""
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0))
    weight = getattr(module, "weight", None)
    with torch.no_grad():
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if isinstance(weight, torch.Tensor):
            want = want * weight.float()
        try:
            got = module(x)
        except Exception:  # noqa: BLE001  (a module that does not take such input is not an RMSNorm)
            return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5)


def _block(graph: ChannelGraph, name: str) -> tuple[list[int], str, str] | None:
    """(node indices, input x, output y) of the ops module ``name``'s calls made, when they read one activation and
    its state only and one of their tensors is read outside; else None.

    A same-type Cast of the input (``x.to(torch.float32)`` on float32: torch returns ``x`` itself, and the trace
    may read the cast where the caller reads ``x``) stays outside the block, and the block reads it."""
    idx = [i for i, n in enumerate(graph.nodes) if n.origin is not None and n.origin.module == name]
    for _ in range(2):  # once more after leaving the input's same-type casts outside
        if not idx:
            return None
        made = {o for i in idx for o in graph.nodes[i].outputs if o}
        read = {t for i in idx for t in graph.nodes[i].inputs if t and t not in made}
        activations = [t for t in read if graph.tensors[t].kind != "param"]
        outside = {t for j, n in enumerate(graph.nodes) if j not in set(idx) for t in n.inputs} | set(graph.outputs)
        leaving = [t for t in made if t in outside]
        if len(activations) == 1 and len(leaving) == 1:
            return idx, activations[0], leaving[0]
        casts = {i for i in idx if _same_type_cast(graph, graph.nodes[i]) and graph.nodes[i].inputs[0] in activations}
        if not casts:
            return None
        idx = [i for i in idx if i not in casts]
    return None


def _same_type_cast(graph: ChannelGraph, node: OpNode) -> bool:
    return node.op_type == "Cast" and graph.tensors[node.inputs[0]].dtype == graph.tensors[node.outputs[0]].dtype


def fuse_rms_modules(graph: ChannelGraph, module: nn.Module, state_names: dict[str, str]) -> ChannelGraph:
    """``graph`` with each RMSNorm module's traced arithmetic as one ``RMSNormalization`` op (see the module doc)."""
    params = {q: g for g, q in state_names.items()}
    dropped: set[int] = set()
    placed: dict[int, OpNode] = {}  # index of a block's last op -> the fused op
    for name, m in module.named_modules():
        if not name or not type(m).__name__.endswith("RMSNorm") or (eps := rms_epsilon(m)) is None:
            continue
        found = _block(graph, name)
        scale = params.get(f"{name}.weight", "")
        shape = graph.shape(found[1]) if found is not None else None
        width = shape[-1] if shape else None
        if found is None or not scale or not isinstance(width, int) or not _computes_rms(m, width, eps):
            log.info("RMSNorm module %s is left as traced (not one weighted RMSNorm of one input)", name)
            continue
        idx, x, y = found
        origin = Origin(f"{name}.forward", RMS_TARGET, (scale,), module=name)
        placed[idx[-1]] = OpNode(f"{name}.rms", "", "RMSNormalization", (x, scale), (y,), {"axis": -1, "epsilon": eps},
                                 23, origin=origin)
        dropped.update(idx)
    if not placed:
        return graph
    nodes = [placed.get(i, n) for i, n in enumerate(graph.nodes) if i in placed or i not in dropped]
    used = {t for n in nodes for t in (*n.inputs, *n.outputs) if t} | set(graph.inputs) | set(graph.outputs)
    log.info("fused %d RMSNorm module(s) into RMSNormalization ops", len(placed))
    return dataclasses.replace(graph, nodes=nodes, tensors={k: v for k, v in graph.tensors.items() if k in used})
