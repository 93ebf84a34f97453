"""Does statistics repair help after the sequential refit? The same plans with and without it, before fine-tuning.

Run: python -u benchmarks/refit_repair.py [--models resnet20 resnet56 vgg16s mobilenetv2] [--grid 1.5 2 3]
    [--bn keep fold] [--json benchmarks/refit_repair.json]

Per model (trained on Fashion-MNIST, cached; exported to ONNX with BN kept, and folded): analyze on 2,048
labelled training images; at each MACs reduction of the grid, the limit's budget family plan (every group at its
effective filters under one predicted-loss budget), compensated by the sequential refit (1,024 images) and
rewritten; then measured on the 10,000 test images as the pipeline leaves it (no repair after the refit) and
with the repair the pipeline ran after the refit before (BN re-estimation with BN kept, sequential bias
correction with BN folded).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from common import analyzed_workspace, log  # benchmarks/ (same folder)
from limit import Family  # benchmarks/limit.py: the budget family of plans

from graphprune import models
from graphprune.frontends.onnx import load_onnx
from graphprune.ir.plan import plan_from_keep
from graphprune.models.fashion import fashion_mnist, trained
from graphprune.pipeline.passes import (
    CompensateOptions,
    CompensatePass,
    RepairPass,
    RewriteOptions,
    RewritePass,
    Workspace,
)


def repaired(w: Workspace, samples: int) -> Any:
    """The rewritten model with the repair the pipeline ran after the refit before (the repair pass itself, told
    nothing about the refit: BN re-estimation, else bias correction)."""
    before = copy.copy(w)
    before.compensation = None
    return RepairPass(CompensateOptions(samples=samples))(before).workspace.model


def run_model(name: str, bn: str, grid: list[float], train: Any, test: Any) -> dict[str, Any]:
    module = trained(name, 3.0, cache_dir="benchmarks/.cache")
    path = Path(tempfile.mkdtemp()) / f"{name}.onnx"
    models.export_onnx(module, path, bn=bn)
    om = load_onnx(path)
    ws = analyzed_workspace(om, train.subset(4096, seed=0))
    fam = Family(ws)
    base = ws.original.accuracy(test)
    rows = []
    for red in grid:
        b = fam.budget_for(red)
        plan = plan_from_keep(fam.coupling, {g: fam.orders[g].keep(k) for g, k in fam.counts(b).items()}, {"budget": b})
        w = Workspace(original=ws.original, model=ws.original, data=ws.data, coupling=fam.coupling, plan=plan)
        t = time.perf_counter()
        w = CompensatePass(CompensateOptions(samples=1024))(w).workspace
        w = RewritePass(RewriteOptions(verify=False))(w).workspace
        refit_s = time.perf_counter() - t
        t = time.perf_counter()
        old = repaired(w, 1024)
        repair_s = time.perf_counter() - t
        row = {"target": red, "macs_reduction": fam.reduction(b), "refit": w.model.accuracy(test),
               "refit_then_repair": old.accuracy(test), "refit_seconds": refit_s, "repair_seconds": repair_s}
        log(name, bn, row)
        rows.append(row)
    return {"model": name, "bn": bn, "base": base, "points": rows}


def table(results: list[dict[str, Any]]) -> str:
    out = ["| model | BN | base | MACs reduction | refit (default now) | refit then repair (before) | repair's effect |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        for p in r["points"]:
            d = 100 * (p["refit_then_repair"] - p["refit"])
            out.append(f"| {r['model']} | {r['bn']} | {r['base']:.4f} | {p['macs_reduction']:.2f}x | {p['refit']:.4f} | "
                       f"{p['refit_then_repair']:.4f} | {d:+.2f} pp |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "vgg16s", "mobilenetv2"])
    parser.add_argument("--grid", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--bn", nargs="+", default=["keep"], choices=["keep", "fold"])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/refit_repair.json"))
    args = parser.parse_args()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    results = [run_model(m, bn, args.grid, train, test) for m in args.models for bn in args.bn]
    args.json.write_text(json.dumps({"results": results}, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
