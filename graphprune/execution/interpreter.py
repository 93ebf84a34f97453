"""Differentiable execution of a channel graph in torch.

:class:`GraphInterpreter` is an ``nn.Module`` built from a
:class:`~graphprune.ir.graph.ChannelGraph` (an ONNX model after the frontend):
constants become parameters and buffers, and every node is dispatched to the
torch implementation held by the op semantics table, one overridable
``run_node`` per node, as in ``torch.fx.Interpreter``. Outputs match
onnxruntime; gradients flow to inputs, weights and ``taps`` (callables applied
to named tensors as they are produced, used for channel gates).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import graphprune.ops.run_nn
import graphprune.ops.run_tensor  # noqa: F401 - imported for its side effect: registers the torch run functions
from graphprune.errors import BadInputError, UnsupportedOpError
from graphprune.ir.graph import ChannelGraph, OpNode
from graphprune.ops import lookup

__all__ = ["GraphInterpreter", "Tap", "unsupported_ops"]

log = logging.getLogger(__name__)

Tap = Callable[[torch.Tensor], torch.Tensor]

_BN_STATS = (3, 4)


TORCH_CALL = "torch_call"
"""OpNode attribute of torch-traced ops outside the table: a callable taking the node's input tensors."""


def unsupported_ops(graph: ChannelGraph) -> list[str]:
    """Op types of ``graph`` that have no torch implementation (sorted, unique)."""
    missing = set()
    for node in graph.nodes:
        if TORCH_CALL in node.attrs:
            continue
        spec = lookup(node.domain, node.op_type)
        if spec is None or spec.run is None or node.has_subgraph:
            missing.add(f"{node.domain}::{node.op_type}" if node.domain else node.op_type)
    return sorted(missing)


def _buffers_only(graph: ChannelGraph) -> set[str]:
    """Constants that are state, not weights: BN running statistics."""
    out: set[str] = set()
    for node in graph.nodes:
        if node.op_type == "BatchNormalization":
            out.update(node.inputs[i] for i in _BN_STATS if i < len(node.inputs))
    return out


class GraphInterpreter(nn.Module):
    """Run a channel graph in torch.

    Floating-point constants with more than one element are ``nn.Parameter``s
    (what fine-tuning trains; the frontend's copies of a shared constant
    share its parameter while they have its shape); scalars, integers and BN running statistics are
    buffers. In training mode BatchNormalization uses batch statistics and
    updates its running buffers (ONNX momentum convention).

    Args:
        graph: The graph to run.

    Raises:
        UnsupportedOpError: When an op has no torch implementation.
    """

    def __init__(self, graph: ChannelGraph) -> None:
        super().__init__()
        missing = unsupported_ops(graph)
        if missing:
            raise UnsupportedOpError(
                f"no torch implementation for op(s) {', '.join(missing)}: gradient analysis and fine-tuning "
                "cannot run on this model (groups and magnitude pruning still work)"
            )
        self.graph = graph
        self._keys: dict[str, str] = {}
        self.weights = nn.ParameterDict()
        stats = _buffers_only(graph)
        used = {n for node in graph.nodes for n in node.inputs if n}
        for k, (name, info) in enumerate(graph.tensors.items()):
            if info.kind != "param" or name not in used:
                continue
            original = graph.copies.get(name)
            if original in self._keys and graph.tensors[original].shape == info.shape:  # a shared constant stays tied
                self._keys[name] = self._keys[original]
                continue
            value = torch.from_numpy(np.array(graph.const(name)))
            key = f"t{k}"
            self._keys[name] = key
            if value.is_floating_point() and value.numel() > 1 and name not in stats:
                self.weights[key] = nn.Parameter(value)
            else:
                self.register_buffer(key, value)
        self._last_use = self._lifetimes()

    def _lifetimes(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for k, node in enumerate(self.graph.nodes):
            for name in node.inputs:
                if name:
                    last[name] = k
        for name in self.graph.outputs:
            last[name] = len(self.graph.nodes)
        return last

    def constant(self, name: str) -> torch.Tensor:
        """The parameter or buffer that holds constant ``name``."""
        key = self._keys[name]
        return self.weights[key] if key in self.weights else getattr(self, key)

    def named_constants(self) -> dict[str, torch.Tensor]:
        """Every constant by its graph name (for writing back to the source format)."""
        return {name: self.constant(name) for name in self._keys}

    def forward(
        self,
        *inputs: torch.Tensor,
        taps: Mapping[str, Tap] | None = None,
        edge_taps: Mapping[tuple[str, int], Tap] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Run the graph on positional inputs (graph input order).

        Args:
            inputs: One tensor per graph input.
            taps: Tensor name -> function applied to the tensor once produced
                (every consumer sees the result).
            edge_taps: (node name, input index) -> function applied to that
                input of that node only.

        Returns:
            The graph outputs, in order.

        Raises:
            BadInputError: On a wrong number of inputs.
        """
        if len(inputs) != len(self.graph.inputs):
            raise BadInputError(f"the model takes {len(self.graph.inputs)} input(s), got {len(inputs)}")
        taps = taps or {}
        edge_taps = edge_taps or {}
        env: dict[str, Any] = {}
        for name, value in zip(self.graph.inputs, inputs):
            env[name] = taps[name](value) if name in taps else value
        for k, node in enumerate(self.graph.nodes):
            args = [self._value(env, n) for n in node.inputs]
            if edge_taps:
                for i in range(len(args)):
                    tap = edge_taps.get((node.name, i))
                    if tap is not None:
                        args[i] = tap(args[i])
            outs = self.run_node(node, args)
            for name, value in zip(node.outputs, outs):
                if name:
                    env[name] = taps[name](value) if name in taps else value
            for name in node.inputs:
                if name in env and self._last_use.get(name) == k:
                    del env[name]
        return tuple(env[n] if n in env else self._value(env, n) for n in self.graph.outputs)

    def _value(self, env: dict[str, Any], name: str) -> Any:
        if not name:
            return None
        if name in env:
            return env[name]
        return self.constant(name)

    def run_node(self, node: OpNode, args: Sequence[Any]) -> tuple[Any, ...]:
        """Execute one node; override to observe or replace single ops."""
        if self.training and node.op_type == "BatchNormalization":
            return self._batch_norm_train(node, list(args))
        if TORCH_CALL in node.attrs:  # a torch op the table does not know, replayed as traced
            out = node.attrs[TORCH_CALL](*args)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)
        spec = lookup(node.domain, node.op_type)
        assert spec is not None and spec.run is not None  # checked in __init__
        return spec.run(node, list(args))

    def _batch_norm_train(self, node: OpNode, args: list[Any]) -> tuple[Any, ...]:
        x, scale, bias, mean, var = args[:5]
        momentum = 1.0 - float(node.attrs.get("momentum", 0.9))
        y = F.batch_norm(x, mean, var, scale, bias, True, momentum, float(node.attrs.get("epsilon", 1e-5)))
        return (y, *(mean, var)[:len(node.outputs) - 1])
