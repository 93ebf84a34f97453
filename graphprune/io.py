"""Safe file output: never overwrite the input, write atomically."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from graphprune.errors import BadInputError

__all__ = ["StagedFiles", "check_output_path", "save_onnx", "staged_files", "staged_output", "uses_external_data", "weight_bytes", "write_bytes_atomic", "write_text_atomic"]

EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Models with more initializer bytes than this are saved with external data."""


def check_output_path(source: Path, output: Path, force: bool) -> None:
    """Refuse to write over the input, or over an existing file without ``force``.

    Raises:
        BadInputError: When the output is the input, exists, or its folder does not.
    """
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise BadInputError(f"output {output} is the input file: choose another path (the input is never overwritten)")
    if output.exists() and not force:
        raise BadInputError(f"output {output} exists: pass --force to replace it")
    if not output.parent.resolve().is_dir():
        raise BadInputError(f"output folder {output.parent} does not exist")


@contextlib.contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Yield a path in a private folder beside ``output``; move it (and its data file) in place on success.

    Nothing is left behind when the body raises (or is interrupted).
    """
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        staged = stage / output.name
        yield staged
        for extra in sorted(stage.iterdir()):
            if extra != staged:
                os.replace(extra, output.parent / extra.name)
        os.replace(staged, output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class StagedFiles:
    """Files written to private folders beside their destinations, moved in place together by :meth:`commit`."""

    def __init__(self) -> None:
        self._stages: list[tuple[Path, Path]] = []

    def path(self, final: Path) -> Path:
        """Where to write ``final`` now (files beside it in its private folder move with it, e.g. ``.data``)."""
        for stage, dest in self._stages:
            if dest == final:
                return stage / final.name
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        self._stages.append((stage, final))
        return stage / final.name

    @property
    def destinations(self) -> tuple[Path, ...]:
        return tuple(dest for _, dest in self._stages)

    def commit(self) -> None:
        """Move every staged file that was written into place (side files first, so a model never lacks its data)."""
        for stage, final in self._stages:
            staged = stage / final.name
            if not staged.exists():
                continue
            for extra in sorted(stage.iterdir()):
                if extra != staged:
                    os.replace(extra, final.parent / extra.name)
            os.replace(staged, final)

    def discard(self) -> None:
        for stage, _ in self._stages:
            shutil.rmtree(stage, ignore_errors=True)
        self._stages.clear()


@contextlib.contextmanager
def staged_files() -> Iterator[StagedFiles]:
    """A :class:`StagedFiles` whose files move in place when the body completes; nothing is left when it raises."""
    files = StagedFiles()
    try:
        yield files
        files.commit()
    finally:
        files.discard()


def uses_external_data(model: ir.Model) -> bool:
    """Whether some initializer of ``model`` lives in an external data file."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializers of the main graph (external ones included)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_onnx(model: ir.Model, path: Path, external: bool = False) -> None:
    """Save, with external data (``<name>.data``) when asked (keep the input's form) or when the weights are large.

    External data is written tensor by tensor; an inline save builds the whole proto in memory.
    """
    if external or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=f"{path.name}.data")
    else:
        for v in model.graph.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                v.const_value = ir.tensor(v.const_value.numpy(), name=v.name)
        ir.save(model, path)


def write_text_atomic(path: Path, text: str) -> None:
    with staged_output(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with staged_output(path) as tmp:
        tmp.write_bytes(data)
