"""Does stratified scoring measure what scoring every held-out image does? The limit's points against a full score.

Run: OMP_NUM_THREADS=1 python benchmarks/limit_strata.py [--models resnet20 resnet56] [--budgets 0.04 0.06 0.075]
     [--json benchmarks/limit_strata.json]

Per model (trained on the ``fit`` split, cached; the same setting as ``benchmarks/limit.py``): analyze on 2,048 of
4,096 ``fit`` images, then at each predicted-loss budget the limit pass's point (the budget family's plan,
compensated, rewritten, repaired) scored on all 4,096 held-out ``val`` images; the drop the pass would report (the
stratified prefix it stops at, :func:`graphprune.pipeline.limit.decided` at tolerance 1 pp and confidence 0.8)
against the plain paired drop over all 4,096, each with its standard error.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common import analyzed_workspace, log  # benchmarks/ (same folder)

from graphprune import models
from graphprune.frontends.onnx import load_onnx
from graphprune.models.fashion import fashion_mnist, trained
from graphprune.pipeline import limit as limit_pass
from graphprune.planning.limit import paired_drop, stratified_order

TOLERANCE, CONFIDENCE = 0.01, 0.8


def compare(name: str, budgets: list[float], epochs: float) -> dict[str, Any]:
    """Each budget's stratified drop at the prefix the pass stops at, and the full paired drop."""
    net = trained(name, epochs, cache_dir="benchmarks/.cache", split="fit")
    path = Path(tempfile.mkdtemp()) / f"{name}.onnx"
    models.export_onnx(net, path, bn="keep")
    ws = analyzed_workspace(load_onnx(path), fashion_mnist("fit").subset(4096, seed=0))
    ws.held_out = fashion_mnist("val")
    assert ws.analysis is not None
    options = limit_pass.LimitPassOptions()
    scored = limit_pass._scored(ws, options)
    assert scored is not None
    held, classes, margin = scored
    order, strata = stratified_order(margin, options.seed)
    held, base = limit_pass._taken(held, order), (classes == held.labels)[order]
    family = limit_pass.BudgetFamily.of(ws)  # the limit pass's own plans
    assert family is not None
    shared, point_bytes = limit_pass._shared_original(ws, options)
    rows = []
    for budget in budgets:
        plan = limit_pass._plan(ws, family.orders, family.counts(budget), budget)
        correct = limit_pass.plan_correct(ws, plan, options, held, shared, point_bytes)
        enough = limit_pass.decided(base, TOLERANCE, CONFIDENCE, strata)
        n = next(k for k in range(limit_pass.SCORING_STEP, len(base) + limit_pass.SCORING_STEP, limit_pass.SCORING_STEP)
                 if enough(correct[:k]))
        n = min(n, len(base))
        drop, se = paired_drop(base[:n], correct[:n], strata)
        all_drop, all_se = paired_drop(base, correct)
        rows.append({"budget": budget, "scored": n, "stratified_drop_pp": 100 * drop, "stratified_se_pp": 100 * se,
                     "full_drop_pp": 100 * all_drop, "full_se_pp": 100 * all_se, "held_out": len(base)})
        log(name, rows[-1])
    return {"model": name, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.04, 0.06, 0.075, 0.09])
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/limit_strata.json"))
    args = parser.parse_args()
    out = [compare(name, args.budgets, args.epochs) for name in args.models]
    args.json.write_text(json.dumps({"models": out, "tolerance": TOLERANCE, "confidence": CONFIDENCE}, indent=1))
    log("wrote", args.json)


if __name__ == "__main__":
    main()
