"""graphprune side by side with Torch-Pruning: accuracy at equal MACs, real latency, dependency-graph time, coverage.

Run: python benchmarks/compare_torch_pruning.py [--quick] [--models resnet20 resnet56 vgg16s mobilenetv2]
     [--seeds 0] [--finetune-epochs 0.25] [--json benchmarks/compare.json] [--plot benchmarks/compare.png]

Three parts, each side by side in one run:
  1. Accuracy: each model trained on Fashion-MNIST (3 epochs, seed 0, cached) is pruned
     to 2x, 3x and graphprune's estimated maximum MACs reduction by
       - graphprune: hierarchical (effective), compensation, BN repair (passes/hierarchical.toml
         without its validate/report passes), and the same with --round-to 8;
       - Torch-Pruning 1.6 MagnitudePruner: L2 filter norm uniform and global, group norm
         (L2 over every coupled tensor) uniform, Taylor uniform; the classifier ignored, the
         pruning ratio bisected to the same MACs;
     then every model is fine-tuned with the same budget and seed (SGD, lr 0.01, cosine),
     exported to ONNX (BN folded) and measured on onnxruntime: test accuracy, parameters,
     MACs, latency at batch 1 and 32, and latency speed-up divided by MACs reduction.
  2. Dependency analysis time: graphprune's groups (from the traced graph; torch.export
     time printed apart) vs Torch-Pruning's DependencyGraph.build_dependency, same modules.
  3. Coverage: every reference model pruned at ratio 0.5 by each tool; valid = runs, exports
     to ONNX and runs on onnxruntime; exact = equals the original with the removed channels
     zeroed (graphprune: its masked check; Torch-Pruning: in a copy, the parameters producing
     and reading the channels its own groups remove are zeroed, then the outputs compared).
--parts latency --merge JSON...: the accuracy part keeps every model's ONNX (--save-models); this
  measures all of them again, back to back in one process, and updates the JSON files in place.
--quick: ResNet-20 only, 2x only, one twentieth of an epoch of fine-tuning (minutes).
Needs: apt-get install -y dataset-fashion-mnist; pip install --no-deps torch-pruning.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import analyzed_workspace, load_onnx_bytes  # benchmarks/ (same folder)
from rich.console import Console
from rich.table import Table
from torch import nn

from graphprune import models
from graphprune.analysis.cost import model_cost
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.execution.measure import ort_accuracy
from graphprune.execution.sessions import make_session, measure_latency
from graphprune.execution.training import FitOptions, fit
from graphprune.frontends.onnx import load_onnx
from graphprune.ir.onnx import model_bytes
from graphprune.models.fashion import fashion_mnist, trained
from graphprune.pipeline.passes import (
    CompensateOptions,
    CompensatePass,
    FineTunePass,
    PlanPass,
    RepairPass,
    RewriteOptions,
    RewritePass,
    Workspace,
)
from graphprune.planning.options import PlanOptions

console = Console(width=200)
TP_METHODS = {
    "l2 uniform": ("l2", False),
    "l2 global": ("l2", True),
    "group-norm uniform": ("group", False),
    "taylor uniform": ("taylor", False),
}


# --- shared measurement -----------------------------------------------------------------------------------------------


def _latency(blob: bytes, runs: int) -> dict[str, float]:
    session = make_session(blob)
    name = session.get_inputs()[0].name
    out = {}
    for batch in (1, 32):
        x = np.random.default_rng(0).standard_normal((batch, *models.INPUT_SHAPE)).astype(np.float32)
        out[f"lat{batch}_ms"] = measure_latency(session, {name: x}, runs=runs if batch == 1 else max(3, runs // 4))
    return out


def _onnx_of(module: nn.Module) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        models.export_onnx(module, path, bn="fold")
        return path.read_bytes()


def _figures(blob: bytes, test, runs: int) -> dict[str, float]:
    om = load_onnx_bytes(blob)
    cost = model_cost(om.graph)
    return {"acc": ort_accuracy(blob, test), "params": cost.params, "macs": cost.macs, **_latency(blob, runs)}


# --- part 1: accuracy at equal MACs -----------------------------------------------------------------------------------


def _graphprune(om, analysis, train, red: float, round_to: int, ft: FitOptions, samples: int) -> bytes:
    ws = Workspace(original=OnnxPrunable(om), model=OnnxPrunable(om), data=train, analysis=analysis)
    plan = PlanOptions(method="hierarchical", criterion="effective", macs=1.0 / red, round_to=round_to, allow_over_limit=True, seed=ft.seed)
    ws = PlanPass(plan)(ws).workspace
    ws = CompensatePass(CompensateOptions(samples=samples, seed=ft.seed))(ws).workspace
    ws = RewritePass(RewriteOptions(verify=False))(ws).workspace
    ws = RepairPass(CompensateOptions(samples=samples, seed=ft.seed))(ws).workspace
    if ft.epochs > 0:
        ws = FineTunePass(ft)(ws).workspace
    return model_bytes(ws.model.om.model)


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "l2":
        return tp.importance.MagnitudeImportance(p=2, group_reduction="first")
    if kind == "group":
        return tp.importance.MagnitudeImportance(p=2, group_reduction="mean")
    return tp.importance.TaylorImportance()


def _tp_prune(module: nn.Module, ratio: float, kind: str, global_: bool, example: torch.Tensor, calib) -> nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(module).eval()
    last = [x for x in m.modules() if isinstance(x, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(m, example, importance=_importance(kind), pruning_ratio=ratio, global_pruning=global_,
                                       ignored_layers=[last])
    if kind == "taylor":
        x, y = torch.from_numpy(calib.inputs[0][:256]), torch.from_numpy(calib.labels[:256])
        F.cross_entropy(m(x), y).backward()
    pruner.step()
    m.zero_grad(set_to_none=True)
    return m.eval()


def _tp_at(module: nn.Module, red: float, kind: str, global_: bool, calib) -> nn.Module:
    """Bisect Torch-Pruning's ratio to the smallest MACs reduction >= ``red``."""
    import torch_pruning as tp

    example = torch.from_numpy(calib.inputs[0][:2])
    base, _ = tp.utils.count_ops_and_params(module, example)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        try:
            m = _tp_prune(module, mid, kind, global_, example, calib)
            got = base / tp.utils.count_ops_and_params(m, example)[0]
        except Exception:  # noqa: BLE001 - a ratio that empties a layer
            hi = mid
            continue
        if got >= red:
            hi, best = mid, m
        else:
            lo = mid
    return best if best is not None else _tp_prune(module, hi, kind, global_, example, calib)


def _kept(blob: bytes, save_dir: Path | None, row: dict) -> dict:
    """Write ``blob`` as ``save_dir/<model>-<target>-<method>-s<seed>.onnx`` (for ``--parts latency``); the row's path."""
    if save_dir is None:
        return {}
    stem = "-".join(str(row[k]) for k in ("model", "target", "tool", "method")) + f"-s{row['seed']}"
    path = save_dir / ("".join(c if c.isalnum() or c in "-." else "_" for c in stem) + ".onnx")
    save_dir.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return {"onnx": str(path)}


def accuracy_part(names: list[str], targets_of, seeds: list[int], ft_epochs: float, train_epochs: float, samples: int,
                  runs: int, save_dir: Path | None = None) -> list[dict]:
    train, test = fashion_mnist("train"), fashion_mnist("test")
    calib = train.subset(2048, seed=0)
    rows: list[dict] = []
    for name in names:
        t_model = time.time()
        module = trained(name, train_epochs, cache_dir="benchmarks/.cache")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            models.export_onnx(module, path, bn="keep")
            om = load_onnx(path)
        blob = _onnx_of(module)
        base = _figures(blob, test, runs)
        ws = analyzed_workspace(om, calib)
        limit = ws.analysis.limit.macs_reduction
        rows.append({"model": name, "target": "base", "tool": "-", "method": "unpruned", "seed": 0, "red_target": 1.0, **base})
        rows[-1].update(_kept(blob, save_dir, rows[-1]))
        console.print(f"[bold]{name}[/]: base {base['acc']:.4f}, estimated maximum {limit:.2f}x")
        for label, red in targets_of(limit):
            for seed in seeds:
                ft = FitOptions(epochs=ft_epochs, lr=0.01, seed=seed)
                for method, round_to in (("hierarchical", 1), ("hierarchical round-to 8", 8)):
                    if round_to > 1 and label != "2x":
                        continue
                    t0 = time.time()
                    blob = _graphprune(om, ws.analysis, train, red, round_to, ft, samples)
                    rows.append({"model": name, "target": label, "tool": "graphprune", "method": method, "seed": seed,
                                 "red_target": red, "seconds": time.time() - t0, **_figures(blob, test, runs)})
                    rows[-1].update(_kept(blob, save_dir, rows[-1]))
                    console.print(rows[-1])
                for method, (kind, global_) in TP_METHODS.items():
                    t0 = time.time()
                    torch.manual_seed(seed)
                    m = _tp_at(module, red, kind, global_, calib)
                    if ft_epochs > 0:
                        fit(m, train, ft)
                    blob = _onnx_of(m.eval())
                    rows.append({"model": name, "target": label, "tool": "Torch-Pruning", "method": method, "seed": seed,
                                 "red_target": red, "seconds": time.time() - t0, **_figures(blob, test, runs)})
                    rows[-1].update(_kept(blob, save_dir, rows[-1]))
                    console.print(rows[-1])
        console.print(f"{name}: {time.time() - t_model:.0f} s")
    return rows


def latency_part(paths: list[Path], runs: int) -> None:
    """Measure again, in this one process, the latency of every saved model of earlier ``--json`` runs (in place).

    The accuracy runs are long and may share the machine; this pass runs alone and
    measures every model of a table back to back, so their ratios compare.
    """
    for path in paths:
        result = json.loads(path.read_text())
        rows = [r for r in result.get("accuracy", []) if r.get("onnx") and Path(r["onnx"]).exists()]
        for i, row in enumerate(rows):
            row.update(_latency(Path(row["onnx"]).read_bytes(), runs))
            console.print(f"{path.name} {i + 1}/{len(rows)}: {row['model']} {row['target']} {row['method']}: "
                          f"{row['lat1_ms']:.3f} / {row['lat32_ms']:.3f} ms")
        result.setdefault("args", {})["latency"] = f"measured again alone, {time.strftime('%Y-%m-%d %H:%M')}, {runs} runs"
        path.write_text(json.dumps(result, indent=1, default=float))


def accuracy_table(rows: list[dict]) -> Table:
    table = Table(title="Accuracy at equal MACs after the same fine-tuning (onnxruntime CPU EP; mean ± spread over seeds)")
    for col in ("model", "target", "tool", "method", "MACs red.", "params red.", "test acc", "Δ acc (pp)",
                "lat b1 speed-up", "lat b32 speed-up", "b32 speed-up / MACs red."):
        table.add_column(col, justify="right")
    bases = {r["model"]: r for r in rows if r["target"] == "base"}
    keys = list(dict.fromkeys((r["model"], r["target"], r["tool"], r["method"]) for r in rows if r["target"] != "base"))
    for key in keys:
        sel = [r for r in rows if (r["model"], r["target"], r["tool"], r["method"]) == key]
        b = bases[key[0]]
        acc = [r["acc"] for r in sel]
        macs = statistics.mean(b["macs"] / r["macs"] for r in sel)
        params = statistics.mean(b["params"] / r["params"] for r in sel)
        s1 = statistics.mean(b["lat1_ms"] / r["lat1_ms"] for r in sel)
        s32 = statistics.mean(b["lat32_ms"] / r["lat32_ms"] for r in sel)
        spread = f" ± {(max(acc) - min(acc)) / 2:.4f}" if len(acc) > 1 else ""
        table.add_row(*key, f"{macs:.2f}x", f"{params:.2f}x", f"{statistics.mean(acc):.4f}{spread}",
                      f"{(statistics.mean(acc) - b['acc']) * 100:+.2f}", f"{s1:.2f}x", f"{s32:.2f}x", f"{s32 / macs:.2f}")
    return table


def plot(rows: list[dict], path: Path) -> None:
    from graphprune.report.plots import pyplot

    plt = pyplot()
    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        b = next(r for r in rows if r["model"] == name and r["target"] == "base")
        methods = list(dict.fromkeys((r["tool"], r["method"]) for r in rows if r["model"] == name and r["target"] != "base"))
        for tool, method in methods:
            sel = [r for r in rows if r["model"] == name and (r["tool"], r["method"]) == (tool, method)]
            pts = []  # per target: mean MACs reduction, mean accuracy, half the spread over seeds
            for target in dict.fromkeys(r["target"] for r in sel):
                acc = [r["acc"] for r in sel if r["target"] == target]
                red = statistics.mean(b["macs"] / r["macs"] for r in sel if r["target"] == target)
                pts.append((red, statistics.mean(acc), (max(acc) - min(acc)) / 2))
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], capsize=2,
                        fmt="o-" if tool == "graphprune" else "x--", label=f"{tool}: {method}")
        ax.axhline(b["acc"], color="k", lw=0.8, ls=":", label="unpruned")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("MACs reduction")
        ax.set_ylabel("accuracy after fine-tuning (mean ± spread)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- part 2: dependency analysis time ---------------------------------------------------------------------------------


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def timing_part(names: list[str], repeat: int) -> list[dict]:
    import torch_pruning as tp

    from graphprune.coupling.groups import build_groups
    from graphprune.frontends.torch.trace import to_channel_graph

    rows = []
    for name in names:
        module = models.build(name)
        x = torch.randn(2, *models.INPUT_SHAPE)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (x,))
        export_s = time.perf_counter() - t
        gp = _best(lambda program=program: build_groups(to_channel_graph(program)[0]), repeat)
        dg = _best(lambda module=module, x=x: tp.DependencyGraph().build_dependency(module, example_inputs=x, verbose=False), repeat)
        rows.append({"model": name, "export_s": export_s, "graphprune_groups_s": gp, "tp_depgraph_s": dg, "ratio": gp / dg})
        console.print(rows[-1])
    return rows


def timing_table(rows: list[dict]) -> Table:
    table = Table(title="Dependency analysis time (best of repeats; graphprune excludes torch.export, printed apart)")
    for col in ("model", "torch.export", "graphprune groups", "Torch-Pruning DependencyGraph", "graphprune / TP"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{r['export_s']:.3f} s", f"{r['graphprune_groups_s']:.3f} s", f"{r['tp_depgraph_s']:.3f} s", f"{r['ratio']:.2f}")
    return table


# --- part 3: coverage -------------------------------------------------------------------------------------------------


def _runs_on_ort(module: nn.Module, x: torch.Tensor) -> None:
    blob = _onnx_of(module)
    session = make_session(blob)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = module(x).numpy()
    if not np.allclose(got, want, rtol=1e-3, atol=1e-4):
        raise RuntimeError("onnxruntime output differs from torch")


def _zero_channels(m: nn.Module, handler: str, idxs: list[int]) -> None:
    """Silence removed channels in the reference copy: producers' outputs and consumers' inputs both zeroed."""
    idx = torch.as_tensor(idxs, dtype=torch.long)
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) or "out_channel" in handler:
        axis = 1 if transposed else 0
        params = (getattr(m, "weight", None), getattr(m, "bias", None))
    elif "in_channel" in handler and (isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1)):
        axis = 0 if transposed else 1
        params = (m.weight,)
    else:
        return
    for p in params:
        if p is not None and p.dim() > axis:
            p.index_fill_(axis, idx, 0.0)


def _tp_coverage(module: nn.Module, x: torch.Tensor) -> tuple[str, str]:
    """Prune half of every group Torch-Pruning finds; compare with a copy whose removed channels are zeroed."""
    import torch_pruning as tp

    model = copy.deepcopy(module).eval()
    masked = copy.deepcopy(module).eval()
    names = {id(m): n for n, m in model.named_modules()}
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[last])
    with torch.no_grad():
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                if id(dep.target.module) in names:
                    _zero_channels(masked.get_submodule(names[id(dep.target.module)]), dep.handler.__name__, idxs)
            group.prune()
    with torch.no_grad():
        got, want = model(x), masked(x)
    _runs_on_ort(model, x)
    err = float((got - want).abs().max())
    return "valid", "exact" if err <= 1e-4 * max(1.0, float(want.abs().max())) else f"not exact (max error {err:.2g})"


def _gp_coverage(module: nn.Module, x: torch.Tensor) -> tuple[str, str]:
    from graphprune.backends.torch_module import prune_module, verify_module
    from graphprune.coupling.groups import build_groups
    from graphprune.frontends.torch.trace import load_module
    from graphprune.pipeline.run import prune_file
    from graphprune.planning.uniform import uniform_plan

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "m.onnx"
        models.export_onnx(module, src, bn="fold")
        result = prune_file(src, Path(tmp) / "p.onnx", ratio=0.5, verify=True, latency_runs=0)
    tm = load_module(module, [x])
    coupling = build_groups(tm.graph)
    plan = uniform_plan(tm.graph, coupling, 0.5)
    small = prune_module(tm, coupling, plan)
    verify_module(tm, coupling, plan, small, [x])
    _runs_on_ort(small, x)
    return "valid", "exact (ONNX and torch)" if result.validation.exact else "not exact"


def coverage_part(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        x = torch.randn(2, *models.INPUT_SHAPE)
        row = {"model": name}
        for tool, fn in (("graphprune", _gp_coverage), ("Torch-Pruning", _tp_coverage)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row[tool] = " / ".join(fn(models.build(name), x))
            except Exception as exc:  # noqa: BLE001 - a failure is the finding
                row[tool] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:70]}"
        rows.append(row)
        console.print(row)
    return rows


def coverage_table(rows: list[dict]) -> Table:
    table = Table(title="Coverage: every reference model pruned at ratio 0.5 (valid: runs, exports, onnxruntime agrees; exact: masked check)")
    for col in ("model", "graphprune", "Torch-Pruning"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["graphprune"], r["Torch-Pruning"])
    ok = {t: sum(r[t].startswith("valid / exact") for r in rows) for t in ("graphprune", "Torch-Pruning")}
    table.add_row("valid and exact", f"{ok['graphprune']} / {len(rows)}", f"{ok['Torch-Pruning']} / {len(rows)}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "vgg16s", "mobilenetv2"],
                        help="vgg16s: the VGG-16-BN layout at a quarter of the widths (vgg16: full widths, 16x the MACs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--finetune-epochs", type=float, default=0.25)
    parser.add_argument("--train-epochs", type=float, default=3.0)
    parser.add_argument("--samples", type=int, default=1024, help="calibration samples for compensation and repair")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--parts", nargs="+", default=["timing", "coverage", "accuracy"],
                        choices=["timing", "coverage", "accuracy", "latency"],
                        help="latency: measure again the saved models of the --json files given with --merge (in place)")
    parser.add_argument("--save-models", type=Path, default=Path("benchmarks/.cache/compare"),
                        help="where the accuracy part keeps each model's ONNX for --parts latency")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON", help="only print the tables (and --plot) of earlier runs' --json")
    args = parser.parse_args()
    if "latency" in args.parts:
        if not args.merge:
            parser.error("--parts latency needs --merge JSON...")
        latency_part(args.merge, args.latency_runs)
    if args.merge:
        merged: dict[str, list] = {}
        for path in args.merge:
            for part, rows in json.loads(path.read_text()).items():
                if part != "args":
                    merged.setdefault(part, []).extend(rows)
        for part, render in (("timing", timing_table), ("coverage", coverage_table), ("accuracy", accuracy_table)):
            if part in merged:
                console.print(render(merged[part]))
        if args.plot and "accuracy" in merged:
            plot(merged["accuracy"], args.plot)
        return
    t0 = time.time()
    names = ["resnet20"] if args.quick else args.models
    ft_epochs = 0.05 if args.quick else args.finetune_epochs
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    if "timing" in args.parts:
        everything = sorted(set(names) | set(models.SMALL_MODELS) | {"densenet201"})
        result["timing"] = timing_part(names if args.quick else everything, 1 if args.quick else 3)
        console.print(timing_table(result["timing"]))
    if "coverage" in args.parts:
        result["coverage"] = coverage_part(list(models.SMALL_MODELS) if not args.quick else ["resnet20", "vit"])
        console.print(coverage_table(result["coverage"]))
    if "accuracy" in args.parts:
        def targets_of(limit: float) -> list[tuple[str, float]]:
            return [("2x", 2.0)] if args.quick else [("2x", 2.0), ("3x", 3.0), (f"max {limit:.2f}x", limit)]

        save_dir = args.save_models / "quick" if args.quick else args.save_models  # never over a full run's models
        result["accuracy"] = accuracy_part(names, targets_of, args.seeds, ft_epochs, args.train_epochs, args.samples,
                                           args.latency_runs, save_dir)
        console.print(accuracy_table(result["accuracy"]))
        if args.plot:
            plot(result["accuracy"], args.plot)
    console.print(f"total time {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
