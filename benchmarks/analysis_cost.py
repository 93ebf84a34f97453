"""Cost of the effective filter analysis vs plain forward+backward passes, in one run.

Run: python benchmarks/analysis_cost.py [--model resnet56] [--samples 1024] [--batch-size 64] [--repeat 3]

Three timings over the same samples and batch size (median of --repeat runs):
  module    the torch nn.Module: forward + backward of the loss w.r.t. the input
  interp    graphprune's interpreter of the exported ONNX graph: the same pass
  analysis  graphprune's analysis (gates on every group, per-sample gradients,
            F_g accumulation, eigen-decompositions, singularities, cost model)
The target (issue 5): analysis <= 2x one plain forward+backward pass.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from graphprune import models
from graphprune.analysis.effective import AnalysisOptions, analyze
from graphprune.coupling.groups import build_groups
from graphprune.execution.interpreter import GraphInterpreter
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx


def _plain(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, y: np.ndarray, batch: int) -> None:
    for s in range(0, len(x), batch):
        xb = torch.from_numpy(x[s:s + batch]).requires_grad_()
        loss = F.cross_entropy(fn(xb), torch.from_numpy(y[s:s + batch]), reduction="sum")
        torch.autograd.grad(loss, [xb])


def _time(fn: Callable[[], object], repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.samples, *models.INPUT_SHAPE)).astype(np.float32)
    y = rng.integers(0, 10, args.samples)
    module = models.build(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        models.export_onnx(module, path, bn="keep")
        om = load_onnx(path)
    coupling = build_groups(om.graph)
    interp = GraphInterpreter(om.graph).eval()
    for p in interp.parameters():
        p.requires_grad_(False)
    for p in module.parameters():
        p.requires_grad_(False)
    data = Calibration((x,), y, "random")
    options = AnalysisOptions(loss="labels", batch_size=args.batch_size)
    _plain(module, x[:128], y[:128], args.batch_size)  # warm-up
    t_module = _time(lambda: _plain(module, x, y, args.batch_size), args.repeat)
    t_interp = _time(lambda: _plain(lambda b: interp(b)[0], x, y, args.batch_size), args.repeat)
    t_analysis = _time(lambda: analyze(om.graph, coupling, data, options, model=interp), args.repeat)
    table = Table(title=f"{args.model}: {args.samples} samples, batch {args.batch_size}, {torch.get_num_threads()} threads")
    for col in ("pass", "seconds", "analysis / this"):
        table.add_column(col, justify="right")
    table.add_row("torch module fwd+bwd", f"{t_module:.2f}", f"{t_analysis / t_module:.2f}x")
    table.add_row("graphprune interpreter fwd+bwd", f"{t_interp:.2f}", f"{t_analysis / t_interp:.2f}x")
    table.add_row(f"analysis ({len(coupling.prunable)} groups)", f"{t_analysis:.2f}", "1.00x")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
