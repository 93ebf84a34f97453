"""Does the estimated limit mean anything? Calibration of the effective filter analysis.

Run: python benchmarks/calibration.py [--model resnet20] [--epochs 3] [--samples 2048] [--test 3000]

1. Train a reference CNN on Fashion-MNIST (cached), export to ONNX (BN kept).
2. Analyse it (labels, --samples training images) -> r_g per group.
3. Each group alone, no fine-tuning: keep r_g channels (greedy second-order
   selection), then r_g / 2, then r_g / 4; test accuracy on --test images.
   Pruning is done with channel gates at 0, which equals the rewritten model
   (tests/test_gates.py checks this on every reference model).
4. Whole network at the estimated maximum rate for several eps, and under
   one network-wide predicted-loss budget: MACs reduction and accuracy
   before fine-tuning.
5. The default eps: the real ONNX rewrite, accuracy on onnxruntime, then a brief
   fine-tune (--finetune-epochs, labels) through the interpreter; full test set.
Needs: apt-get install -y dataset-fashion-mnist.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from graphprune import models
from graphprune.analysis.effective import Analysis, AnalysisOptions, analyze
from graphprune.analysis.gates import GatePlan, gate_taps, keep_gates, plan_gates
from graphprune.analysis.spectrum import eigenvalues, energy_rank
from graphprune.backends.onnx import apply_kept
from graphprune.coupling.groups import build_groups
from graphprune.execution.interpreter import GraphInterpreter
from graphprune.execution.measure import ort_accuracy
from graphprune.execution.training import FitOptions, accuracy, fit
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import OnnxModel, load_onnx, prepare
from graphprune.io import save_onnx
from graphprune.ir.plan import kept_elements, plan_from_keep
from graphprune.models.fashion import fashion_mnist, trained
from graphprune.planning.selection import greedy_drop_order

console = Console(width=130)


def _gated_accuracy(interp: GraphInterpreter, gates: GatePlan, keep: dict[int, np.ndarray], sizes: dict[int, int], data: Calibration) -> float:
    def run(x: torch.Tensor) -> torch.Tensor:
        return interp(x, edge_taps=gate_taps(gates, keep_gates(keep, sizes, len(x))))[0]

    return accuracy(run, data)


def _keep_sets(analysis: Analysis, counts: dict[int, int]) -> dict[int, np.ndarray]:
    return {gid: greedy_drop_order(analysis.fisher[gid].f).keep(k) for gid, k in counts.items()}


def _ranks(analysis: Analysis, eps: float) -> dict[int, int]:
    out = {}
    for g in analysis.groups:
        r = energy_rank(eigenvalues(analysis.fisher[g.group].f), eps)
        out[g.group] = max(1, min(r, g.channels - g.singular.total))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--test", type=int, default=3000)
    parser.add_argument("--eps", type=float, default=1e-2)
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    t0 = time.time()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    rng = np.random.default_rng(0)
    sub = np.sort(rng.permutation(len(test))[: args.test])
    test_sub = Calibration((test.inputs[0][sub],), test.labels[sub], "test-subset")
    cal_idx = np.sort(rng.permutation(len(train))[: args.samples])
    cal = Calibration((train.inputs[0][cal_idx],), train.labels[cal_idx], "train-subset")
    with console.status(f"training {args.model} on Fashion-MNIST ({args.epochs:g} epochs, cached)..."):
        module = trained(args.model, args.epochs, cache_dir="benchmarks/.cache")
    base_full = accuracy(module, test)
    tmp = Path(tempfile.mkdtemp())
    path = tmp / f"{args.model}.onnx"
    models.export_onnx(module, path, bn="keep")
    om = load_onnx(path)
    coupling = build_groups(om.graph)
    interp = GraphInterpreter(om.graph).eval()
    base = accuracy(lambda x: interp(x)[0], test_sub)
    with console.status("analysing..."):
        analysis = analyze(om.graph, coupling, cal, AnalysisOptions(eps=args.eps, loss="labels"), model=interp)
    gates = plan_gates(coupling, om.graph)
    sizes = {g.group: g.channels for g in analysis.groups}
    results: dict = {"model": args.model, "epochs": args.epochs, "base_accuracy_test10k": base_full, "base_accuracy_subset": base, "groups": [], "network": []}

    table = Table(title=f"{args.model}: one group pruned alone, no fine-tuning (base {base:.3f} on {args.test} test images)")
    for col in ("group", "anchor", "C", "r_g", "acc @ r_g", "acc @ r_g/2", "acc @ r_g/4"):
        table.add_column(col, justify="right")
    for g in analysis.groups:
        accs = []
        for div in (1, 2, 4):
            k = max(1, g.effective // div)
            accs.append(_gated_accuracy(interp, gates, _keep_sets(analysis, {g.group: k}), sizes, test_sub))
        table.add_row(str(g.group), g.anchor[:30], str(g.channels), str(g.effective), *(f"{a:.3f}" for a in accs))
        results["groups"].append({"group": g.group, "anchor": g.anchor, "channels": g.channels, "effective": g.effective, "acc": accs})
    console.print(table)

    net = Table(title="whole network at the estimated maximum rate (every group keeps r_g), no fine-tuning")
    for col in ("eps", "MACs reduction", "params reduction", "accuracy"):
        net.add_column(col, justify="right")
    from graphprune.analysis.cost import cost_with_keep, model_cost

    original = model_cost(om.graph)
    for eps in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
        counts = _ranks(analysis, eps)
        c = cost_with_keep(om.graph, coupling, counts)
        acc = _gated_accuracy(interp, gates, _keep_sets(analysis, counts), sizes, test_sub)
        net.add_row(f"{eps:g}", f"{original.macs / c.macs:.2f}x", f"{original.params / c.params:.2f}x", f"{acc:.3f}")
        results["network"].append({"eps": eps, "macs_reduction": original.macs / c.macs, "params_reduction": original.params / c.params, "accuracy": acc})
    console.print(net)

    from graphprune.analysis.effective import summarize
    from graphprune.analysis.fisher import FisherResult

    bud = Table(title="whole network under one predicted-loss budget (analysis --budget), no fine-tuning")
    for col in ("budget", "MACs reduction", "params reduction", "accuracy"):
        bud.add_column(col, justify="right")
    fisher = FisherResult(analysis.fisher, analysis.samples, analysis.skipped, "labels")
    results["budget"] = []
    for budget in (0.005, 0.01, 0.02, 0.05):
        b = summarize(fisher, om.graph, coupling, AnalysisOptions(loss="labels", budget=budget))
        counts_b = {g.group: max(1, g.effective) for g in b.groups}
        acc = _gated_accuracy(interp, gates, _keep_sets(analysis, counts_b), sizes, test_sub)
        bud.add_row(f"{budget:g}", f"{b.limit.macs_reduction:.2f}x", f"{b.limit.params_reduction:.2f}x", f"{acc:.3f}")
        results["budget"].append({"budget": budget, "macs_reduction": b.limit.macs_reduction, "accuracy": acc})
    console.print(bud)

    counts = _ranks(analysis, args.eps)
    plan = plan_from_keep(coupling, _keep_sets(analysis, counts), {"method": "effective", "eps": args.eps})
    pruned_path = tmp / "pruned.onnx"
    save_onnx(apply_kept(om, kept_elements(plan, coupling, om.graph)), pruned_path)
    acc_before = ort_accuracy(str(pruned_path), test)
    pruned_om: OnnxModel = prepare(load_onnx(pruned_path).model)
    student = GraphInterpreter(pruned_om.graph)
    with console.status(f"fine-tuning the pruned ONNX model through the interpreter ({args.finetune_epochs:g} epoch)..."):
        fit(student, train, FitOptions(epochs=args.finetune_epochs, lr=0.01, seed=0))
    acc_after = accuracy(lambda x: student(x)[0], test)
    lim = analysis.limit
    summary = Table(title=f"whole network at eps={args.eps:g}: real ONNX rewrite, full test set (10,000 images)")
    for col in ("model", "MACs reduction", "params reduction", "accuracy (onnxruntime)", "after fine-tune"):
        summary.add_column(col, justify="right")
    summary.add_row("unpruned", "1.00x", "1.00x", f"{base_full:.4f}", "-")
    summary.add_row("pruned", f"{lim.macs_reduction:.2f}x", f"{lim.params_reduction:.2f}x", f"{acc_before:.4f}", f"{acc_after:.4f}")
    console.print(summary)
    results["final"] = {"eps": args.eps, "macs_reduction": lim.macs_reduction, "params_reduction": lim.params_reduction,
                        "accuracy_before_finetune": acc_before, "accuracy_after_finetune": acc_after,
                        "finetune_epochs": args.finetune_epochs}
    console.print(f"total time {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
