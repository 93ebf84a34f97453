"""Format backends: apply a plan to an ONNX model, an nn.Module or an ExportedProgram.

:class:`~graphprune.ir.model.PrunableModel` is what the passes see;
:func:`load_model` opens a file as one.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphprune.ir.model import PrunableModel

__all__ = ["load_model"]


def load_model(path: Path) -> PrunableModel:
    """An ONNX file, or a saved ExportedProgram (``.pt2``), as a prunable model.

    Raises:
        BadInputError: A missing, corrupt or invalid file.
    """
    if path.suffix == ".pt2":
        from graphprune.backends.torch_model import load_program_model

        return load_program_model(path)
    from graphprune.backends.onnx_model import load_onnx_model

    return load_onnx_model(path)
