"""The hidden-size rotation on an ``nn.Module``: the same stream, math and report as on ONNX, written into the module.

:func:`slice_hidden_module` unties shared parameters (a GPT-2 LM head tied
to its token embedding is a writer and a reader of the stream, which rotate
differently), finds the stream on the traced channel graph
(:func:`graphprune.coupling.stream.find_stream`: ``nn.Linear``, Hugging Face's ``Conv1D``,
``nn.Embedding``, convolutions, added parameters, ``nn.LayerNorm`` and RMSNorm modules),
measures its second moments at every norm's input with forward hooks, takes
the PCA basis (:mod:`graphprune.recovery.rotation`), writes the rotated and
sliced parameters into a copy of the module, replaces every norm module by
a :class:`UnitRMSNorm` dividing by the original width, and measures the
output error against the input module. It also checks that the full-width
rotation reproduces the module; when it does not, nothing is returned.

The copy keeps the module's classes except its norms, so its forward must
read sizes from tensors or layer attributes (``nn.Linear.out_features``...,
set here): a forward that hard-codes the hidden size fails the full-width
check with the reason.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from graphprune.coupling.stream import Stream, find_stream
from graphprune.errors import ValidationError
from graphprune.frontends.data import Calibration
from graphprune.frontends.torch.norms import RMS_TARGET
from graphprune.recovery.rotation import HiddenOptions, HiddenReport, add_moment, rotated_constants, slice_measured

if TYPE_CHECKING:
    from graphprune.backends.torch_model import ModulePrunable

__all__ = ["UnitRMSNorm", "rotate_module", "slice_hidden_module", "untie_parameters"]

log = logging.getLogger(__name__)

Status = Callable[[str], None]


class UnitRMSNorm(nn.Module):
    """``x / sqrt(sum(x^2) / width + eps)`` over the last axis: a LayerNorm of the mean-free stream whose scale and
    shift were folded into its readers, dividing by the original ``width`` whatever width it is given."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.width, self.eps = width, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.width + self.eps)

    def extra_repr(self) -> str:
        return f"width={self.width}, eps={self.eps}"


class _Unsupported(ValueError):
    """Internal: the module or program cannot take the rotation (the message is the reason; the stream is then frozen)."""


def untie_parameters(module: nn.Module) -> list[str]:
    """Give every module its own copy of a parameter it shares with another (in place); the names that got copies."""
    first: dict[int, str] = {}
    copied = []
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        if id(p) not in first:
            first[id(p)] = name
            continue
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, leaf, nn.Parameter(p.detach().clone(), p.requires_grad))
        copied.append(name)
    return copied


def _owner(state_name: str) -> tuple[str, str]:
    owner, _, leaf = state_name.rpartition(".")
    return owner, leaf


def _norm_modules(model: ModulePrunable, stream: Stream) -> dict[str, str]:
    """Norm op -> qualified name of the ``nn.LayerNorm`` (or fused RMSNorm, :mod:`graphprune.frontends.torch.norms`)
    module that runs it.

    Raises:
        _Unsupported: For a norm that is not such a module's call (a functional ``layer_norm``).
    """
    nodes = {n.name: n for n in model.graph.nodes}
    out: dict[str, str] = {}
    for norm in stream.norms:
        origin = nodes[norm.node].origin
        name = origin.module if origin is not None else None
        m = model.module.get_submodule(name) if name else None
        fused = origin is not None and origin.target == RMS_TARGET
        if name is None or not (isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or fused):
            raise _Unsupported(f"the norm '{norm.node}' is not an nn.LayerNorm or RMSNorm module's call "
                               "(it cannot be replaced)")
        if name in out.values():
            raise _Unsupported(f"the LayerNorm module '{name}' runs on more than one stream point")
        out[norm.node] = name
    return out


def _set_parameter(module: nn.Module, state_name: str, value: np.ndarray) -> None:
    owner_name, leaf = _owner(state_name)
    owner = module.get_submodule(owner_name) if owner_name else module
    old = getattr(owner, leaf)
    tensor = torch.from_numpy(np.ascontiguousarray(value)).to(old.dtype)
    if isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(leaf, tensor, persistent=leaf not in owner._non_persistent_buffers_set)


def _sync_sizes(module: nn.Module) -> None:
    """Size attributes of the usual layers follow their (rotated, sliced) weights (Hugging Face's ``Conv1D``: its
    ``nx`` / ``nf`` hold an ``[in, out]`` weight's sizes)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(getattr(m, "nf", None), int) and isinstance(w := getattr(m, "weight", None), torch.Tensor) \
                and w.ndim == 2:
            setattr(m, "nf", int(w.shape[1]))  # noqa: B010  (nn.Module types its attributes as tensors)
            if isinstance(getattr(m, "nx", None), int):
                setattr(m, "nx", int(w.shape[0]))  # noqa: B010
        elif isinstance(m, nn.Embedding):
            m.embedding_dim = m.weight.shape[1]
        elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            m.out_channels = m.weight.shape[0]
            m.in_channels = m.weight.shape[1] * m.groups


def rotate_module(model: ModulePrunable, stream: Stream, basis: np.ndarray) -> nn.Module:
    """A copy of the module with the stream rotated into ``basis`` (D x k) and its norms made :class:`UnitRMSNorm`.

    Raises:
        ValueError: When the module cannot take it (a functional norm, a reader with no bias to take a shift).
    """
    tm = model.tm
    norms = _norm_modules(model, stream)
    values, added = rotated_constants(stream, tm.graph.param, basis)
    frontend_only = {s.tensor for s in stream.reshapes}  # targets the forward computes from tensors: nothing to write
    new = copy.deepcopy(model.module)
    with torch.no_grad():
        for name, value in values.items():
            if name in frontend_only:
                continue
            if name not in tm.state_names:
                raise _Unsupported(f"'{name}' is a constant of the traced graph, not a parameter of the module")
            _set_parameter(new, tm.state_names[name], value)
        readers = {r.node: r for r in stream.readers}
        for node, shift in added.items():
            owner_name, _ = _owner(tm.state_names[readers[node].weight.tensor])
            layer = new.get_submodule(owner_name)
            if not isinstance(layer, nn.Linear) or layer.bias is not None:
                raise _Unsupported(f"'{owner_name}' reads the stream with no bias to take its norm's shift")
            layer.bias = nn.Parameter(torch.from_numpy(np.ascontiguousarray(shift)).to(layer.weight.dtype))
    for node, name in norms.items():
        owner_name, leaf = _owner(name)
        eps = next(n.epsilon for n in stream.norms if n.node == node)
        setattr(new.get_submodule(owner_name) if owner_name else new, leaf, UnitRMSNorm(stream.width, eps))
    _sync_sizes(new)
    return new.eval()


@contextmanager
def _norm_inputs(module: nn.Module, names: Mapping[str, str], centre: bool, sums: dict[str, np.ndarray]) -> Iterator[None]:
    """Accumulate the moments of each named module's input (``names``: module -> the stream tensor it normalises)."""
    handles = []

    def hook(tensor: str) -> Callable[..., None]:
        return lambda _m, args: add_moment(sums, tensor, args[0].detach().cpu().numpy(), centre)

    for qual, tensor in names.items():
        handles.append(module.get_submodule(qual).register_forward_pre_hook(hook(tensor)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _first_outputs(module: nn.Module, data: Calibration, batch_size: int, set_eval: bool = True) -> np.ndarray:
    """The first output of ``module`` on every sample of ``data`` (``set_eval``: call ``.eval()`` first; an unlifted
    program refuses it and runs as exported).

    Raises:
        ValidationError: When the module fails to run (a rotated copy whose forward hard-codes the width).
    """
    parts = []
    with torch.no_grad():
        for _, inputs, _ in data.batches(batch_size):
            try:
                out: Any = (module.eval() if set_eval else module)(*(torch.from_numpy(a) for a in inputs))
            except RuntimeError as exc:
                raise ValidationError(f"the module fails to run ({str(exc).strip().splitlines()[0]}); does the forward "
                                      "hard-code the hidden size? The hidden pass cannot run on this module") from None
            parts.append((out[0] if isinstance(out, (tuple, list)) else out).detach().cpu().numpy())
    return np.concatenate(parts)


def slice_hidden_module(model: ModulePrunable, data: Calibration, eval_data: Calibration | None, options: HiddenOptions,
                        status: Status | None = None) -> tuple[ModulePrunable, HiddenReport]:
    """Rotate and slice the hidden stream of a module (the input is not modified).

    Returns:
        (the new model, or ``model`` itself when the stream is frozen; the report).

    Raises:
        BadInputError: No norm over a hidden axis in the model.
        ValidationError: The full-width rotation does not reproduce the model.
    """
    from graphprune.backends.torch_model import module_model

    say = status or (lambda _: None)
    original = model
    untied = copy.deepcopy(model.module)
    copied = untie_parameters(untied)
    if copied:
        say(f"untied {len(copied)} shared parameter(s) ({', '.join(copied[:3])}): a tied writer and reader rotate differently")
        model = module_model(untied, model.example_inputs)
    stream = find_stream(model.graph)  # a model with no norm is bad input
    if stream.frozen:
        return original, HiddenReport(stream.width, frozen=stream.frozen)
    try:
        norm_modules = _norm_modules(model, stream)
    except _Unsupported as exc:
        return original, HiddenReport(stream.width, frozen=str(exc))
    say(f"measuring the hidden stream ({len(stream.norms)} norms, width {stream.width})")
    inputs = {norm_modules[n.node]: n.input for n in stream.norms}
    moments: dict[str, np.ndarray] = {}
    calib = data.subset(options.samples, options.seed)
    with _norm_inputs(model.module, inputs, stream.centred, moments):
        _first_outputs(model.module, calib, options.batch_size)
    try:
        sliced, report = slice_measured(stream, moments, original.module, data, eval_data, options,
                                        lambda basis: rotate_module(model, stream, basis),
                                        lambda m, d: _first_outputs(m, d, options.batch_size), "module", say)
    except _Unsupported as exc:
        return original, HiddenReport(stream.width, frozen=str(exc))
    return module_model(sliced, model.example_inputs), report
