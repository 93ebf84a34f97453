"""Accuracy before any fine-tuning: compensation and statistics repair, next to Torch-Pruning.

Run: python benchmarks/compensation.py [--model resnet20] [--epochs 3] [--bn keep|fold] [--samples 1024]

A reference CNN trained on Fashion-MNIST (cached) is pruned to 1.5x, 2x, 3x
MACs reduction and to graphprune's estimated maximum rate, with no
fine-tuning, by
  - graphprune hierarchical (effective) and uniform L2, each with nothing,
    repair only, compensation only, and both (calibration: --samples
    unlabelled training images; accuracy: the 10,000 test images on onnxruntime);
  - Torch-Pruning 1.6 (torch-pruning on PyPI) MagnitudePruner, L2 magnitude and
    Taylor importance, uniform per layer, the pruning ratio bisected to the same
    MACs, with nothing and with BN re-estimation on the same calibration images.
Writes a PNG plot with --plot. Needs: apt-get install -y dataset-fashion-mnist; pip install torch-pruning.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import analyzed_workspace, bisect_ratio, trained_onnx  # benchmarks/ (same folder)
from rich.console import Console
from rich.table import Table

from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.backends.torch_module import reestimate_module_batch_norm
from graphprune.execution.measure import ort_accuracy
from graphprune.execution.training import accuracy
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

console = Console(width=140)


def _graphprune(om, analysis, cal, test, plan: dict, samples: int) -> dict[str, float]:
    ws = Workspace(original=OnnxPrunable(om), model=OnnxPrunable(om), data=cal, analysis=analysis)
    ws = PlanPass(PlanOptions(**plan))(ws).workspace
    out: dict[str, float] = {}
    opts = CompensateOptions(samples=samples)
    for comp in (False, True):
        w = CompensatePass(opts)(copy.copy(ws)).workspace if comp else copy.copy(ws)
        w = RewritePass(RewriteOptions(verify=False))(w).workspace
        out["compensation" if comp else "none"] = ort_accuracy(model_bytes(w.model.om.model), test)
        r = RepairPass(opts)(copy.copy(w)).workspace
        out["comp + repair" if comp else "repair"] = ort_accuracy(model_bytes(r.model.om.model), test)
    from graphprune.analysis.cost import model_cost

    out["macs_reduction"] = model_cost(om.graph).macs / model_cost(w.model.graph).macs
    return out


def _torch_pruning(module, cal, test, macs_goal: float, importance: str) -> dict[str, float]:
    import torch_pruning as tp

    example = torch.from_numpy(cal.inputs[0][:2])
    base_macs, _ = tp.utils.count_ops_and_params(module, example)

    def pruned_at(ratio: float):
        m = copy.deepcopy(module).eval()
        imp = tp.importance.MagnitudeImportance(p=2) if importance == "l2" else tp.importance.TaylorImportance()
        ignored = [m.head[-1]] if hasattr(m, "head") else []
        pruner = tp.pruner.MagnitudePruner(m, example, importance=imp, pruning_ratio=ratio, ignored_layers=ignored)
        if importance == "taylor":
            x = torch.from_numpy(cal.inputs[0][:256])
            y = torch.from_numpy(cal.labels[:256])
            F.cross_entropy(m(x), y).backward()
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(m, example)
        return m, base_macs / macs

    hi, best = bisect_ratio(pruned_at, macs_goal, 12)
    m, red = best if best is not None else pruned_at(hi)
    out = {"macs_reduction": red, "none": accuracy(m, test)}
    reestimate_module_batch_norm(m, cal, batch_size=128)
    out["repair"] = accuracy(m, test)
    return out


def _fmt(row: dict, key: str) -> str:
    return f"{row[key]:.4f}" if key in row else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--bn", choices=("keep", "fold"), default="keep")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only draw --plot from a previous run's --json")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot(saved["rows"], saved["base"], args.plot or args.replot.with_suffix(".png"), saved["model"])
        return
    t0 = time.time()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    cal = train.subset(max(args.samples, 2048), seed=0)
    module, om = trained_onnx(args.model, args.epochs, args.bn)
    base = ort_accuracy(model_bytes(om.model), test)
    ws = analyzed_workspace(om, cal)
    limit = ws.analysis.limit.macs_reduction
    targets = [("1.5x", 1.5), ("2x", 2.0), ("3x", 3.0), (f"max {limit:.2f}x", limit)]
    rows = []
    for label, red in targets:
        for method, crit in (("hierarchical", "effective"), ("uniform", "l2")):
            plan = {"method": method, "criterion": crit, "macs": 1.0 / red, "allow_over_limit": True}
            r = _graphprune(om, ws.analysis, cal, test, plan, args.samples)
            rows.append({"target": label, "tool": "graphprune", "method": f"{method} / {crit}", **r})
            console.print(rows[-1])
        for imp in ("l2", "taylor"):
            r = _torch_pruning(module, cal, test, red, imp)
            rows.append({"target": label, "tool": "Torch-Pruning", "method": f"uniform / {imp}", **r})
            console.print(rows[-1])
    table = Table(title=f"{args.model} (BN {args.bn}) on Fashion-MNIST, base {base:.4f}: test accuracy with NO fine-tuning")
    for col in ("target", "tool", "method", "MACs red.", "none", "repair", "compensation", "comp + repair"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["target"], r["tool"], r["method"], f"{r['macs_reduction']:.2f}x", _fmt(r, "none"), _fmt(r, "repair"),
                      _fmt(r, "compensation"), _fmt(r, "comp + repair"))
    console.print(table)
    console.print(f"total time {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "bn": args.bn, "base": base, "limit": limit, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, base, args.plot, args.model)


def plot(rows: list[dict], base: float, path: Path, model: str = "") -> None:
    """Accuracy vs MACs reduction per tool and method (graphprune with comp + repair, Torch-Pruning with repair)."""
    from graphprune.report.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (tool, method), style in {("graphprune", "hierarchical / effective"): "o-", ("graphprune", "uniform / l2"): "s-",
                                  ("Torch-Pruning", "uniform / l2"): "x--", ("Torch-Pruning", "uniform / taylor"): "d--"}.items():
        sel = sorted((r for r in rows if r["tool"] == tool and r["method"] == method), key=lambda r: r["macs_reduction"])
        key = "comp + repair" if tool == "graphprune" else "repair"
        ax.plot([r["macs_reduction"] for r in sel], [r[key] for r in sel], style, label=f"{tool} {method} ({key})")
    ax.axhline(base, color="k", lw=0.8, ls=":", label="unpruned")
    ax.set_xlabel("MACs reduction")
    ax.set_ylabel("test accuracy, no fine-tuning")
    ax.set_title(f"{model} on Fashion-MNIST", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

if __name__ == "__main__":
    main()
