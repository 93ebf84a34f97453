"""Does the calibrated limit hold? Accuracy vs MACs reduction, the limits marked, peers side by side.

Run: nice -n 10 python benchmarks/limit.py [--models resnet20 mobilenetv2] [--finetune-epochs 0.25] [--json benchmarks/limit.json]
     [--limit-only [--confidences 0.5 0.8]: the limit at each confidence, its test accuracy, the no-fine-tune knee]
     [--cost-only benchmarks/limit_cost.json: the analysis and the limit pass timed, nothing else]
     [--plan-only benchmarks/limit_plan.json: the plan pass at --peers-at and at the limit, nothing else]

Per model (trained on Fashion-MNIST, cached; exported to ONNX with BN kept). --calibration ``val`` (default): the
model trains on 55,000 training images (``fit``), is analysed and compensated on 4,096 of them, and the limit's
points are scored on up to 4,096 of the other 5,000 (``val``, never trained on: the prune command's --held-out), as a deployment
engineer's calibration set would be; ``train``: it trains on all 60,000 and the points are scored on the calibration
images the analysis and compensation leave (images it fitted: they lose more to pruning than unseen ones, so the
limit lands low). Nothing from the test split calibrates.
1. analyze (2,048 labelled calibration images) and the limit pass (tolerance 1 pp, compensation and repair, points
   scored on up to --holdout held-out images), timed against the analysis;
2. the curve on the **test split** (10,000 images): the same budget family the limit is defined on, at a grid of
   MACs reductions plus the spectral estimate and the calibrated limit; each point compensated, rewritten,
   repaired (no fine-tuning), then fine-tuned briefly (--finetune-epochs, labels) and measured again;
3. the measured knee of each curve: the largest reduction whose test accuracy is within 1 pp of the base
   (interpolated in log reduction between the last grid point within and the first beyond);
4. at the side-by-side targets also what ``prune --macs`` makes (the plan pass within the calibrated floors, the
   excess past them by the measured rule; planned by MACs), and peers at the same MACs before fine-tuning:
   Torch-Pruning 1.6 (L2 and Taylor, uniform, with BN re-estimation on the same calibration images; the best is
   kept) and onnxsim 0.8.1 apply_structured_wanda_pruning (+ its apply_pruning_finetune refit) on the BN-folded
   ONNX (its structured pruning does not cross BatchNormalization).
Writes benchmarks/limit_<model>.png and the JSON. Needs: apt-get install -y dataset-fashion-mnist;
pip install torch==2.13.0 torch-pruning==1.6.* onnxsim==0.8.1.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import analyzed_workspace, bisect_ratio, log  # benchmarks/ (same folder)

from graphprune import models
from graphprune.analysis.cost import cost_with_keep, model_cost
from graphprune.execution.measure import ort_accuracy
from graphprune.execution.training import FitOptions
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx
from graphprune.ir.onnx import model_bytes
from graphprune.ir.plan import plan_from_keep
from graphprune.models.fashion import fashion_mnist, trained
from graphprune.pipeline.limit import BudgetFamily, LimitPass, LimitPassOptions, predictions
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
from graphprune.planning.limit import paired_drop
from graphprune.planning.options import PlanOptions

GRID = (1.5, 2.0, 2.5, 3.0, 4.0)
TOLERANCE = 0.01


class Family:
    """The budget family of plans: counts at a budget, the budget of a MACs reduction."""

    def __init__(self, ws: Workspace) -> None:
        family = BudgetFamily.of(ws)  # the limit pass's own family
        assert family is not None
        self.ws, self.coupling, self.graph, self.family = ws, ws.groups(), ws.original.graph, family
        self.orders, self.full = family.orders, family.full
        self.macs = model_cost(self.graph).macs
        self.max_budget = family.max_budget()

    def counts(self, budget: float) -> dict[int, int]:
        return self.family.counts(budget)

    def reduction(self, budget: float) -> float:
        return self.macs / cost_with_keep(self.graph, self.coupling, self.counts(budget)).macs

    def budget_for(self, red: float) -> float:
        """The smallest budget reaching at least ``red`` (the limit pass's bisection; the largest budget when none does)."""
        budget = self.family.budget_keeping(self.ws, "macs", 1.0 / red, self.max_budget)
        return self.max_budget if budget is None else budget


def graphprune_point(fam: Family, budget: float, test: Calibration, train: Calibration, finetune_epochs: float,
                     seed: int = 0, base_correct: np.ndarray | None = None) -> dict[str, Any]:
    """The family's plan at ``budget`` compensated, rewritten and repaired: its test accuracy (and after a brief
    fine-tune); with ``base_correct`` (the original's per-image correctness on ``test``) also the paired drop's
    standard error on the test split (``test_drop_se``)."""
    ws = fam.ws
    counts = fam.counts(budget)
    plan = plan_from_keep(fam.coupling, {g: fam.orders[g].keep(k) for g, k in counts.items()}, {"budget": budget})
    w = Workspace(original=ws.original, model=ws.original, data=ws.data, coupling=fam.coupling, plan=plan)
    opts = CompensateOptions(samples=1024)
    t = time.perf_counter()
    w = CompensatePass(opts)(w).workspace
    w = RewritePass(RewriteOptions(verify=False))(w).workspace
    w = RepairPass(opts)(w).workspace
    seconds = time.perf_counter() - t
    before = w.model.accuracy(test)
    se = None
    if base_correct is not None:
        assert test.labels is not None
        se = paired_drop(base_correct, predictions(w.model, test, 64) == test.labels)[1]
    after = None
    if finetune_epochs > 0:
        w.data = train  # the brief fine-tune reads the whole training split
        w = FineTunePass(FitOptions(epochs=finetune_epochs, lr=0.01, seed=seed))(w).workspace
        after = w.model.accuracy(test)
    red = fam.macs / model_cost(w.model.graph).macs
    return {"budget": budget, "macs_reduction": red, "accuracy": before, "accuracy_finetuned": after, "recovery_seconds": seconds,
            **({} if se is None else {"test_drop_se": se})}


def planned_point(ws: Workspace, red: float, test: Calibration) -> dict[str, Any]:
    """What ``prune --macs 1/red --allow-over-limit --objective macs`` makes: the plan pass (hierarchical within the
    calibrated floors, the excess past them by the measured rule), compensated, rewritten, repaired; test accuracy."""
    w = dataclasses.replace(ws)
    w = PlanPass(PlanOptions(macs=1 / red, allow_over_limit=True, objective="macs"))(w).workspace
    assert w.plan is not None
    opts = CompensateOptions(samples=1024)
    w = CompensatePass(opts)(w).workspace
    w = RewritePass(RewriteOptions(verify=False))(w).workspace
    w = RepairPass(opts)(w).workspace
    return {"macs_reduction": model_cost(ws.original.graph).macs / model_cost(w.model.graph).macs,
            "accuracy": w.model.accuracy(test), "excess": w.plan.meta.get("excess"), "excess_scores": w.plan.meta.get("excess_scores"),
            "allocation": w.plan.meta.get("allocation"), "allocation_scores": w.plan.meta.get("allocation_scores")}


def knee(points: list[dict[str, Any]], key: str, base: float, tol: float) -> dict[str, Any]:
    """Largest reduction within ``tol`` of ``base`` (interpolated in log reduction up to the first point beyond)."""
    pts = sorted(((1.0, base), *((p["macs_reduction"], p[key]) for p in points if p[key] is not None)))
    best = 1.0
    for (x0, a0), (x1, a1) in itertools.pairwise(pts):
        if a1 >= base - tol:
            best = x1
            continue
        if a0 >= base - tol:
            t = (a0 - (base - tol)) / max(a0 - a1, 1e-12)
            best = math.exp(math.log(x0) + t * math.log(x1 / x0))
        return {"knee": best, "bounded": False}
    return {"knee": best, "bounded": True}


def torch_pruning_best(module: Any, cal: Calibration, test: Calibration, red: float) -> dict[str, Any]:
    from compensation import _torch_pruning  # benchmarks/compensation.py (same folder)

    rows = {imp: _torch_pruning(module, cal, test, red, imp) for imp in ("l2", "taylor")}
    best = max(rows, key=lambda k: rows[k]["repair"])
    return {"criterion": best, "macs_reduction": rows[best]["macs_reduction"], "accuracy": rows[best]["repair"],
            "all": {k: {"macs_reduction": v["macs_reduction"], "none": v["none"], "repair": v["repair"]} for k, v in rows.items()}}


def onnxsim_point(folded: Path, cal: Calibration, test: Calibration, red: float) -> dict[str, Any]:
    import onnx
    import onnxsim

    m = onnx.load(str(folded))
    name = m.graph.input[0].name
    batches = [{name: cal.inputs[0][i:i + 128]} for i in range(0, 1024, 128)]
    base_macs = model_cost(load_onnx(folded).graph).macs

    def at(sparsity: float) -> tuple[Any, float]:
        p = onnxsim.apply_structured_wanda_pruning(m, calibration_data=batches, sparsity=sparsity)
        path = Path(tempfile.mkdtemp()) / "p.onnx"
        onnx.save(p, str(path))
        return p, base_macs / model_cost(load_onnx(path).graph).macs

    hi, best = bisect_ratio(at, red, 9)
    if best is None:
        return {"macs_reduction": at(hi)[1], "accuracy": None, "note": "target not reached"}
    p, r = best
    plain = ort_accuracy(p.SerializeToString(), test)
    refit = onnxsim.apply_pruning_finetune(m, p, calibration_data=batches)
    refit_acc = ort_accuracy(refit.SerializeToString(), test)
    return {"sparsity": hi, "macs_reduction": r, "wanda": plain, "wanda_refit": refit_acc, "accuracy": max(plain, refit_acc)}


@dataclasses.dataclass(frozen=True)
class Splits:
    """The images of one study: ``train`` (what the model trained on, and what a brief fine-tune reads), ``cal`` (the
    calibration data: analysis, compensation, repair, the peers' calibration), ``held`` (what the limit's points are
    scored on; None: the calibration images the analysis and compensation leave) and ``test`` (curves and knees only)."""

    model_split: str
    train: Calibration
    cal: Calibration
    held: Calibration | None
    test: Calibration


def splits(calibration: str, test_samples: int) -> Splits:
    """``val``: models trained on the ``fit`` split, calibrated on 4,096 of its images, the limit scored on the 5,000
    ``val`` training images they never saw (``--held-out``); ``train``: models trained on all 60,000 training images,
    calibrated on 4,096 of them, the limit scored on those the analysis and compensation leave."""
    test = fashion_mnist("test").subset(test_samples, seed=1)
    if calibration == "val":
        fit = fashion_mnist("fit")
        return Splits("fit", fit, fit.subset(4096, seed=0), fashion_mnist("val"), test)
    train = fashion_mnist("train")
    return Splits("train", train, train.subset(4096, seed=0), None, test)


def analyzed_model(name: str, args: argparse.Namespace, sp: Splits) -> tuple[Any, Path, float, Workspace]:
    """The trained model (0 epochs: untrained, a smoke run), its BN-kept export, its test accuracy, and the workspace
    after the analysis of the calibration images."""
    module = (trained(name, args.epochs, cache_dir="benchmarks/.cache", split=sp.model_split) if args.epochs > 0
              else models.build(name).eval())
    path = Path(tempfile.mkdtemp()) / f"{name}.onnx"
    models.export_onnx(module, path, bn="keep")
    om = load_onnx(path)
    base = ort_accuracy(model_bytes(om.model), sp.test)
    ws = analyzed_workspace(om, sp.cal)
    ws.held_out = sp.held
    assert ws.analysis is not None
    return module, path, base, ws


def limit_only(name: str, args: argparse.Namespace, sp: Splits) -> dict[str, Any]:
    """The analysis, then the limit pass at each of ``--confidences`` as :func:`run_model` runs it, the test accuracy
    at each limit (no fine-tuning), and the measured no-fine-tune knee on the same model (the budget family on the
    grid, compensated, rewritten and repaired, scored on the test split)."""
    _, _, base, ws = analyzed_model(name, args, sp)
    assert ws.analysis is not None
    train, test = sp.train, sp.test
    fam = Family(ws)
    assert test.labels is not None
    base_correct = predictions(ws.original, test, 64) == test.labels
    limits = []
    for confidence in args.confidences:
        opts = LimitPassOptions(tolerance=TOLERANCE, finetune_epochs=0.0, holdout=args.holdout, confidence=confidence)
        lim = LimitPass(opts)(ws).workspace.limit
        assert lim is not None
        log(name, *lim.lines())
        for p in lim.points:
            log(name, f"point {p.macs_reduction:.3f}x quality {p.quality:.4f} margin {p.margin:.4f} in {p.seconds:.1f} s")
        at = graphprune_point(fam, lim.budget, test, train, 0.0, base_correct=base_correct)
        limits.append({"confidence": lim.confidence, "limit": lim.macs_reduction, "held_out_quality": lim.quality,
                       "held_out_base": lim.base_quality, "margin": lim.margin, "test_accuracy": at["accuracy"],
                       "test_drop_pp": 100 * (base - at["accuracy"]), "test_drop_se_pp": 100 * at["test_drop_se"],
                       "seconds": lim.seconds, "points": len(lim.points)})
        log(name, limits[-1])
    curve = []
    for red in args.grid:
        p = graphprune_point(fam, fam.budget_for(red), test, train, 0.0)
        curve.append(p)
        log(name, "curve", p)
    for lim_row in limits:  # the limits are points of the same family: they refine the knee's interpolation
        curve.append({"macs_reduction": lim_row["limit"], "accuracy": lim_row["test_accuracy"]})
    k = knee(curve, "accuracy", base, TOLERANCE)
    for lim_row in limits:
        lim_row["error_vs_knee"] = lim_row["limit"] / k["knee"] - 1
    row = {"model": name, "base": base, "knee": k, "limits": limits, "curve": curve, "calibration": args.calibration,
           "analysis_seconds": ws.analysis.meta.get("seconds"), "train_epochs": args.epochs, "test_samples": len(test)}
    log(name, {"knee": k, "limits": [(r["confidence"], round(r["limit"], 3), round(r["test_drop_pp"], 2),
                                      round(r["error_vs_knee"], 3)) for r in limits]})
    return row


def plan_only(name: str, args: argparse.Namespace, sp: Splits) -> dict[str, Any]:
    """The analysis, the limit pass, and what ``prune --macs`` makes at ``--peers-at`` and at the limit (the plan
    pass, compensated, rewritten, repaired), on the test split: the study's "plan pass" column alone."""
    _, _, base, ws = analyzed_model(name, args, sp)
    ws = LimitPass(LimitPassOptions(tolerance=TOLERANCE, holdout=args.holdout, confidence=args.confidence))(ws).workspace
    assert ws.limit is not None
    rows = []
    for red in sorted({*args.peers_at, round(ws.limit.macs_reduction, 3)}):
        rows.append({"target": red, **planned_point(ws, red, sp.test)})
        log(name, rows[-1])
    return {"model": name, "base": base, "limit": ws.limit.macs_reduction, "rows": rows}


def cost_only(name: str, args: argparse.Namespace, sp: Splits) -> dict[str, Any]:
    """The analysis and the limit pass at the default confidence, timed: what calibrating costs against one analysis."""
    _, _, _, ws = analyzed_model(name, args, sp)
    assert ws.analysis is not None
    lim = LimitPass(LimitPassOptions(tolerance=TOLERANCE, holdout=args.holdout))(ws).workspace.limit
    assert lim is not None
    row = {"model": name, "analysis_seconds": ws.analysis.meta.get("seconds"), "limit_seconds": lim.seconds,
           "ratio": lim.seconds / float(ws.analysis.meta.get("seconds", 1.0)), "points": len(lim.points),
           "samples": [p.samples for p in lim.points], "limit": lim.macs_reduction, "confidence": lim.confidence}
    log(name, row)
    return row


def run_model(name: str, args: argparse.Namespace, sp: Splits) -> dict[str, Any]:
    t0 = time.perf_counter()
    module, path, base, ws = analyzed_model(name, args, sp)
    train, test, cal = sp.train, sp.test, sp.cal
    log(name, "trained, exported and analysed", f"{time.perf_counter() - t0:.0f} s")
    folded = path.with_name(f"{name}.fold.onnx")
    models.export_onnx(module, folded, bn="fold")
    assert ws.analysis is not None
    ws = LimitPass(LimitPassOptions(tolerance=TOLERANCE, finetune_epochs=args.finetune_epochs, holdout=args.holdout,
                                    confidence=args.confidence))(ws).workspace
    lim = ws.limit
    assert lim is not None
    log(name, *lim.lines())
    fam = Family(ws)
    targets = sorted({*args.grid, round(lim.spectral_macs_reduction, 3), round(lim.macs_reduction, 3)})
    points = []
    for red in targets:
        b = lim.budget if math.isclose(red, round(lim.macs_reduction, 3)) else (
            lim.spectral_budget if math.isclose(red, round(lim.spectral_macs_reduction, 3)) else fam.budget_for(red))
        p = graphprune_point(fam, b, test, train, args.finetune_epochs)
        p["target"] = red
        points.append(p)
        log(name, "graphprune", p)
    noft = knee(points, "accuracy", base, TOLERANCE)
    ft = knee(points, "accuracy_finetuned", base, TOLERANCE) if args.finetune_epochs > 0 else None
    peers = []
    for red in sorted({*args.peers_at, *([round(lim.macs_reduction, 3)] if args.peers_at_limit else [])}):
        if red <= 1.01:
            continue
        gp = min(points, key=lambda p: abs(p["macs_reduction"] - red))
        row: dict[str, Any] = {"target": red, "graphprune": {"macs_reduction": gp["macs_reduction"], "accuracy": gp["accuracy"]}}
        row["graphprune_plan"] = planned_point(ws, red, test)
        try:
            row["torch_pruning"] = torch_pruning_best(copy.deepcopy(module), cal, test, red)
        except Exception as exc:  # noqa: BLE001 - a peer failing is a result, not a crash
            row["torch_pruning"] = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            row["onnxsim"] = onnxsim_point(folded, cal, test, red)
        except Exception as exc:  # noqa: BLE001
            row["onnxsim"] = {"error": f"{type(exc).__name__}: {exc}"}
        peers.append(row)
        log(name, "peers", row)
    out = {"model": name, "base": base, "limit": lim.to_dict(), "analysis_seconds": ws.analysis.meta.get("seconds"),
           "limit_seconds": lim.seconds, "points": points, "knee": noft, "knee_finetuned": ft, "peers": peers,
           "finetune_epochs": args.finetune_epochs, "train_epochs": args.epochs, "test_samples": len(test),
           "calibration": args.calibration, "calibration_samples": len(cal),
           "seconds": time.perf_counter() - t0}
    try:
        plot(out, Path(f"benchmarks/limit_{name}.png"))
    except Exception as exc:  # noqa: BLE001 - the figures are in the JSON; --replot draws again
        log("plot failed:", exc)
    return out


def plot(r: dict[str, Any], path: Path) -> None:
    from graphprune.report.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    pts = sorted(r["points"], key=lambda p: p["macs_reduction"])
    xs = [1.0, *(p["macs_reduction"] for p in pts)]
    ax.plot(xs, [r["base"], *(p["accuracy"] for p in pts)], "o-", label="graphprune, no fine-tuning (test)")
    if r["knee_finetuned"] is not None:
        ax.plot(xs, [r["base"], *(p["accuracy_finetuned"] for p in pts)], "s-",
                label=f"graphprune, {r['finetune_epochs']:g} epoch fine-tuning (test)")
    lim = r["limit"]
    cal = sorted(lim["points"], key=lambda p: p["macs_reduction"])
    ax.plot([p["macs_reduction"] for p in cal], [p["quality"] for p in cal], "k+", ms=9, label="calibration points (" + ("val: never trained on" if r.get("calibration") == "val" else "held-out train") + ")")
    for row in r["peers"]:
        for key, style, label in (("torch_pruning", "x", "Torch-Pruning best + BN re-est."), ("onnxsim", "d", "onnxsim Wanda (+refit)")):
            v = row.get(key, {})
            if v.get("accuracy") is not None:
                ax.plot(v["macs_reduction"], v["accuracy"], style, color="#d63031" if key == "torch_pruning" else "#e17055",
                        ms=8, label=label if row is r["peers"][0] else None)
    ax.axhline(r["base"], color="k", lw=0.8, ls=":")
    ax.axhspan(r["base"] - TOLERANCE, r["base"], color="#55efc4", alpha=0.2, lw=0, label="within 1 pp")
    ax.axvline(lim["spectral_macs_reduction"], color="#e17055", ls="--", label=f"spectral estimate {lim['spectral_macs_reduction']:.2f}x")
    ax.axvline(lim["macs_reduction"], color="#0984e3", label=f"calibrated limit {lim['macs_reduction']:.2f}x")
    ax.axvline(r["knee"]["knee"], color="#2d3436", ls="-.", label=f"measured knee {r['knee']['knee']:.2f}x")
    if lim.get("finetuned"):
        ax.axvline(lim["finetuned"]["macs_reduction"], color="#6c5ce7", ls=":", lw=1.5,
                   label=f"predicted fine-tuned limit {lim['finetuned']['macs_reduction']:.2f}x")
    if r["knee_finetuned"] is not None:
        ax.axvline(r["knee_finetuned"]["knee"], color="#6c5ce7", ls="-.", lw=1,
                   label=f"measured fine-tuned knee {r['knee_finetuned']['knee']:.2f}x")
    ax.set_xscale("log")
    ax.set_xlabel("MACs reduction (x)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(max(0.0, min(r["base"] - 0.25, ax.get_ylim()[0])), r["base"] + 0.02)
    ax.set_title(f"{r['model']} on Fashion-MNIST: accuracy vs MACs reduction", fontsize=9)
    ax.legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: knee vs estimates per model, and the peers at the same MACs before fine-tuning."""
    rows = ["| model | base | spectral estimate | calibrated limit (test acc. there) | measured knee, no FT | error | "
            "predicted FT limit | measured FT knee | error | calibration cost |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lim, k, kf = r["limit"], r["knee"], r["knee_finetuned"]
        at = next((p for p in r["points"] if math.isclose(p["budget"], lim["budget"])), None)
        ft = lim.get("finetuned")
        err = 100 * (lim["macs_reduction"] / k["knee"] - 1)
        ft_cell = f"{'>= ' if ft and ft['bounded'] else ''}{ft['macs_reduction']:.2f}x" if ft else "-"
        kf_cell = f"{'>= ' if kf['bounded'] else ''}{kf['knee']:.2f}x" if kf else "-"
        ft_err = f"{100 * (ft['macs_reduction'] / kf['knee'] - 1):+.0f}%" if ft and kf else "-"
        cost = f"{r['limit_seconds'] / r['analysis_seconds']:.1f}x the analysis ({len(lim['points'])} points)"
        rows.append(f"| {r['model']} | {r['base']:.4f} | {lim['spectral_macs_reduction']:.2f}x | {lim['macs_reduction']:.2f}x "
                    f"({at['accuracy']:.4f}) | {'>= ' if k['bounded'] else ''}{k['knee']:.2f}x | {err:+.0f}% | {ft_cell} | {kf_cell} | "
                    f"{ft_err} | {cost} |" if at else "")
    rows += ["", "| model | target | graphprune budget family | graphprune plan pass | Torch-Pruning best + BN re-est. | "
             "onnxsim Wanda (refit) |", "|---|---|---|---|---|---|"]
    for r in results:
        for row in r["peers"]:
            g, tp, osim = row["graphprune"], row.get("torch_pruning", {}), row.get("onnxsim", {})

            def cell(v: dict[str, Any], extra: str = "") -> str:
                if v.get("accuracy") is None:
                    return v.get("error", v.get("note", "-"))[:60]
                return f"{v['accuracy']:.4f} at {v['macs_reduction']:.2f}x{extra}"

            tp_extra = f" ({tp['criterion']})" if "criterion" in tp else ""
            os_extra = f" (plain {osim['wanda']:.4f})" if "wanda" in osim else ""
            plan = row.get("graphprune_plan", {})
            rows.append(f"| {r['model']} | {row['target']:.2f}x | {cell(g)} | {cell(plan)} | {cell(tp, tp_extra)} | "
                        f"{cell(osim, os_extra)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    parser.add_argument("--epochs", type=float, default=3.0, help="training epochs (0: untrained, a smoke run of the script)")
    parser.add_argument("--finetune-epochs", type=float, default=0.25)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/limit.json"))
    parser.add_argument("--holdout", type=int, default=LimitPassOptions.holdout,
                        help="held-out training images each calibration point is evaluated on")
    parser.add_argument("--calibration", choices=("val", "train"), default="val",
                        help="val: models trained on 55,000 training images, calibrated on the other 5,000 (never trained "
                             "on); train: trained on all 60,000, calibrated on 4,096 of them")
    parser.add_argument("--grid", type=float, nargs="+", default=list(GRID), help="MACs reductions of the test curve")
    parser.add_argument("--test-samples", type=int, default=10000, help="test images (a seeded subset when fewer than 10,000)")
    parser.add_argument("--peers-at", type=float, nargs="*", default=[2.0], help="MACs reductions of the side-by-side")
    parser.add_argument("--peers-at-limit", action=argparse.BooleanOptionalAction, default=True,
                        help="also compare at the calibrated limit")
    parser.add_argument("--replot", action="store_true", help="only redraw the plots from --json and print the table")
    parser.add_argument("--confidence", type=float, default=LimitPassOptions.confidence,
                        help="the limit pass's confidence (0.5: the measured drop alone; 0: the default, 0.8 on held-out images)")
    parser.add_argument("--limit-only", action="store_true",
                        help="only the analysis, the limit pass at each --confidences, the test accuracy at each limit and "
                             "the no-fine-tune knee (no fine-tuning, peers or plots), written to --limit-json")
    parser.add_argument("--confidences", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--limit-json", type=Path, default=Path("benchmarks/limit_confidence.json"))
    parser.add_argument("--cost-only", type=Path, metavar="JSON",
                        help="only time the analysis and the limit pass per model, written to this JSON")
    parser.add_argument("--plan-only", type=Path, metavar="JSON",
                        help="only the plan pass at --peers-at and at the limit per model, written to this JSON")
    args = parser.parse_args()
    for out, measure in ((args.plan_only, plan_only), (args.cost_only, cost_only)):  # one part of the study alone
        if out:
            sp = splits(args.calibration, args.test_samples)
            out.write_text(json.dumps({"rows": [measure(name, args, sp) for name in args.models]}, indent=1, default=float))
            log("wrote", out)
            return
    if args.limit_only:
        sp = splits(args.calibration, args.test_samples)
        rows = json.loads(args.limit_json.read_text())["rows"] if args.limit_json.exists() else []
        for name in args.models:
            row = limit_only(name, args, sp)
            rows = [r for r in rows if r["model"] != name] + [row]
            args.limit_json.write_text(json.dumps({"rows": rows, "tolerance": TOLERANCE}, indent=1, default=float))
        log("wrote", args.limit_json)
        return
    if args.replot:
        results = json.loads(args.json.read_text())["models"]
        for r in results:
            plot(r, Path(f"benchmarks/limit_{r['model']}.png"))
        print(table(results))
        return
    sp = splits(args.calibration, args.test_samples)
    done = json.loads(args.json.read_text())["models"] if args.json.exists() else []
    for name in args.models:
        done = [r for r in done if r["model"] != name] + [run_model(name, args, sp)]
        args.json.write_text(json.dumps({"models": done, "tolerance": TOLERANCE}, indent=1, default=float))
    log("wrote", args.json)
    print(table(done))


if __name__ == "__main__":
    main()
