"""Accuracy before fine-tuning: edge compensation vs sequential reconstruction, with and without repair.

Run: python benchmarks/reconstruction.py --model resnet20 [--bn keep|fold] [--epochs 1] [--samples 1024]
         [--test 10000] [--targets 2,3] [--json benchmarks/reconstruction_resnet20_keep.json]

A reference CNN trained on Fashion-MNIST (cached in benchmarks/.cache) is
planned to 2x and 3x fewer MACs, hierarchically (effective filters) and
uniformly (L2), and each plan is recovered, with no fine-tuning, by
  - nothing, and repair only (BN re-estimation, or bias correction with BN folded);
  - ``edges``: the compensate pass fitting each dropped channel from the
    original network's kept ones at every exit edge (with and without repair);
  - ``sequential``: every consumer the plan changes refitted in graph order on
    the pruned network's own inputs (with and without repair), when this
    checkout has it.
Calibration: --samples unlabelled training images (2,048 for the analysis);
accuracy: the first --test test images on onnxruntime. The script only uses APIs
that older checkouts have too, so ``PYTHONPATH=<old checkout>`` measures the
"before" figures at the same plans (the plans' kept counts are recorded).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path

from common import analyzed_workspace, trained_onnx  # benchmarks/ (same folder)
from rich.console import Console
from rich.table import Table

from graphprune.analysis.cost import model_cost
from graphprune.execution.measure import ort_accuracy
from graphprune.frontends.data import Calibration
from graphprune.ir.onnx import model_bytes
from graphprune.models.fashion import fashion_mnist
from graphprune.pipeline.passes import (
    CompensateOptions,
    CompensatePass,
    PlanPass,
    RepairPass,
    RewriteOptions,
    RewritePass,
    Workspace,
)
from graphprune.planning.options import PlanOptions

console = Console(width=150)
METHODS = ("edges", "sequential")


def _has_methods() -> bool:
    return "method" in {f.name for f in dataclasses.fields(CompensateOptions)}


def _recover(ws: Workspace, test, samples: int, method: str | None) -> dict[str, float]:
    """Accuracy after compensation by ``method`` (None: none) and rewrite, then after repair too; seconds taken."""
    opts = CompensateOptions(samples=samples, method=method) if method and _has_methods() else CompensateOptions(samples=samples)
    t0 = time.time()
    w = CompensatePass(opts)(copy.copy(ws)).workspace if method else copy.copy(ws)
    seconds = time.time() - t0
    w = RewritePass(RewriteOptions(verify=False))(w).workspace
    key = method or "none"
    out = {key: ort_accuracy(model_bytes(w.model.om.model), test), f"{key} s": seconds}
    t0 = time.time()
    r = RepairPass(CompensateOptions(samples=samples))(copy.copy(w)).workspace
    out[f"{key} + repair"] = ort_accuracy(model_bytes(r.model.om.model), test)
    out[f"{key} + repair s"] = seconds + time.time() - t0
    out["macs_reduction"] = model_cost(ws.model.graph).macs / model_cost(w.model.graph).macs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--bn", choices=("keep", "fold"), default="keep")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--targets", default="2,3", help="MACs reductions, comma-separated")
    parser.add_argument("--test", type=int, default=10000, help="test images (the first N of the split)")
    parser.add_argument("--plans", default="hierarchical,uniform", help="level-1 methods, comma-separated")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    t0 = time.time()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    test = Calibration(tuple(a[:args.test] for a in test.inputs), None if test.labels is None else test.labels[:args.test], test.source)
    cal = train.subset(max(args.samples, 2048), seed=0)
    _, om = trained_onnx(args.model, args.epochs, args.bn)
    base = ort_accuracy(model_bytes(om.model), test)
    ws = analyzed_workspace(om, cal)
    methods = METHODS if _has_methods() else ("edges",)
    rows = []
    for red in (float(t) for t in args.targets.split(",")):
        for method, crit in ((m, {"hierarchical": "effective", "uniform": "l2"}[m]) for m in args.plans.split(",")):
            planned = PlanPass(PlanOptions(method=method, criterion=crit, macs=1.0 / red, allow_over_limit=True))(ws).workspace
            assert planned.plan is not None
            kept = [len(g.keep) for g in planned.plan.groups]
            row: dict = {"target": f"{red:g}x", "plan": f"{method} / {crit}",
                         "kept": hashlib.sha1(json.dumps([list(g.keep) for g in planned.plan.groups]).encode()).hexdigest()[:10],
                         "kept_counts": kept}
            row.update(_recover(planned, test, args.samples, None))
            for m in methods:
                row.update(_recover(planned, test, args.samples, m))
            rows.append(row)
            console.print(row)
    cols = ["none", "none + repair", *[f"{m}{r}" for m in methods for r in ("", " + repair")]]
    table = Table(title=f"{args.model} (BN {args.bn}) on Fashion-MNIST, base {base:.4f}: test accuracy with NO fine-tuning")
    for col in ("target", "plan", "MACs red.", *cols):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["target"], r["plan"], f"{r['macs_reduction']:.2f}x", *(f"{r[c]:.4f}" for c in cols))
    console.print(table)
    console.print(f"total time {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "bn": args.bn, "epochs": args.epochs, "base": base, "test": len(test),
                                         "samples": args.samples, "rows": rows, "seconds": time.time() - t0}, indent=1))


if __name__ == "__main__":
    main()
