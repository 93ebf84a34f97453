"""Effective filter analysis of a torch ``nn.Module``.

The module is exported to ONNX in memory (TorchScript exporter, BatchNorm
kept, no constant folding, so weights keep their parameter names) and analysed
through the interpreter; group anchors therefore name the module's
parameters (``conv1.weight[0]``). The native torch.export frontend (issue 4)
will replace the export step; the results do not depend on it.
"""
from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from graphprune.analysis import Analysis, AnalysisOptions, analyze
from graphprune.coupling import build_groups
from graphprune.data import Calibration
from graphprune.errors import BadInputError
from graphprune.fisher import Progress
from graphprune.onnx_frontend import load_onnx

__all__ = ["analyze_module"]


def analyze_module(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    data: Calibration,
    options: AnalysisOptions | None = None,
    progress: Progress | None = None,
) -> Analysis:
    """Analyse ``module`` (in eval mode) on ``data``.

    Raises:
        BadInputError: When the module cannot be exported.
    """
    module = module.eval()
    names = [f"input{i}" if len(example_inputs) > 1 else "input" for i in range(len(example_inputs))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "module.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, tuple(example_inputs), str(path), input_names=names, dynamo=False,
                    dynamic_axes={n: {0: "batch"} for n in names}, opset_version=17,
                    training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                )
        except Exception as exc:  # noqa: BLE001 - any exporter failure is the user's model
            raise BadInputError(f"the module cannot be exported for analysis ({type(exc).__name__}: {str(exc)[:200]})") from None
        om = load_onnx(path)
        return analyze(om.graph, build_groups(om.graph), data, options, progress, meta={"model": type(module).__name__})
