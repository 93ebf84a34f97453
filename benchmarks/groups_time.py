"""Time to load an ONNX model and build its coupling groups, for every reference model.

Run: python benchmarks/groups_time.py [--repeat N]
Export time (torch.onnx) is printed separately and is not part of graphprune's cost.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import models
from graphprune.coupling import build_groups
from graphprune.onnx_frontend import load_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    table = Table(title="graphprune: ONNX load + coupling groups (median of runs)")
    for col in ("model", "nodes", "groups", "prunable", "export s", "load s", "groups s", "load+groups s"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for name in models.REFERENCE_MODELS:
            path = Path(tmp) / f"{name}.onnx"
            t = time.perf_counter()
            models.export_onnx(models.build(name), path, bn="keep")
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
            table.add_row(
                name, str(len(om.graph.nodes)), str(len(coupling.groups)), str(len(coupling.prunable)),
                f"{export_s:.2f}", f"{lo:.3f}", f"{bu:.3f}", f"{lo + bu:.3f}",
            )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
