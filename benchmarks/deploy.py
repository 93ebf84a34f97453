"""Prune, then quantize (the deploy preset), and pruning an int8 QDQ model: graphprune against onnxsim 0.8.1.

Run: nice -n 10 python benchmarks/deploy.py [--models resnet20 mobilenetv2] [--epochs 1] [--json benchmarks/deploy.json]

Part 1, the four columns. A reference CNN trained on Fashion-MNIST (cached; --calibration val: on the 55,000 ``fit``
images, its limit scored on the 5,000 ``val`` images it never saw, as ``--held-out``), exported with BatchNorm folded
(the usual deployed form), goes through passes/deploy.toml (analyze -> limit -> profile -> hierarchical plan -> compensate -> rewrite ->
repair -> fine-tune -> quantize -> validate) with --macs (or --latency, a fraction of the int8 original at batch 32); the validate
pass measures fp32 original, fp32 pruned, int8 original and int8 pruned in one
process (accuracy on the test set, size of the constants, onnxruntime latency
at batch 1 and 32).

Part 2, QDQ input. The int8 original (onnxruntime quantize_static, QDQ,
per-channel, the same calibration) is pruned without retraining by
onnxsim.apply_structured_pruning_qdq (L2 norm, at --sparsity) and by graphprune
at the MACs onnxsim reached, or at --macs when onnxsim removed nothing (global L2
magnitude; hierarchical by MACs: effective filter analysis of the QDQ model itself; hierarchical latency-aware:
the same plus latency tables of the QDQ model at batch 32 and the plan measured against the original, as
`prune --data` does; "+ int8 refit": the same plans, then the compensate pass (sequential least squares, the
int8 weights and int32 biases refitted through their DequantizeLinear and requantized) and the repair pass
(bias correction), on --samples calibration images, still no retraining). Each output is checked (onnx.checker,
an onnxruntime run with the original's signature) and measured alike.

Latency: besides the validate pass's own figures, every model of a part (the four columns; the QDQ rows) is timed
again in one interleaved run (each of --runs rounds runs every model once, medians; batch 1 and 32), which is what
the tables show: load that changes during the run then affects every model alike.
Needs: apt-get install -y dataset-fashion-mnist; pip install onnxsim==0.8.1.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from graphprune import models
from graphprune.analysis.cost import model_cost, param_bytes
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.backends.quantize import QuantizeOptions, quantize_onnx
from graphprune.frontends.onnx import load_onnx
from graphprune.ir.onnx import model_bytes, model_session
from graphprune.models.fashion import fashion_mnist, trained
from graphprune.pipeline.config import load_pipeline, run_passes
from graphprune.pipeline.passes import Workspace, measure
from graphprune.report.prune import DEPLOY_COLUMNS, speed_change

console = Console(width=150)
BATCHES = (1, 32)
log = logging.getLogger("deploy")


def _deploy(om, train, test, held, target: list[str], finetune_epochs: float, runs: int, samples: int) -> dict[str, Any]:
    """passes/deploy.toml with the ``target`` overrides (``["plan.macs=0.5"]``, ``["plan.latency=0.8"]``; none: the preset's
    default, the calibrated limit) on one model, its limit scored on ``held`` (``--held-out``; None: the calibration
    images the analysis and compensation leave): the four columns and the quantization check."""
    overrides = [f"analyze.samples={samples}", f"compensate.samples={samples}", f"repair.samples={samples}", *target, f"finetune.epochs={finetune_epochs}", f"validate.latency_runs={runs}", "report.json=false",
                 "report.html=false", "report.table=false"]
    pipeline = load_pipeline("deploy", overrides)
    ws = Workspace(original=OnnxPrunable(om), model=OnnxPrunable(om), data=train, eval_data=test, held_out=held)
    t = time.perf_counter()
    ws = run_passes(pipeline, ws)
    v, q = ws.validation, ws.quantized
    assert v is not None and q is not None and v.fp32_pruned is not None and v.int8_original is not None
    figures = dict(zip(DEPLOY_COLUMNS, (v.before, v.fp32_pruned, v.int8_original, v.after)))
    blobs = {name: _blob(m) for name, m in zip(DEPLOY_COLUMNS, (ws.original, q.fp32_pruned, q.int8_original, ws.model))}
    out = {name: {"accuracy": f.accuracy, "size_bytes": f.size_bytes, "macs": f.macs, "params": f.params,
                  "latency_ms_batch_1": f.latency_ms, f"latency_ms_batch_{v.batch}": f.latency_batch_ms}
           for name, f in figures.items()}
    check = q.check
    assert ws.plan is not None
    plan_meta = {k: ws.plan.meta.get(k) for k in ("objective", "predicted_ms", "original_predicted_ms", "measured_at", "repaired",
                                                   "measured_slower", "fast_counts", "faster_within", "over_limit", "target_kept")}
    limit = None if ws.limit is None else {"macs_reduction": ws.limit.macs_reduction, "quality": ws.limit.quality,
                                           "base_quality": ws.limit.base_quality, "holdout": ws.limit.holdout}
    return {"limit": limit, "finetune": ws.finetune, "columns": out, "blobs": blobs, "batch": v.batch, "seconds": time.perf_counter() - t, "exact_max_abs_error": ws.exact_max_abs_error,
            "plan_meta": plan_meta,
            "check": None if check is None else {"max_steps": check.max_steps, "fused_steps": check.fused_steps,
                                                  "tolerance_steps": check.tolerance_steps, "samples": check.samples}}


def _blob(model: Any) -> bytes:
    assert isinstance(model, OnnxPrunable)
    return model_bytes(model.om.model)


def _interleaved(blobs: dict[str, bytes], runs: int) -> dict[str, dict[int, float]]:
    """Median ms of every model at each of BATCHES, all timed in one interleaved run (benchmarks/latency.py)."""
    from latency import interleaved  # benchmarks/ (same folder)

    by_batch = {b: interleaved(blobs, models.INPUT_SHAPE, b, runs, 2) for b in BATCHES}
    return {name: {b: by_batch[b][name] for b in BATCHES} for name in blobs}


def _valid(model: onnx.ModelProto, original: OnnxPrunable) -> dict[str, Any]:
    """onnx.checker (full check) and an onnxruntime run with the original's signature (graphprune's own run check)."""
    out: dict[str, Any] = {"checker": True, "runs": True, "why": ""}
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker raises several types
        out.update(checker=False, why=f"onnx.checker: {str(exc).splitlines()[0][:160]}")
    try:  # an onnxruntime run on the original's inputs, outputs of the original's shapes
        from graphprune.execution.sessions import make_session, sample_inputs

        feeds = sample_inputs(original.graph, batch=2)
        got = make_session(model.SerializeToString()).run(None, feeds)
        with model_session(original.om.model) as ref:
            want = ref.run(None, feeds)
        if [np.shape(g) for g in got] != [np.shape(w) for w in want]:
            raise ValueError(f"output shapes {[np.shape(g) for g in got]} differ from {[np.shape(w) for w in want]}")
    except Exception as exc:  # noqa: BLE001 - any failure to run is the finding
        out.update(runs=False, why=(out["why"] + "; " if out["why"] else "") + f"onnxruntime: {str(exc).splitlines()[0][:160]}")
    out["valid"] = out["checker"] and out["runs"]
    out["file_bytes"] = len(model.SerializeToString())
    return out


def _figures(model: OnnxPrunable, test, runs: int) -> dict[str, Any]:
    f = measure([model], test, runs, 32)[0]
    return {"accuracy": f.accuracy, "macs": f.macs, "size_bytes": f.size_bytes, "latency_ms_batch_1": f.latency_ms,
            "latency_ms_batch_32": f.latency_batch_ms}


def _qdq(om, train, test, sparsity: float, runs: int, samples: int, macs: float) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The same int8 QDQ model pruned by onnxsim and by graphprune at the MACs onnxsim reached (``macs`` when it removed
    nothing); the rows and each valid model's bytes."""
    import onnx_ir as ir
    import onnxsim

    int8 = OnnxPrunable(quantize_onnx(om, train.subset(256), QuantizeOptions()))
    base = model_cost(int8.graph).macs
    rows: dict[str, Any] = {"int8 original": {**_figures(int8, test, runs), **_valid(ir.to_proto(int8.om.model), int8)}}
    blobs = {"int8 original": _blob(int8)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8.onnx"
        int8.save(path, int8)
        t, seconds = time.perf_counter(), 0.0
        try:
            pruned = onnxsim.apply_structured_pruning_qdq(str(path), sparsity=sparsity, importance_norm="l2")
            seconds = time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001 - report whatever onnxsim raises
            rows["onnxsim"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            pruned = None
    if pruned is not None:
        _onnxsim_row(rows, blobs, pruned, int8, test, runs, base, seconds)
    reached = rows.get("onnxsim", {}).get("macs_ratio", 1.0)
    target = reached if reached < 0.999 else macs
    hierarchical = {"method": "hierarchical", "criterion": "effective"}
    for label, plan, profile, recover in (("graphprune global L2", {"method": "global", "criterion": "l2"}, False, False),
                                          ("graphprune hierarchical (by MACs)", hierarchical, False, False),
                                          ("graphprune hierarchical, latency-aware", hierarchical, True, False),
                                          ("graphprune hierarchical + int8 refit", hierarchical, False, True),
                                          ("graphprune latency-aware + int8 refit", hierarchical, True, True)):
        row, blob = _graphprune_qdq(int8, train, test, plan, target, runs, samples, base, profile, recover)
        rows[label] = row
        if blob is not None:
            blobs[label] = blob
    return rows, blobs


def _onnxsim_row(rows: dict[str, Any], blobs: dict[str, bytes], pruned: onnx.ModelProto, int8: OnnxPrunable, test: Any,
                 runs: int, base: int, seconds: float) -> None:
    import onnx_ir as ir

    from graphprune.frontends.onnx import prepare

    check = _valid(pruned, int8)
    sim = OnnxPrunable(prepare(ir.from_proto(pruned)))
    rows["onnxsim"] = {**(_figures(sim, test, runs) if check["runs"] else {"macs": model_cost(sim.graph).macs}), **check,
                       "seconds": seconds}
    rows["onnxsim"]["macs_ratio"] = rows["onnxsim"]["macs"] / base
    if check["runs"]:
        blobs["onnxsim"] = pruned.SerializeToString()


def _graphprune_qdq(int8: OnnxPrunable, train: Any, test: Any, plan: dict[str, str], target: float, runs: int, samples: int,
                    base: int, profile: bool, recover: bool) -> tuple[dict[str, Any], bytes | None]:
    import onnx_ir as ir

    from graphprune.pipeline.passes import (
        AnalyzePass,
        AnalyzePassOptions,
        CompensateOptions,
        CompensatePass,
        PlanPass,
        ProfileOptions,
        ProfilePass,
        RepairPass,
        RewriteOptions,
        RewritePass,
    )
    from graphprune.planning.options import PlanOptions

    t = time.perf_counter()
    ws = Workspace(original=int8, model=int8, data=train)
    try:
        if plan["method"] == "hierarchical":
            ws = AnalyzePass(AnalyzePassOptions(samples=samples))(ws).workspace
        if profile:  # the default path with data: latency tables of the QDQ model itself, the plan measured
            ws = ProfilePass(ProfileOptions(batch=32, threads=2, runs=5, below_floors=True))(ws).workspace
        ws = PlanPass(PlanOptions(**plan, macs=target, allow_over_limit=True))(ws).workspace  # type: ignore[arg-type]
        recovery = CompensateOptions(samples=samples)
        if recover:  # sequential refit of the int8 weights and biases through their DequantizeLinear
            ws = CompensatePass(recovery)(ws).workspace
        ws = RewritePass(RewriteOptions(verify=True))(ws).workspace
        if recover:  # bias correction (BN is folded)
            ws = RepairPass(recovery)(ws).workspace
    except Exception as exc:  # noqa: BLE001 - a failed configuration is a result
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}, None
    seconds = time.perf_counter() - t
    model = ws.model
    assert isinstance(model, OnnxPrunable)
    row = {**_figures(model, test, runs), **_valid(ir.to_proto(model.om.model), int8), "seconds": seconds,
           "macs_ratio": model_cost(model.graph).macs / base, "exact_max_abs_error": ws.exact_max_abs_error}
    return row, _blob(model)


def _print(name: str, deploy: dict[str, Any], qdq: dict[str, Any]) -> None:
    if deploy:
        _print_columns(name, deploy)
    if qdq:
        _print_qdq(name, qdq)


def _print_columns(name: str, deploy: dict[str, Any]) -> None:
    cols = deploy["columns"]
    table = Table(title=f"{name}: fp32 and int8, original and pruned (deploy preset; latency interleaved, medians)")
    table.add_column("")
    for c in DEPLOY_COLUMNS:
        table.add_column(c, justify="right")
    table.add_row("accuracy", *(f"{cols[c]['accuracy']:.4f}" for c in DEPLOY_COLUMNS))
    table.add_row("size (kB)", *(f"{cols[c]['size_bytes'] / 1e3:.1f}" for c in DEPLOY_COLUMNS))
    table.add_row("MACs (M)", *(f"{cols[c]['macs'] / 1e6:.2f}" for c in DEPLOY_COLUMNS))
    for b in BATCHES:
        table.add_row(f"latency b{b} (ms)", *(f"{cols[c]['interleaved_ms'][b]:.3f}" for c in DEPLOY_COLUMNS))
    console.print(table)
    if deploy.get("limit"):
        lim = deploy["limit"]
        console.print(f"calibrated limit: {lim['macs_reduction']:.2f}x fewer MACs ({lim['quality']:.4f} against "
                      f"{lim['base_quality']:.4f} on {lim['holdout']} held-out images)")
    i8, i8p = cols["int8 original"]["interleaved_ms"], cols["int8 pruned"]["interleaved_ms"]
    console.print("int8 pruned vs int8 original: " + ", ".join(f"{speed_change(i8[b], i8p[b])} at batch {b}" for b in BATCHES)
                  + f"; check {deploy['check']}")


def _print_qdq(name: str, qdq: dict[str, Any]) -> None:
    t2 = Table(title=f"{name}: pruning the int8 QDQ model, no retraining (latency interleaved, medians)")
    for c in ("", "checker / runs", "MACs ratio", "accuracy", "file (kB)", *(f"latency b{b} (ms)" for b in BATCHES)):
        t2.add_column(c, justify="right")
    for label, r in qdq.items():
        if "error" in r:
            t2.add_row(label, "error", r["error"][:60], "", "", "", "")
            continue
        ms = r.get("interleaved_ms", {})
        t2.add_row(label, f"{r.get('checker')} / {r.get('runs')}", f"{r.get('macs_ratio', 1.0):.3f}", f"{r.get('accuracy') or 0:.4f}",
                   f"{(r.get('file_bytes') or 0) / 1e3:.1f}", *(f"{ms[b]:.3f}" if b in ms else "-" for b in BATCHES))
    console.print(t2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    parser.add_argument("--epochs", type=float, default=1.0, help="training epochs of the reference models (cached)")
    parser.add_argument("--macs", type=float, default=0.5, help="deploy preset's MACs target (fraction kept; 0: none, the preset's default, the calibrated limit)")
    parser.add_argument("--allow-over-limit", action="store_true", help="part 1 may prune past the effective filters")
    parser.add_argument("--skip-qdq", action="store_true", help="part 1 only (the four columns)")
    parser.add_argument("--qdq-only", action="store_true", help="part 2 only (pruning the int8 QDQ model)")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="part 1 plans to this latency of the int8 original at batch 32 instead of --macs (0: --macs)")
    parser.add_argument("--finetune-epochs", type=float, default=1.0, help="fine-tuning epochs over --train-samples")
    parser.add_argument("--train-samples", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=1024, help="analysis, compensation and repair samples")
    parser.add_argument("--test-samples", type=int, default=10000)
    parser.add_argument("--sparsity", type=float, default=0.3, help="onnxsim's sparsity (graphprune is set to the MACs it reaches)")
    parser.add_argument("--runs", type=int, default=20, help="latency runs per figure")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("deploy.json"))
    parser.add_argument("--calibration", choices=("val", "train"), default="val",
                        help="val: models trained on the fit split, the limit scored on the 5,000 val images (--held-out); "
                             "train: trained on all 60,000, the limit scored on the calibration images left")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    split = "fit" if args.calibration == "val" else "train"
    train = fashion_mnist(split).subset(args.train_samples, seed=0)
    held = fashion_mnist("val") if args.calibration == "val" else None
    test = fashion_mnist("test").subset(args.test_samples, seed=0)
    results: dict[str, Any] = {"settings": vars(args) | {"json": str(args.json)}, "models": {}}
    for name in args.models:
        module = trained(name, args.epochs, cache_dir="benchmarks/.cache", split=split)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.onnx"
            models.export_onnx(module, path, bn="fold")
            om = load_onnx(path)
        target = [f"plan.latency={args.latency}"] if args.latency else [f"plan.macs={args.macs}"] if args.macs else []
        if args.allow_over_limit:
            target.append("plan.allow_over_limit=true")
        deploy: dict[str, Any] = {}
        if not args.qdq_only:
            deploy = _deploy(om, train, test, held, target, args.finetune_epochs, args.runs, args.samples)
            for column, ms in _interleaved(deploy.pop("blobs"), args.runs).items():
                deploy["columns"][column]["interleaved_ms"] = ms
        qdq: dict[str, Any] = {}
        if not args.skip_qdq:
            qdq, blobs = _qdq(om, train, test, args.sparsity, args.runs, args.samples, args.macs or 0.5)
            for label, ms in _interleaved(blobs, args.runs).items():
                qdq[label]["interleaved_ms"] = ms
        results["models"][name] = {"deploy": deploy, "qdq": qdq, "fp32_bytes": param_bytes(om.graph)}
        _print(name, deploy, qdq)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
