"""Does the weight form decide the refit's accuracy? One hierarchical plan by MACs, refitted in fp32 and in int8 QDQ.

Run: OMP_NUM_THREADS=1 python benchmarks/refit_forms.py [--model mobilenetv2] [--epochs 3] [--macs 0.5]
     [--json benchmarks/refit_forms.json]

The trained reference model (cached; BatchNorm folded) is taken as fp32, as int8 QDQ with 8-bit weights and as
int8 QDQ with 7-bit weights (``reduce_range``, graphprune's quantize default; uint8 activations in both); each goes
through analyze -> hierarchical plan by MACs (past the limit allowed, as ``benchmarks/deploy.py``'s QDQ rows) ->
compensate (the sequential refit) -> rewrite -> repair, with no retraining, and is scored on the test images. Each
form is analysed and planned on its own, so the plans may differ slightly; the kept counts are printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from graphprune import models
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.backends.quantize import QuantizeOptions, quantize_onnx
from graphprune.frontends.onnx import load_onnx
from graphprune.models.fashion import fashion_mnist, trained
from graphprune.pipeline.passes import (
    AnalyzePass,
    AnalyzePassOptions,
    CompensateOptions,
    CompensatePass,
    PlanPass,
    RepairPass,
    RewriteOptions,
    RewritePass,
)
from graphprune.pipeline.workspace import Workspace
from graphprune.planning.options import PlanOptions

FORMS = ("fp32", "int8, 8-bit weights", "int8, 7-bit weights")


def refit(model: OnnxPrunable, train: Any, test: Any, macs: float, samples: int) -> dict[str, Any]:
    """Plan by MACs, refit, rewrite and repair one form; its accuracy before and after, and the kept counts."""
    ws = Workspace(original=model, model=model, data=train)
    ws = AnalyzePass(AnalyzePassOptions(samples=samples))(ws).workspace
    ws = PlanPass(PlanOptions(method="hierarchical", criterion="effective", macs=macs, allow_over_limit=True))(ws).workspace
    assert ws.plan is not None
    kept = sorted((len(g.keep), g.channels) for g in ws.plan.groups)
    ws = CompensatePass(CompensateOptions(samples=samples))(ws).workspace
    ws = RewritePass(RewriteOptions(verify=True))(ws).workspace
    refitted = ws.model.accuracy(test)
    ws = RepairPass(CompensateOptions(samples=samples))(ws).workspace
    return {"original": model.accuracy(test), "refit": refitted, "refit_repair": ws.model.accuracy(test), "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--test-samples", type=int, default=3000)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("refit_forms.json"))
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    train = fashion_mnist("train").subset(8192, seed=0)
    test = fashion_mnist("test").subset(args.test_samples, seed=0)
    module = trained(args.model, args.epochs, cache_dir="benchmarks/.cache")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.model}.onnx"
        models.export_onnx(module, path, bn="fold")
        om = load_onnx(path)
    forms = {"fp32": OnnxPrunable(om),
             "int8, 8-bit weights": OnnxPrunable(quantize_onnx(om, train.subset(256), QuantizeOptions(reduce_range=False))),
             "int8, 7-bit weights": OnnxPrunable(quantize_onnx(om, train.subset(256), QuantizeOptions(reduce_range=True)))}
    rows = {}
    for name, model in forms.items():
        print(f"[refit_forms] {name}", flush=True)
        rows[name] = refit(model, train, test, args.macs, args.samples)
    table = Table(title=f"{args.model}: hierarchical plan by MACs ({args.macs}), sequential refit, no retraining")
    for col in ("form", "original", "refit", "refit + repair", "kept / channels"):
        table.add_column(col)
    for name, r in rows.items():
        table.add_row(name, f"{r['original']:.4f}", f"{r['refit']:.4f}", f"{r['refit_repair']:.4f}",
                      " ".join(f"{k}/{c}" for k, c in r["kept"]))
    Console().print(table)
    args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
