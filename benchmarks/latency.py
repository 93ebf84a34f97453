"""Latency-aware planning against MACs planning, Torch-Pruning and onnxsim: measured speed-up at equal MACs.

Run: nice python benchmarks/latency.py [--models resnet50 vgg16bn mobilenetv2 resnet56] [--targets 2 3]
     [--batches 1 32] [--runs 20] [--plan-batch 32] [--threads 2] [--json benchmarks/latency.json]

Models (seeded random weights and BN statistics; latency does not depend on the values):
  resnet50     torchvision's ResNet-50 layout (models.ResNet50, 1000 classes) at 3 x 224 x 224;
  vgg16bn      VGG-16-BN's conv layout at full width (64..512, five pools) at 3 x 224 x 224, with the
               reference VGG head (512 x 7 x 7 -> 64 -> 1000), not torchvision's 4096-wide classifier;
  mobilenetv2  torchvision's MobileNetV2 layout (MobileNetV2.TORCHVISION: 32..320, 1280 last, 1000 classes) at 3 x 224 x 224;
  resnet56     CIFAR-style ResNet-56 (16-32-64, 10 classes) at 1 x 28 x 28.
Each is exported once to ONNX (BN folded); every variant starts from that file. At each MACs
reduction in --targets (2x, 3x):
  graphprune latency      the default path: analysis (--samples random images, sampled-label Fisher),
                          the profile pass at --plan-batch and --threads, `--macs 1/x` planned by
                          predicted ms with fast counts, then measured once against the original and
                          repaired when slower (never-slower check);
  graphprune MACs         the same analysis, planned by MACs without a latency model (--no-profile);
  graphprune MACs r8      the same with --round-to 8;
  Torch-Pruning           1.6 MagnitudePruner, L2, uniform, the classifier ignored, ratio bisected to the
                          smallest MACs reduction >= x, exported to ONNX (BN folded);
  onnxsim                 0.8.1 apply_structured_pruning on the same ONNX, sparsity bisected the same way
                          (it prunes what it can match: its reduction may fall short, the row says).
MACs are counted by graphprune's cost model on every ONNX file alike. Latency: onnxruntime CPU EP,
--threads intra-op threads, all variants of a model in one process; each of --runs rounds runs every
variant once (round-robin, starting point rotated), and the median per variant is reported, at each
of --batches. Speed-up = original / variant; "per MACs" = speed-up / MACs reduction. The latency-aware
rows also report the latency model's prediction against the interleaved measurement at --plan-batch
(in ms, and as ratios to each one's own original: load that changes between profiling and measuring
cancels there), and what building the tables cost (a second run reads them from the cache: --cache).
Needs: pip install torch==2.13.0 "torch-pruning==1.6.*" onnxsim==0.8.1
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from graphprune import models
from graphprune.analysis.cost import model_cost
from graphprune.analysis.latency import fraction_error
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.execution.timing import ROUND_MS, Runner, interleaved_ms, session_runner
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx
from graphprune.ir.onnx import model_bytes
from graphprune.models.cnn import VGG
from graphprune.models.mobile import MobileNetV2
from graphprune.pipeline.passes import (
    AnalyzePass,
    AnalyzePassOptions,
    PlanPass,
    ProfileOptions,
    ProfilePass,
    RewriteOptions,
    RewritePass,
    Workspace,
)
from graphprune.planning.options import PlanOptions

console = Console(width=200)

VGG16_BN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VARIANTS = ("graphprune latency", "graphprune MACs", "graphprune MACs r8", "Torch-Pruning", "onnxsim")


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet50": (lambda: models.build("resnet50"), (3, 224, 224)),
    "vgg16bn": (lambda: VGG(widths=VGG16_BN, in_ch=3, classes=1000, size=224), (3, 224, 224)),
    "mobilenetv2": (lambda: MobileNetV2(3, 1000, MobileNetV2.TORCHVISION, stem=32, stem_stride=2, last=1280, dropout=0.2), (3, 224, 224)),
    "resnet56": (lambda: models.build("resnet56"), (1, 28, 28)),
}


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The benchmark model with seeded weights and BN statistics (as models.build does)."""
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    module = factory()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return module.eval(), shape


def onnx_of(module: nn.Module, shape: tuple[int, ...]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        models.export_onnx(module, path, shape, bn="fold")
        return path.read_bytes()


def cost_of(blob: bytes) -> tuple[int, int]:
    """(MACs, parameters) by graphprune's cost model."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(blob)
        c = model_cost(load_onnx(path).graph)
    return c.macs, c.params


# --- the variants ---------------------------------------------------------------------------------------------------


def graphprune_setup(blob: bytes, shape: tuple[int, ...], args: argparse.Namespace, tmp: Path) -> tuple[Workspace, dict[str, Any]]:
    """Load, analyse and profile the original once; what it cost."""
    path = tmp / "original.onnx"
    path.write_bytes(blob)
    om = OnnxPrunable(load_onnx(path))
    x = np.random.default_rng(0).standard_normal((args.samples, *shape)).astype(np.float32)
    ws = Workspace(original=om, model=om, data=Calibration((x,), None, "random"))
    t = time.perf_counter()
    ws = AnalyzePass(AnalyzePassOptions(samples=args.samples, batch_size=args.analysis_batch, loss="fisher"))(ws).workspace
    analysis_s = time.perf_counter() - t
    profile = ProfileOptions(batch=args.plan_batch, threads=args.threads, runs=args.table_runs, model_runs=args.model_runs,
                             cache_dir=args.cache)
    ws = ProfilePass(profile)(ws).workspace
    lm = ws.latency
    assert lm is not None
    cost = {"analysis_s": analysis_s, "tables": lm.stats.tables, "tables_cached": lm.stats.tables_cached,
            "measurements": lm.stats.measurements, "cache_hits": lm.stats.cache_hits, "table_build_s": lm.stats.seconds,
            "original_ms_at_plan_batch": lm.original_ms, "calibration_ms": lm.calibration_ms, "scale": lm.scale,
            "coverage": lm.coverage, "left_out": len(lm.left_out)}
    return ws, cost


def graphprune_variant(ws: Workspace, red: float, variant: str, args: argparse.Namespace) -> tuple[bytes, dict[str, Any]]:
    latency_aware = variant == "graphprune latency"
    base = Workspace(original=ws.original, model=ws.original, data=ws.data, analysis=ws.analysis,
                     latency=ws.latency if latency_aware else None)
    options = PlanOptions(macs=1.0 / red, round_to=8 if variant.endswith("r8") else 1, objective="auto" if latency_aware else "macs",
                          allow_over_limit=True, latency_runs=args.check_runs)
    t = time.perf_counter()
    out = PlanPass(options)(base).workspace
    plan_s = time.perf_counter() - t
    out = RewritePass(RewriteOptions(verify=False))(out).workspace
    assert out.plan is not None
    meta = {k: out.plan.meta[k] for k in ("predicted_ms", "measured_ms", "measured_original_ms", "repaired", "measured_slower",
                                          "measurements", "anchor_predicted", "anchor_measured", "blocked_anchor_predicted",
                                          "blocked_anchor_measured") if k in out.plan.meta}
    return model_bytes(out.model.om.model), {"plan_s": plan_s, **meta}  # type: ignore[attr-defined]


def tp_variant(module: nn.Module, shape: tuple[int, ...], red: float, steps: int) -> tuple[bytes, dict[str, Any]]:
    """Torch-Pruning L2 uniform, ratio bisected to the smallest MACs reduction >= ``red`` (its own counter)."""
    import torch_pruning as tp

    example = torch.randn(1, *shape)
    base, _ = tp.utils.count_ops_and_params(module, example)

    def prune(ratio: float) -> nn.Module:
        m = copy.deepcopy(module).eval()
        last = [x for x in m.modules() if isinstance(x, nn.Linear)][-1]
        tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=[last]).step()
        return m.eval()

    lo, hi, best, best_ratio = 0.0, 0.95, None, None
    t = time.perf_counter()
    for _ in range(steps):
        mid = (lo + hi) / 2
        try:
            m = prune(mid)
            got = base / tp.utils.count_ops_and_params(m, example)[0]
        except Exception:  # noqa: BLE001 - a ratio that empties a layer
            hi = mid
            continue
        if got >= red:
            hi, best, best_ratio = mid, m, mid
        else:
            lo = mid
    if best is None:
        best, best_ratio = prune(hi), hi
    return onnx_of(best, shape), {"ratio": best_ratio, "plan_s": time.perf_counter() - t}


def onnxsim_variant(blob: bytes, red: float, base_macs: int, steps: int) -> tuple[bytes, dict[str, Any]]:
    """onnxsim's apply_structured_pruning, sparsity bisected to the smallest MACs reduction >= ``red`` (else its largest)."""
    import onnxsim

    def prune(s: float) -> tuple[bytes, float]:
        out = onnxsim.apply_structured_pruning(onnx.load_from_string(blob), sparsity=s).SerializeToString()
        return out, base_macs / cost_of(out)[0]

    lo, hi, best = 0.0, 0.95, None
    t = time.perf_counter()
    for _ in range(steps):
        mid = (lo + hi) / 2
        out, got = prune(mid)
        if got >= red:
            hi, best = mid, (out, mid)
        else:
            lo = mid
    short = best is None
    if best is None:
        best = (prune(hi)[0], hi)
    return best[0], {"sparsity": best[1], "short_of_target": short, "plan_s": time.perf_counter() - t}


# --- measurement ----------------------------------------------------------------------------------------------------


def _cpu_session(blob: bytes, threads: int) -> ort.InferenceSession:
    """``blob`` on onnxruntime's CPU provider with ``threads`` intra-op threads."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 4
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])


def _cpu_runner(blob: bytes, x: np.ndarray, threads: int) -> Runner:
    """A runner of ``blob`` on the CPU provider, each run on ``x`` (its first input)."""
    name = onnx.ModelProto.FromString(blob).graph.input[0].name
    return session_runner(functools.partial(_cpu_session, blob, threads), {name: x})


def interleaved(blobs: dict[str, bytes], shape: tuple[int, ...], batch: int, runs: int, threads: int,
                per_round: int = 2) -> dict[str, float]:
    """Median ms per variant over ``runs`` rounds (:func:`graphprune.execution.timing.interleaved_ms`): every round
    runs each variant, round-robin from a rotating start.

    One session is alive at a time (made for its turn, warmed up, timed, then closed; warm-up and timing each last at
    least ``ROUND_MS`` and ``per_round`` runs, so a 0.1 ms model is timed on ~100 runs a round, not 2, after its
    thread pool and caches are warm):
    onnxruntime's intra-op threads spin between runs by default, and the pools of other live sessions steal the
    cores. Measured on this machine (ResNet-20, batch 32, 2 threads): 10.4 ms alone, 36-40 ms each with six
    sessions alive and spinning, 10.3-10.8 ms each one at a time. So the figures are the default configuration
    of one session, as a deployment runs it.
    """
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    names = list(blobs)
    ms = interleaved_ms([_cpu_runner(blobs[k], x, threads) for k in names], runs, per_round, warmup=3, min_ms=ROUND_MS)
    return dict(zip(names, ms))


def bench_model(name: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    t_model = time.perf_counter()
    module, shape = build(name)
    blob = onnx_of(module, shape)
    base_macs, base_params = cost_of(blob)
    blobs: dict[str, bytes] = {"original": blob}
    info: dict[str, dict[str, Any]] = {"original": {"model": name, "target": "-", "variant": "original"}}
    with tempfile.TemporaryDirectory() as tmp:
        ws, cost = graphprune_setup(blob, shape, args, Path(tmp))
        console.print(f"[bold]{name}[/]: {base_macs / 1e9:.3f} GMACs; analysis {cost['analysis_s']:.1f} s; latency tables "
                      f"{cost['tables']} ({cost['tables_cached']} cached), {cost['measurements']} measurements in "
                      f"{cost['table_build_s']:.1f} s, scale {cost['scale']}")
        for red in args.targets:
            for variant in VARIANTS:
                key = f"{variant} {red:g}x"
                try:
                    if variant.startswith("graphprune"):
                        out, extra = graphprune_variant(ws, red, variant, args)
                    elif variant == "Torch-Pruning":
                        out, extra = tp_variant(module, shape, red, args.bisect)
                    else:
                        out, extra = onnxsim_variant(blob, red, base_macs, args.bisect)
                except Exception as exc:  # noqa: BLE001 - a tool that fails on a model is a row that says so
                    console.print(f"{name} {key}: failed: {type(exc).__name__}: {exc}")
                    info[key] = {"model": name, "target": f"{red:g}x", "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]}
                    continue
                blobs[key] = out
                info[key] = {"model": name, "target": f"{red:g}x", "variant": variant, **extra}
                console.print(f"{name} {key}: {base_macs / cost_of(out)[0]:.2f}x fewer MACs ({extra.get('plan_s', 0):.1f} s)")
    rows = []
    for key, row in info.items():
        if key in blobs:
            macs, params = cost_of(blobs[key])
            row.update(macs=macs, params=params, macs_reduction=base_macs / macs, params_reduction=base_params / params)
        rows.append(row)
    for batch in args.batches:
        ms = interleaved(blobs, shape, batch, args.runs, args.threads)
        for key, row in info.items():
            if key in ms:
                row[f"lat{batch}_ms"] = ms[key]
                row[f"speedup{batch}"] = ms["original"] / ms[key]
                row[f"speedup_per_macs{batch}"] = row[f"speedup{batch}"] / row["macs_reduction"]
        console.print(f"{name}: batch {batch} measured ({args.runs} interleaved rounds)")
    pb = args.plan_batch
    for row in rows:
        if "predicted_ms" in row and f"lat{pb}_ms" in row:
            measured = row[f"lat{pb}_ms"]
            row["prediction_error"] = (row["predicted_ms"] - measured) / measured
            # the same as ratios to each one's own original (load on the machine changes between profiling and measuring)
            row["prediction_ratio_error"] = fraction_error(row["predicted_ms"], cost["original_ms_at_plan_batch"], measured,
                                                           info["original"][f"lat{pb}_ms"])
    cost["seconds"] = time.perf_counter() - t_model
    return rows, cost


def speed(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def summary(rows: list[dict[str, Any]], batches: list[int]) -> Table:
    table = Table(title="Speed-up at equal MACs (onnxruntime CPU EP; interleaved medians)")
    cols = ["model", "target", "variant", "MACs red."]
    for b in batches:
        cols += [f"b{b} speed-up", f"b{b} / MACs red."]
    for c in (*cols, "predicted err.", "as ratios"):
        table.add_column(c, justify="right")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], r["target"], r["variant"], "failed", *([""] * (2 * len(batches))), "", "")
            continue
        cells = [r["model"], r["target"], r["variant"], f"{r['macs_reduction']:.2f}x" + (" (short)" if r.get("short_of_target") else "")]
        for b in batches:
            cells += [speed(r.get(f"speedup{b}")), f"{r.get(f'speedup_per_macs{b}', float('nan')):.2f}"]
        errs = [r.get(k) for k in ("prediction_error", "prediction_ratio_error")]
        table.add_row(*cells, *("-" if e is None else f"{100 * e:+.1f}%" for e in errs))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--targets", nargs="+", type=float, default=[2.0, 3.0], help="MACs reductions")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--runs", type=int, default=20, help="interleaved rounds per batch")
    parser.add_argument("--plan-batch", type=int, default=32, help="batch of the latency tables (--latency-batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table-runs", type=int, default=10, help="timed runs per table point")
    parser.add_argument("--model-runs", type=int, default=10, help="timed runs of whole models while profiling")
    parser.add_argument("--check-runs", type=int, default=10, help="runs of the never-slower measurement")
    parser.add_argument("--samples", type=int, default=32, help="random images for the analysis")
    parser.add_argument("--analysis-batch", type=int, default=8)
    parser.add_argument("--bisect", type=int, default=8, help="bisection steps of Torch-Pruning's ratio and onnxsim's sparsity")
    parser.add_argument("--cache", default="", help="latency table cache (default $GRAPHPRUNE_CACHE/latency)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/latency.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    start, load_start = time.time(), os.getloadavg()
    rows: list[dict[str, Any]] = []
    costs: dict[str, Any] = {}
    for name in args.models:
        model_rows, costs[name] = bench_model(name, args)
        rows += model_rows
        console.print(summary(model_rows, args.batches))
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": f"{os.cpu_count()} CPUs, onnxruntime {ort.__version__}, torch {torch.__version__}",
              "load_average_start": load_start, "load_average_end": os.getloadavg(), "seconds": time.time() - start,
              "models": costs, "rows": rows}
    args.json.write_text(json.dumps(result, indent=1, default=float))
    console.print(summary(rows, args.batches))
    console.print(f"wrote {args.json} ({time.time() - start:.0f} s; load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
