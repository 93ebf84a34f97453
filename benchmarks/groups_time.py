"""Time to build the coupling groups of every reference model, from its ONNX file and from the torch module.

Run: python benchmarks/groups_time.py [--repeat N]
ONNX path: load + groups (the export, torch.onnx, is printed apart: not graphprune's cost).
torch path: the channel graph from the ExportedProgram + groups (torch.export is printed apart).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from graphprune import models
from graphprune.coupling.groups import build_groups
from graphprune.frontends.onnx import load_onnx
from graphprune.frontends.torch.attention import swapped_attention
from graphprune.frontends.torch.trace import to_channel_graph


def _torch_path(name: str, repeat: int) -> tuple[float, float]:
    """(torch.export seconds, median seconds of channel graph + groups) for one reference model."""
    module = models.build(name).eval()
    x = torch.zeros(2, *models.INPUT_SHAPES[name])
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    t = time.perf_counter()
    with swapped_attention(module):
        program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    export_s = time.perf_counter() - t
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        graph, _ = to_channel_graph(program)
        build_groups(graph)
        times.append(time.perf_counter() - t)
    return export_s, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    table = Table(title="graphprune: coupling groups from ONNX (load + groups) and from torch (graph + groups), median of runs")
    for col in ("model", "nodes", "groups", "prunable", "onnx export s", "load s", "groups s", "load+groups s",
                "torch.export s", "torch graph+groups s"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for name in models.REFERENCE_MODELS:
            path = Path(tmp) / f"{name}.onnx"
            t = time.perf_counter()
            models.export_onnx(models.build(name), path, models.INPUT_SHAPES[name], bn="keep")
            export_s = time.perf_counter() - t
            loads, builds = [], []
            for _ in range(args.repeat):
                t = time.perf_counter()
                om = load_onnx(path)
                loads.append(time.perf_counter() - t)
                t = time.perf_counter()
                coupling = build_groups(om.graph)
                builds.append(time.perf_counter() - t)
            lo, bu = statistics.median(loads), statistics.median(builds)
            t_export, t_groups = _torch_path(name, args.repeat)
            table.add_row(
                name, str(len(om.graph.nodes)), str(len(coupling.groups)), str(len(coupling.prunable)),
                f"{export_s:.2f}", f"{lo:.3f}", f"{bu:.3f}", f"{lo + bu:.3f}", f"{t_export:.2f}", f"{t_groups:.3f}",
            )
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
