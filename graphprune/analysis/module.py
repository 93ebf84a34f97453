"""Effective filter analysis of a torch ``nn.Module``, through the torch frontend.

The module is traced with ``torch.export`` into the same channel graph the
ONNX path builds (group anchors name the module's parameters, e.g.
``conv1.weight[0]``) and analysed by the same interpreter.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from graphprune.analysis.effective import Analysis, AnalysisOptions, analyze
from graphprune.coupling.groups import build_groups
from graphprune.execution.progress import Progress
from graphprune.frontends.data import Calibration
from graphprune.frontends.torch.trace import load_module

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
        BadInputError: When the module cannot be traced.
    """
    tm = load_module(module, example_inputs)
    return analyze(tm.graph, build_groups(tm.graph), data, options, progress, meta={"model": type(module).__name__})
