"""torch modules and ExportedPrograms behind the :class:`~graphprune.ir.model.PrunableModel` protocol (torch runs them).

A module is pruned into a copy of its own class and traced again; a program
is rewritten, exported again and described anew. Compensation and repair
values land in the module's (or program's) state through the frontend's map
of graph tensor -> state name; the channel graph sees them at once.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import nn

from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError, ValidationError
from graphprune.execution.training import FitOptions, Progress
from graphprune.frontends.data import Calibration
from graphprune.frontends.torch.trace import TorchModel, load_exported_program, load_module, program_torch_model
from graphprune.ir.graph import ChannelGraph
from graphprune.ir.model import Int8Form, PrunableModel
from graphprune.ir.plan import Plan

if TYPE_CHECKING:
    from graphprune.execution.latency_tables import LatencyOptions

__all__ = ["ModulePrunable", "ProgramPrunable", "load_program_model", "module_model"]

log = logging.getLogger(__name__)

_M = TypeVar("_M", "ModulePrunable", "ProgramPrunable")


def _overlay(graph: ChannelGraph, values: Mapping[str, np.ndarray]) -> ChannelGraph:
    """The same graph reading ``values`` in place of its constants of those names."""
    base = graph.constant_loader
    fixed = {k: np.asarray(v) for k, v in values.items()}
    return dataclasses.replace(graph, constant_loader=lambda name: fixed[name] if name in fixed else base(name))


def _state_values(tm: TorchModel, values: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Graph-named values as state-named tensors.

    Raises:
        ValidationError: When a value names no state tensor.
    """
    out = {}
    for name, value in values.items():
        if name not in tm.state_names:
            raise ValidationError(f"'{name}' is not a parameter or buffer of the model")
        out[tm.state_names[name]] = torch.from_numpy(np.ascontiguousarray(value))
    return out


def _outputs(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _at_batch(examples: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """Inputs like ``examples`` with ``batch`` rows (random floats, zero integers)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for x in examples:
        shape = (batch, *x.shape[1:])
        out.append(torch.randn(shape, generator=gen).to(x.dtype) if x.is_floating_point() else torch.zeros(shape, dtype=x.dtype))
    return tuple(out)


def _float_only(quantized: Int8Form | None) -> None:
    if quantized:
        raise BadInputError("int8 latency is measured on onnxruntime: export the torch model to ONNX to profile it quantized")


@contextlib.contextmanager
def _running(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> Iterator[Callable[[], object]]:
    """One forward pass of ``fn`` on ``inputs`` in inference mode (a :data:`graphprune.execution.timing.Runner`'s yield)."""
    with torch.inference_mode():
        yield lambda: fn(*inputs)


def _latency(runner: contextlib.AbstractContextManager[Callable[[], object]], runs: int) -> float:
    from graphprune.execution.timing import median_ms

    with runner as run:
        return median_ms(run, runs)


def _check_signature(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    if len(got) != len(want) or any(g.dim() != w.dim() or g.dtype != w.dtype for g, w in zip(got, want)):
        raise ValidationError("the pruned model's outputs differ in number, rank or dtype from the original's")


def _finetune_graph(graph: ChannelGraph, names: Mapping[str, str], data: Calibration, options: FitOptions,
                    teacher: ChannelGraph | None, progress: Progress | None) -> dict[str, np.ndarray]:
    """Train a graph through the interpreter; returns its trained floating-point state, graph-named."""
    from graphprune.analysis.fisher import default_device
    from graphprune.execution.interpreter import GraphInterpreter
    from graphprune.execution.training import fit

    student = GraphInterpreter(graph)
    teach = GraphInterpreter(teacher) if teacher is not None and data.labels is None else None
    if teach is not None:
        for p in teach.parameters():
            p.requires_grad_(False)
    fit(student, data, options, teach, progress, default_device())
    return {n: t.detach().cpu().numpy() for n, t in student.cpu().named_constants().items()
            if n in names and t.is_floating_point()}


class _Traced:
    """What both torch models share: the traced channel graph, and torch (on the CPU) as their runtime."""

    tm: TorchModel

    @property
    def graph(self) -> ChannelGraph:
        return self.tm.graph

    @property
    def runtime(self) -> str:
        return "torch (cpu)"

    def latency_model(self, coupling: Coupling, options: LatencyOptions, floors: Mapping[int, int]) -> None:
        """None: latency tables are measured on onnxruntime only."""
        return None


@dataclasses.dataclass(frozen=True)
class ModulePrunable(_Traced):
    """An ``nn.Module`` traced on example inputs; pruned copies keep its class."""

    tm: TorchModel
    example_inputs: tuple[torch.Tensor, ...]
    kind: str = "module"

    @property
    def module(self) -> nn.Module:
        assert self.tm.module is not None
        return self.tm.module

    def pruned(self, coupling: Coupling, plan: Plan) -> ModulePrunable:
        from graphprune.backends.torch_module import prune_module

        return module_model(prune_module(self.tm, coupling, plan), self.example_inputs)

    def with_values(self, values: Mapping[str, np.ndarray]) -> ModulePrunable:
        if not values:
            return self
        new = copy.deepcopy(self.module)
        state = new.state_dict(keep_vars=True)
        with torch.no_grad():
            for qual, value in _state_values(self.tm, values).items():
                state[qual].copy_(value.to(state[qual].dtype))
        tm = TorchModel(new, None, _overlay(self.tm.graph, values), self.tm.state_names)
        return ModulePrunable(tm, self.example_inputs)

    def exactness(self, source: PrunableModel, coupling: Coupling, plan: Plan) -> float:
        from graphprune.backends.torch_module import verify_module

        src = _as(source, ModulePrunable)
        return verify_module(src.tm, coupling, plan, self.module, list(src.example_inputs))

    def finetuned(self, data: Calibration, options: FitOptions, teacher: PrunableModel | None,
                  progress: Progress | None) -> ModulePrunable:
        from graphprune.analysis.fisher import default_device
        from graphprune.execution.training import fit

        new = copy.deepcopy(self.module)
        teach = None
        if teacher is not None and data.labels is None:
            teach = copy.deepcopy(_as(teacher, ModulePrunable).module)
            teach.requires_grad_(False)
        fit(new, data, options, teach, progress, default_device())
        new = new.cpu().eval()
        state = new.state_dict()
        values = {g: state[q].detach().numpy() for g, q in self.tm.state_names.items() if q in state}
        return ModulePrunable(TorchModel(new, None, _overlay(self.tm.graph, values), self.tm.state_names), self.example_inputs)

    def run_check(self, original: PrunableModel) -> None:
        src = _as(original, ModulePrunable)
        inputs = _at_batch(src.example_inputs, 2)
        with torch.no_grad():
            _check_signature(_outputs(self.module.eval()(*inputs)), _outputs(src.module.eval()(*inputs)))

    def latency_ms(self, batch: int, runs: int, threads: int = 0, quantized: Int8Form | None = None) -> float:
        return _latency(self.runner(batch, threads, quantized), runs)

    def runner(self, batch: int, threads: int = 0, quantized: Int8Form | None = None) -> contextlib.AbstractContextManager[Callable[[], object]]:
        _float_only(quantized)
        return _running(self.module.eval(), _at_batch(self.example_inputs, batch))

    def accuracy(self, data: Calibration) -> float:
        from graphprune.execution.training import accuracy

        return accuracy(self.module, data)

    def save(self, path: Path, original: PrunableModel) -> None:
        """``.pt``: the state dict (rebuild with :func:`graphprune.backends.torch_module.load_pruned`); ``.onnx``: exported and checked."""
        if path.suffix == ".pt":
            torch.save(self.module.state_dict(), path)
        elif path.suffix == ".onnx":
            export_onnx_checked(self.module, self.example_inputs, path)
        else:
            raise BadInputError(f"output {path}: a module is written as .pt (state dict) or .onnx")


@dataclasses.dataclass(frozen=True)
class ProgramPrunable(_Traced):
    """A saved ExportedProgram (``.pt2``): no module class needed."""

    tm: TorchModel
    kind: str = "program"

    @property
    def program(self) -> torch.export.ExportedProgram:
        assert self.tm.program is not None
        return self.tm.program

    def _inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        from graphprune.backends.exported_program import example_inputs

        return example_inputs(self.program, batch)

    def pruned(self, coupling: Coupling, plan: Plan) -> ProgramPrunable:
        from graphprune.backends.exported_program import prune_program

        return program_model(prune_program(self.tm, coupling, plan))

    def with_values(self, values: Mapping[str, np.ndarray]) -> ProgramPrunable:
        if not values:
            return self
        program = copy.deepcopy(self.program)
        with torch.no_grad():
            for qual, value in _state_values(self.tm, values).items():
                store = program.state_dict if qual in program.state_dict else program.constants
                store[qual].copy_(value.to(store[qual].dtype))
        return ProgramPrunable(TorchModel(None, program, _overlay(self.tm.graph, values), self.tm.state_names))

    def exactness(self, source: PrunableModel, coupling: Coupling, plan: Plan) -> float:
        from graphprune.backends.exported_program import verify_program

        return verify_program(_as(source, ProgramPrunable).tm, coupling, plan, self.program)

    def finetuned(self, data: Calibration, options: FitOptions, teacher: PrunableModel | None,
                  progress: Progress | None) -> ProgramPrunable:
        values = _finetune_graph(self.graph, self.tm.state_names, data, options,
                                 teacher.graph if teacher is not None else None, progress)
        return self.with_values(values)

    def run_check(self, original: PrunableModel) -> None:
        src = _as(original, ProgramPrunable)
        inputs = src._inputs()
        with torch.no_grad():
            _check_signature(_outputs(self.program.module()(*inputs)), _outputs(src.program.module()(*inputs)))

    def latency_ms(self, batch: int, runs: int, threads: int = 0, quantized: Int8Form | None = None) -> float:
        return _latency(self.runner(batch, threads, quantized), runs)

    def runner(self, batch: int, threads: int = 0, quantized: Int8Form | None = None) -> contextlib.AbstractContextManager[Callable[[], object]]:
        _float_only(quantized)
        return _running(self.program.module(), self._inputs(batch))

    def accuracy(self, data: Calibration) -> float:
        from graphprune.execution.training import accuracy

        return accuracy(self.program.module(), data)

    def save(self, path: Path, original: PrunableModel) -> None:
        """``.pt2`` (loaded back and compared), or ``.onnx`` (dynamo exporter, compared on onnxruntime)."""
        if path.suffix == ".pt2":
            torch.export.save(self.program, str(path))
            again = torch.export.load(str(path))
            inputs = self._inputs()
            with torch.no_grad():
                want, got = _outputs(self.program.module()(*inputs)), _outputs(again.module()(*inputs))
            if any(not torch.allclose(w, g) for w, g in zip(want, got)):
                raise ValidationError(f"{path} does not load back to the same program")
        elif path.suffix == ".onnx":
            export_onnx_checked(self.program, self._inputs(), path)
        else:
            raise BadInputError(f"output {path}: a .pt2 input is written as .pt2 or .onnx")


def _as(model: PrunableModel, cls: type[_M]) -> _M:
    if not isinstance(model, cls):
        raise BadInputError(f"a {cls.__name__} was expected, got a {model.kind}")
    return model


def export_onnx_checked(model: nn.Module | torch.export.ExportedProgram, inputs: Sequence[torch.Tensor], path: Path) -> None:
    """Export with the dynamo exporter and check onnxruntime gives torch's outputs.

    Raises:
        ValidationError: When the export fails or its outputs differ.
    """
    from graphprune.execution.sessions import make_session
    from graphprune.execution.validate import compare_outputs

    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # the exporter warns about optional packages (torchvision ops)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args=tuple(inputs), f=str(path), dynamo=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - exporter failures of any kind become one line
        raise ValidationError(f"the pruned model does not export to ONNX ({str(exc).splitlines()[0][:200]})") from None
    finally:
        exporter_log.setLevel(level)
    session = make_session(str(path))
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    run = model.module() if isinstance(model, torch.export.ExportedProgram) else model.eval()
    with torch.no_grad():
        want = [t.numpy() for t in _outputs(run(*inputs))]
    compare_outputs(want, session.run(None, feeds), [o.name for o in session.get_outputs()])


def module_model(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> ModulePrunable:
    """Trace ``module`` (see :func:`graphprune.frontends.torch.trace.load_module`)."""
    inputs = tuple(example_inputs)
    return ModulePrunable(load_module(module, inputs), inputs)


def program_model(program: torch.export.ExportedProgram) -> ProgramPrunable:
    return ProgramPrunable(program_torch_model(program))


def load_program_model(path: Path) -> ProgramPrunable:
    """Load a ``.pt2`` file (see :func:`graphprune.frontends.torch.trace.load_exported_program`)."""
    return ProgramPrunable(load_exported_program(path))
