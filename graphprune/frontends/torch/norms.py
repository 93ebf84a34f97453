"""RMSNorm modules as one op: their forward traces as arithmetic, and the stream needs to see a norm.

``torch.export`` writes an RMSNorm module's forward (``x * rsqrt(mean(x^2) + eps) * w``, Hugging Face's
``LlamaRMSNorm`` with its float32 casts, ``nn.RMSNorm``) as Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul (and Cast)
ops. :func:`fuse_rms_modules` replaces the ops of one such module's call by one ``RMSNormalization`` op when

- the ops are exactly the calls the module made (``Origin.module``), reading one activation ``x`` and the module's
  1-D weight (or nothing) and producing one tensor read outside;
- the module computes RMSNorm: run on random input, it matches ``x / sqrt(mean(x^2, -1) + eps) * weight`` (float
  tolerance), with ``eps`` from its ``eps`` or ``variance_epsilon`` attribute.

A saved program has no module: :func:`fuse_rms_calls` takes the modules its trace names with a type ending in
``RMSNorm``, reads ``eps`` from the block's one scalar addend and runs the block's own ops on random input instead.

Anything else is left as traced. The fused op runs in the interpreter and freezes the hidden axis as the
decomposed ops did; the hidden pass (:mod:`graphprune.backends.torch_rotation`) then sees a norm it can replace.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from graphprune.ir.dtypes import torch_dtype
from graphprune.ir.graph import ChannelGraph, OpNode, Origin

__all__ = ["RMS_TARGET", "fuse_rms_calls", "fuse_rms_modules", "rms_epsilon"]

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


Judge = Callable[[str, list[int], str, str, int], "float | None"]
"""(module name, block op indices, x, y, width) -> the block's epsilon when it computes RMSNorm, else None."""


def fuse_rms_modules(graph: ChannelGraph, module: nn.Module, state_names: dict[str, str]) -> ChannelGraph:
    """``graph`` with each RMSNorm module's traced arithmetic as one ``RMSNormalization`` op (see the module doc)."""
    modules = {name: m for name, m in module.named_modules() if name and type(m).__name__.endswith("RMSNorm")}

    def judge(name: str, _idx: list[int], _x: str, _y: str, width: int) -> float | None:
        eps = rms_epsilon(modules[name])
        return eps if eps is not None and _computes_rms(modules[name], width, eps) else None

    return _fuse(graph, list(modules), state_names, judge)


def fuse_rms_calls(graph: ChannelGraph, program: torch.export.ExportedProgram, state_names: dict[str, str]) -> ChannelGraph:
    """The same for a program with no module at hand: the modules are those its trace names (``nn_module_stack``)
    with a type ending in ``RMSNorm``; the epsilon is the block's one scalar addend, and the block's own ops, run on
    random input, must compute RMSNorm with it."""
    names = {str(v[0]) for n in program.graph.nodes for v in (n.meta.get("nn_module_stack") or {}).values()
             if str(v[1]).endswith("RMSNorm") and v[0]}

    def judge(_name: str, idx: list[int], x: str, y: str, width: int) -> float | None:
        eps = _block_epsilon(graph, idx)
        return eps if eps is not None and _block_computes_rms(graph, idx, x, y, width, eps) else None

    return _fuse(graph, sorted(names), state_names, judge)


def _block_epsilon(graph: ChannelGraph, idx: list[int]) -> float | None:
    """The one one-element constant an Add of the block adds (``mean(x^2) + eps``), or None."""
    found = [float(np.ravel(v)[0]) for i in idx if graph.nodes[i].op_type == "Add" for t in graph.nodes[i].inputs
             if (v := graph.const(t)) is not None and v.size == 1]
    return found[0] if len(found) == 1 else None


def _block_computes_rms(graph: ChannelGraph, idx: list[int], x: str, y: str, width: int, eps: float) -> bool:
    """Whether the block's ops map random (2, 3, width) input to its RMSNorm with ``eps`` (times its 1-D weight)."""
    from graphprune.execution.interpreter import GraphInterpreter

    block = dataclasses.replace(graph, nodes=[graph.nodes[i] for i in idx], inputs=(x,), outputs=(y,))
    weights = [v for i in idx for t in graph.nodes[i].inputs if (v := graph.const(t)) is not None and v.shape == (width,)]
    xs = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0))
    want = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
    if len(weights) == 1:
        want = want * torch.from_numpy(np.asarray(weights[0], dtype=np.float32))
    dtype = torch_dtype(graph.tensors[x].dtype)
    if dtype is None:
        return False
    try:
        with torch.no_grad():
            got = GraphInterpreter(block).eval()(xs.to(dtype))[0]
    except Exception:  # noqa: BLE001  (a block that does not run on such input is not an RMSNorm)
        return False
    return got.shape == want.shape and torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5)


def _fuse(graph: ChannelGraph, names: list[str], state_names: dict[str, str], judge: Judge) -> ChannelGraph:
    params = {q: g for g, q in state_names.items()}
    dropped: set[int] = set()
    placed: dict[int, OpNode] = {}  # index of a block's last op -> the fused op
    for name in names:
        found = _block(graph, name)
        scale = params.get(f"{name}.weight", "")
        shape = graph.shape(found[1]) if found is not None else None
        width = shape[-1] if shape else None
        eps = judge(name, found[0], found[1], found[2], width) if found is not None and isinstance(width, int) and scale \
            else None
        if found is None or eps is None:
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
