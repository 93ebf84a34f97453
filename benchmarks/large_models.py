"""Large external-data models: peak memory and time of `graphprune groups` and `graphprune prune` as models grow.

Run: python benchmarks/large_models.py [--dir /tmp/graphprune-large] [--quick]

Two series, each command in a fresh process (peak RSS from the kernel, wall time):
  - weight size: width-4096 Gemm chains of 4, 8, 16 and 32 layers (0.27 to 2.15 GB of
    external data); pruning keeps half the channels of every layer;
  - node count: width-64 chains of 250 to 4,000 layers (1,000 to 16,000 nodes), tiny weights,
    to show time linear in the node count.
Memory is reported as a ratio to the weight bytes (issue 8 asks for well under 3x).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from large_model import write_wide_model

console = Console(width=120)


_WRAPPER = ("import resource, sys; from graphprune.cli import main; code = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)")


def _run(args: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (bytes) of a fresh process running the CLI, exit code."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    peak = float(lines[-1].split()[1]) * 1024.0 if lines and lines[-1].startswith("PEAK") else float("nan")
    if proc.returncode:
        console.print("\n".join(lines[:-1]))
    return seconds, peak, proc.returncode


def _case(folder: Path, width: int, layers: int) -> dict:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    src = folder / "model.onnx"
    size = write_wide_model(src, width, layers)
    row: dict = {"width": width, "layers": layers, "nodes": 2 * layers + 1, "weight_gb": size / 1e9}
    for name, args in (("groups", ["groups", str(src)]),
                       ("prune", ["prune", str(src), "-o", str(folder / "pruned.onnx"), "--ratio", "0.5", "--latency-runs", "0"])):
        seconds, peak, code = _run(args)
        row[f"{name}_s"], row[f"{name}_peak_gb"], row[f"{name}_exit"] = seconds, peak / 1e9, code
    shutil.rmtree(folder)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/graphprune-large"))
    p.add_argument("--quick", action="store_true", help="small sizes only (minutes)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    sizes = [(4096, n) for n in ((4, 8) if args.quick else (4, 8, 16, 32))]
    counts = [(64, n) for n in ((250, 1000) if args.quick else (250, 1000, 4000))]
    rows = []
    for width, layers in sizes + counts:
        rows.append(_case(args.dir, width, layers))
        console.print(rows[-1])
    table = Table(title="graphprune on growing external-data models (fresh process per command)")
    for col in ("width", "nodes", "weights", "groups time", "groups peak", "prune time", "prune peak", "prune peak / weights"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["width"]), f"{r['nodes']:,}", f"{r['weight_gb']:.2f} GB", f"{r['groups_s']:.1f} s",
                      f"{r['groups_peak_gb']:.2f} GB", f"{r['prune_s']:.1f} s", f"{r['prune_peak_gb']:.2f} GB",
                      f"{r['prune_peak_gb'] / r['weight_gb']:.2f}x")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
