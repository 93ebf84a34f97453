"""Accuracy at equal measured latency: graphprune latency-aware against Torch-Pruning's criteria, after the same fine-tuning.

Run: nice python benchmarks/latency_accuracy.py [--models resnet20] [--latency 0.6] [--batch 32] [--finetune-epochs 0.25]
     [--runs 20] [--threads 2] [--json benchmarks/latency_accuracy.json]

Per model (trained on Fashion-MNIST for --epochs, cached in benchmarks/.cache):
1. graphprune, the default path with a latency target: analysis (2,048 labelled training images), the profile
   pass at --batch and --threads, `--latency X --allow-over-limit` planned against the latency model (tables from one
   channel up) and measured once (repaired when slower), then compensation, rewrite, BN re-estimation and
   --finetune-epochs of fine-tuning (lr 0.01).
2. Torch-Pruning 1.6 with each criterion of benchmarks/compare_torch_pruning.py (L2 uniform and global, group-norm,
   Taylor; the classifier ignored): its pruning ratio is scanned upwards in --scan-step steps until its exported
   ONNX (BN folded) runs, at --batch, no slower than graphprune's pruned model (the original, graphprune's model and
   the candidate timed in one interleaved run at each step), then fine-tuned the same way in torch.
   A scan, because Torch-Pruning's latency is not monotone in its ratio.
3. Every model, the original included, measured once more in one interleaved run at batch 1 and --batch (medians of
   --runs rounds), and its accuracy on the 10,000 test images.
Goal (issue 15): at equal measured latency, graphprune's accuracy is at least the best peer's + 0.5 pp.
Needs: apt-get install -y dataset-fashion-mnist; pip install torch==2.13.0 "torch-pruning==1.6.*".
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import load_onnx_bytes, log  # benchmarks/ (same folder)
from compare_torch_pruning import TP_METHODS, _onnx_of, _tp_prune  # benchmarks/ (same folder)
from latency import interleaved, speed
from rich.console import Console
from rich.table import Table
from torch import nn

from graphprune import models
from graphprune.analysis.cost import model_cost
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.execution.measure import ort_accuracy
from graphprune.execution.training import FitOptions, fit
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx
from graphprune.ir.onnx import model_bytes
from graphprune.models.fashion import fashion_mnist, trained
from graphprune.pipeline.passes import (
    AnalyzePass,
    AnalyzePassOptions,
    CompensateOptions,
    CompensatePass,
    FineTunePass,
    PlanPass,
    ProfileOptions,
    ProfilePass,
    RepairPass,
    RewriteOptions,
    RewritePass,
    Workspace,
)
from graphprune.planning.options import PlanOptions

console = Console(width=160)


def macs_of(blob: bytes) -> int:
    return model_cost(load_onnx_bytes(blob).graph).macs


def against(blob: bytes, reference: bytes, original: bytes, batch: int, runs: int, threads: int) -> tuple[float, float]:
    """Measured latency of ``blob`` over ``reference``'s and over the original's at ``batch`` (one interleaved run)."""
    ms = interleaved({"original": original, "reference": reference, "variant": blob}, models.INPUT_SHAPE, batch, runs, threads)
    return ms["variant"] / ms["reference"], ms["variant"] / ms["original"]


def graphprune_variant(module: nn.Module, cal: Calibration, train: Calibration, args: argparse.Namespace) -> tuple[bytes, dict[str, Any]]:
    """The default path with ``--latency``: analyse, profile, plan to the latency, recover, fine-tune."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        models.export_onnx(module, path, bn="keep")
        om = OnnxPrunable(load_onnx(path))
    ws = Workspace(original=om, model=om, data=cal)
    t = time.perf_counter()
    ws = AnalyzePass(AnalyzePassOptions(samples=2048, loss="labels"))(ws).workspace
    ws = ProfilePass(ProfileOptions(batch=args.batch, threads=args.threads, runs=5, model_runs=args.runs, below_floors=True))(ws).workspace
    ws = PlanPass(PlanOptions(latency=args.latency, latency_runs=args.runs, allow_over_limit=True))(ws).workspace
    recovery = CompensateOptions(samples=1024)
    ws = CompensatePass(recovery)(ws).workspace
    ws = RewritePass(RewriteOptions(verify=True))(ws).workspace
    ws = RepairPass(recovery)(ws).workspace
    before = ws.model.accuracy(args.test)
    ws.data = train
    ws = FineTunePass(FitOptions(epochs=args.finetune_epochs, lr=0.01, seed=0))(ws).workspace
    assert ws.plan is not None and isinstance(ws.model, OnnxPrunable)
    meta = {k: ws.plan.meta.get(k) for k in ("predicted_ms", "measured_ms", "measured_original_ms", "measured_latency", "repaired")}
    return model_bytes(ws.model.om.model), {"seconds": time.perf_counter() - t, "accuracy_before_finetune": before, **meta}


def tp_at_latency(module: nn.Module, kind: str, global_: bool, reference: bytes, original: bytes, cal: Calibration,
                  args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """Torch-Pruning at the smallest ratio on a grid whose model runs no slower than ``reference`` (graphprune's).

    An ascending scan, not a bisection: Torch-Pruning's latency is not monotone in its ratio (counts that cross
    onnxruntime's 8-channel blocking run slower than larger ones), so a bisection can settle far below the goal.
    Each step times the original, graphprune's model and the candidate in one interleaved run, so drift between
    steps does not move the goal. The scan stops at the first ratio that meets it (every step is logged).
    """
    example = torch.from_numpy(cal.inputs[0][:2])
    tried: list[dict[str, float]] = []
    ratio = args.scan_step
    while ratio < 0.95 + 1e-9:
        try:
            m = _tp_prune(module, ratio, kind, global_, example, cal)
            vs_ref, vs_orig = against(_onnx_of(m), reference, original, args.batch, args.scan_runs, args.threads)
        except Exception as exc:  # noqa: BLE001 - a ratio that empties a layer ends the scan
            log(kind, f"ratio {ratio:.3f} failed: {exc}")
            break
        tried.append({"ratio": round(ratio, 4), "vs_graphprune": vs_ref, "latency_ratio": vs_orig})
        log(kind, "global" if global_ else "uniform", f"ratio {ratio:.3f}: {vs_ref:.3f} of graphprune's latency, {vs_orig:.3f} of the original's")
        if vs_ref <= 1.0:
            return m, {"ratio": ratio, "scan": tried}
        ratio += args.scan_step
    best = min(tried, key=lambda t: t["vs_graphprune"])  # never reached: the fastest ratio tried
    return _tp_prune(module, best["ratio"], kind, global_, example, cal), {"ratio": best["ratio"], "scan": tried, "goal_missed": True}


def bench_model(name: str, args: argparse.Namespace, train: Calibration) -> dict[str, Any]:
    module = trained(name, args.epochs, cache_dir="benchmarks/.cache")
    cal = train.subset(4096, seed=0)
    original = _onnx_of(module)
    gp_blob, gp_meta = graphprune_variant(module, cal, train, args)
    log(name, "graphprune", gp_meta)
    blobs: dict[str, bytes] = {"original": original, "graphprune latency-aware": gp_blob}
    info: dict[str, dict[str, Any]] = {"graphprune latency-aware": gp_meta}
    for label, (kind, global_) in TP_METHODS.items():
        t = time.perf_counter()
        torch.manual_seed(0)
        m, meta = tp_at_latency(module, kind, global_, gp_blob, original, cal, args)
        before = ort_accuracy(_onnx_of(m.eval()), args.test)
        fit(m, train, FitOptions(epochs=args.finetune_epochs, lr=0.01, seed=0))
        blobs[f"Torch-Pruning {label}"] = _onnx_of(m.eval())
        info[f"Torch-Pruning {label}"] = {**meta, "accuracy_before_finetune": before, "seconds": time.perf_counter() - t}
        log(name, label, info[f"Torch-Pruning {label}"])
    ms = {b: interleaved(blobs, models.INPUT_SHAPE, b, args.runs, args.threads) for b in sorted({1, args.batch})}
    base_macs = macs_of(original)
    rows = []
    for label, blob in blobs.items():
        rows.append({"variant": label, "accuracy": ort_accuracy(blob, args.test), "macs_reduction": base_macs / macs_of(blob),
                     **{f"ms_batch_{b}": v[label] for b, v in ms.items()},
                     **{f"speedup_batch_{b}": v["original"] / v[label] for b, v in ms.items()}, **info.get(label, {})})
    return {"model": name, "rows": rows}


def table(result: dict[str, Any], batch: int) -> Table:
    t = Table(title=f"{result['model']}: accuracy at equal measured latency (batch {batch}), after the same fine-tuning")
    for c in ("variant", "MACs red.", "batch 1", f"batch {batch}", "accuracy before FT", "accuracy"):
        t.add_column(c, justify="right")
    for r in result["rows"]:
        before = r.get("accuracy_before_finetune")
        ref = r["variant"] == "original"  # the reference itself: its own speed is no change
        t.add_row(r["variant"], f"{r['macs_reduction']:.2f}x", *("reference" if ref else speed(r[f"speedup_batch_{b}"]) for b in (1, batch)),
                  "-" if before is None else f"{before:.4f}", f"{r['accuracy']:.4f}")
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20"])
    parser.add_argument("--epochs", type=float, default=3.0, help="training epochs of the reference models (cached)")
    parser.add_argument("--latency", type=float, default=0.6, help="graphprune's latency target (fraction of the original)")
    parser.add_argument("--batch", type=int, default=32, help="batch of the latency target and of the matching")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=float, default=0.25)
    parser.add_argument("--runs", type=int, default=20, help="interleaved rounds of the final measurement")
    parser.add_argument("--scan-step", type=float, default=0.025, help="step of the ascending scan of Torch-Pruning's ratio")
    parser.add_argument("--scan-runs", type=int, default=10, help="interleaved rounds per scanned ratio")
    parser.add_argument("--test-samples", type=int, default=10000)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/latency_accuracy.json"))
    args = parser.parse_args()
    train = fashion_mnist("train")
    args.test = fashion_mnist("test").subset(args.test_samples, seed=1)
    results = []
    for name in args.models:
        results.append(bench_model(name, args, train))
        console.print(table(results[-1], args.batch))
        settings = {k: v for k, v in vars(args).items() if k != "test"} | {"json": str(args.json)}
        args.json.write_text(json.dumps({"settings": settings, "machine": platform.processor() or platform.machine(),
                                         "results": results}, indent=1, default=str))
    log("wrote", args.json)


if __name__ == "__main__":
    main()
