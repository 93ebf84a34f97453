"""Hierarchical pruning vs baselines on a Fashion-MNIST-trained reference CNN, one code path, same budget.

Run: python benchmarks/methods.py [--model resnet20] [--epochs 3] [--finetune-epochs 1] [--seeds 0]

Every configuration goes through the same passes (analyze -> plan -> rewrite
-> finetune) with the same fine-tuning budget and seed; accuracy is measured
on the full Fashion-MNIST test set with onnxruntime, before and after
fine-tuning. Part 1: allocation methods at 2x and 3x MACs reduction
(hierarchical, uniform L1, global Taylor). Part 2: level-2 selection rules
inside the hierarchical allocation at 2x.
Needs: apt-get install -y dataset-fashion-mnist.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from graphprune import models
from graphprune.analysis.cost import model_cost
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.execution.measure import ort_accuracy
from graphprune.execution.training import FitOptions
from graphprune.frontends.onnx import load_onnx
from graphprune.ir.onnx import model_bytes
from graphprune.models.fashion import fashion_mnist, trained
from graphprune.pipeline.config import parse_pipeline, run_passes
from graphprune.pipeline.passes import FineTunePass, PlanPass, RewriteOptions, RewritePass, Workspace
from graphprune.planning.options import PlanOptions

console = Console(width=130)


def _run(om, train, test, analysis, plan: dict, finetune: dict) -> dict:
    """Plan and rewrite with the analysis already made, measure, fine-tune, measure."""
    ws = Workspace(original=OnnxPrunable(om), model=OnnxPrunable(om), data=train, analysis=analysis)
    ws = RewritePass(RewriteOptions(verify=False))(PlanPass(PlanOptions(**plan))(ws).workspace).workspace
    before = ort_accuracy(model_bytes(ws.model.om.model), test)
    ws = FineTunePass(FitOptions(**finetune))(ws).workspace
    after = ort_accuracy(model_bytes(ws.model.om.model), test)
    c0, c1 = model_cost(om.graph), model_cost(ws.model.graph)
    return {"macs_reduction": c0.macs / c1.macs, "params_reduction": c0.params / c1.params,
            "acc_before_finetune": before, "acc_after_finetune": after}


def _mean(runs: list[dict], key: str) -> float:
    return statistics.mean(x[key] for x in runs)


def _spread(runs: list[dict], key: str) -> str:
    """`` ±stdev`` over the seeds, or nothing for a single run."""
    return f" ±{statistics.stdev(x[key] for x in runs):.4f}" if len(runs) > 1 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    t0 = time.time()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    module = trained(args.model, args.epochs, cache_dir="benchmarks/.cache")
    path = Path(tempfile.mkdtemp()) / f"{args.model}.onnx"
    models.export_onnx(module, path, bn="keep")
    om = load_onnx(path)
    base = ort_accuracy(model_bytes(om.model), test)
    ws = run_passes(parse_pipeline({"pass": [{"name": "analyze", "samples": 2048, "loss": "labels"}]}),
                    Workspace(original=OnnxPrunable(om), model=OnnxPrunable(om), data=train))
    analysis = ws.analysis
    console.print(f"{args.model}: base accuracy {base:.4f}; estimated maximum MACs reduction {analysis.limit.macs_reduction:.2f}x (eps 0.01)")
    configs = []
    for macs in (0.5, 1 / 3):
        configs += [
            ("allocation", f"{1 / macs:.0f}x", "hierarchical / effective", {"method": "hierarchical", "criterion": "effective", "macs": macs, "allow_over_limit": True}),
            ("allocation", f"{1 / macs:.0f}x", "uniform / l1", {"method": "uniform", "criterion": "l1", "macs": macs}),
            ("allocation", f"{1 / macs:.0f}x", "global / taylor", {"method": "global", "criterion": "taylor", "macs": macs}),
        ]
    for crit in ("cholesky", "taylor", "l2", "random"):
        configs.append(("level 2", "2x", f"hierarchical / {crit}", {"method": "hierarchical", "criterion": crit, "macs": 0.5, "allow_over_limit": True}))
    rows = []
    for part, target, label, plan in configs:
        runs = []
        for seed in args.seeds:
            finetune = {"epochs": args.finetune_epochs, "lr": 0.01, "seed": seed}
            runs.append(_run(om, train, test, analysis, {**plan, "seed": seed}, finetune))
            console.print(f"{part} {target} {label} seed {seed}: {runs[-1]}")
        rows.append({"part": part, "target": target, "method": label, "runs": runs})
    table = Table(title=f"{args.model} on Fashion-MNIST (base {base:.4f}); fine-tune {args.finetune_epochs:g} epoch, seeds {args.seeds}")
    for col in ("part", "target", "method / criterion", "MACs red.", "params red.", "acc before FT", "acc after FT", "drop after FT"):
        table.add_column(col, justify="right")
    for r in rows:
        runs = r["runs"]
        table.add_row(r["part"], r["target"], r["method"], f"{_mean(runs, 'macs_reduction'):.2f}x", f"{_mean(runs, 'params_reduction'):.2f}x",
                      f"{_mean(runs, 'acc_before_finetune'):.4f}{_spread(runs, 'acc_before_finetune')}",
                      f"{_mean(runs, 'acc_after_finetune'):.4f}{_spread(runs, 'acc_after_finetune')}",
                      f"{100 * (_mean(runs, 'acc_after_finetune') - base):+.2f} pp")
    console.print(table)
    console.print(f"total time {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "base": base, "rows": rows,
                                         "max_macs_reduction": analysis.limit.macs_reduction}, indent=1))


if __name__ == "__main__":
    main()
