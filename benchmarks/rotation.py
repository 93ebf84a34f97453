"""The hidden size through rotation: Fashion-MNIST ViT accuracy vs kept hidden fraction, before fine-tuning.

Run: nice -n 10 python benchmarks/rotation.py [--epochs 2] [--samples 512] [--finetune-epochs 1 --only 0.5 0.25 --out F]
     [--ort-optimized]: the export after onnxruntime.transformers.optimizer (SkipLayerNormalization, BiasGelu), with
     each sliced model timed against it (batch 32, one thread, interleaved rounds, one session alive at a time)

1. Train the reference ViT (``models.ViT``: pre-LN, hidden 32, 2 blocks, 16 patches) on Fashion-MNIST (cached),
   export it to ONNX (opset 17: LayerNormalization, RMS norms decomposed).
2. For each kept fraction (and two energy targets): the hidden pass (PCA basis on --samples training images),
   test accuracy on the 10,000 test images, top-1 agreement and output error against the original.
3. The same widths with a random orthogonal basis instead of the PCA one (the baseline that shows what the PCA buys).
4. Optionally, a brief fine-tune (labels, through the interpreter) of each sliced model.
Writes benchmarks/rotation.json. Needs: apt-get install -y dataset-fashion-mnist.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
from common import interleaved_ms  # benchmarks/ (same folder)
from rich.console import Console
from rich.table import Table

from graphprune import models
from graphprune.analysis.cost import model_cost
from graphprune.backends.onnx_rotation import rotatable, rotate_onnx, slice_hidden
from graphprune.coupling.stream import find_stream
from graphprune.execution.measure import ort_accuracy
from graphprune.execution.onnx_finetune import finetune_onnx
from graphprune.execution.training import FitOptions
from graphprune.frontends.onnx import load_onnx
from graphprune.ir.onnx import model_bytes
from graphprune.models.fashion import fashion_mnist, trained
from graphprune.recovery.rotation import HiddenOptions

HERE = Path(__file__).resolve().parent
console = Console(width=130)


def ort_optimized(path: Path) -> Path:
    """The ViT export after onnxruntime's transformer optimizer."""
    from onnxruntime.transformers.optimizer import optimize_model

    out = path.with_suffix(".ort.onnx")
    optimize_model(str(path), model_type="vit", num_heads=4, hidden_size=32).save_model_to_file(str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--finetune-epochs", type=float, default=0.0)
    ap.add_argument("--only", type=float, nargs="+", help="only these kept fractions (no energy targets)")
    ap.add_argument("--ort-optimized", action="store_true", help="slice the export after onnxruntime's optimizer, and time it")
    ap.add_argument("--out", type=Path, default=HERE / "rotation.json")
    args = ap.parse_args()
    cache = HERE / ".cache"
    t0 = time.time()
    net = trained("vit", epochs=args.epochs, lr=args.lr, cache_dir=cache)
    path = cache / f"vit-e{args.epochs:g}.onnx"
    models.export_onnx(net, path)
    om = load_onnx(ort_optimized(path) if args.ort_optimized else path)
    train, test = fashion_mnist("train"), fashion_mnist("test")
    base = ort_accuracy(model_bytes(om.model), test)
    console.print(f"ViT trained {args.epochs:g} epochs ({time.time() - t0:.0f} s): test accuracy {base:.4f}")
    prepped = rotatable(om)[0]  # what slice_hidden walks (each constant use its own, fused norms' sums out, norms fused)
    stream = find_stream(prepped.graph)
    rows = []
    settings = [{"keep": f} for f in (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)] + [{"energy": e} for e in (0.999, 0.99, 0.95)]
    if args.only:
        settings = [{"keep": f} for f in args.only]
    rng = np.random.default_rng(0)
    for setting in settings:
        opts = HiddenOptions(samples=args.samples, eval_samples=len(test), **setting)
        t1 = time.time()
        sliced, rep = slice_hidden(om, train, test, opts)
        seconds = time.time() - t1
        random_basis = np.linalg.qr(rng.standard_normal((stream.width, stream.width)))[0][:, :rep.kept]
        random_acc = ort_accuracy(model_bytes(rotate_onnx(prepped, stream, random_basis).model), test)
        cost = model_cost(sliced.graph)
        row = {"setting": setting, **dataclasses.asdict(rep), "params": cost.params, "macs": cost.macs,
               "random_basis_accuracy": random_acc, "seconds": seconds}
        if args.ort_optimized:
            ms = interleaved_ms({"original": model_bytes(om.model), "sliced": model_bytes(sliced.model)}, test.inputs[0][:32])
            row.update(original_ms=ms["original"], sliced_ms=ms["sliced"],
                       sliced_ops=sorted({n.op_type for n in sliced.model.graph if "Normalization" in n.op_type}))
        if args.finetune_epochs > 0 and rep.kept < stream.width:
            tuned = finetune_onnx(sliced, train, FitOptions(epochs=args.finetune_epochs, lr=0.01, seed=0))
            row["finetuned_accuracy"] = ort_accuracy(model_bytes(tuned.model), test)
        rows.append(row)
        console.print(f"{setting}: kept {rep.kept}/{rep.width}, accuracy {rep.accuracy_after:.4f} (random basis {random_acc:.4f}), "
                      f"discarded energy {rep.discarded_energy:.4f}, {seconds:.1f} s")
    base_cost = model_cost(om.graph)
    table = Table(title=f"ViT on Fashion-MNIST: hidden size by rotation, before fine-tuning (base accuracy {base:.4f})")
    for col in ("setting", "kept / 32", "params", "discarded energy", "rel. error", "top-1 agreement", "accuracy", "random basis",
                *(("fine-tuned",) if args.finetune_epochs > 0 else ()), *(("speed-up b32",) if args.ort_optimized else ())):
        table.add_column(col, justify="right")
    for r in rows:
        tuned = (f"{r['finetuned_accuracy']:.4f}" if "finetuned_accuracy" in r else "-",) if args.finetune_epochs > 0 else ()
        if args.ort_optimized:
            ratio = r["original_ms"] / r["sliced_ms"]
            tuned += (f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower",)
        table.add_row(", ".join(f"{k} {v}" for k, v in r["setting"].items()), str(r["kept"]), f"{r['params'] / base_cost.params:.3f}",
                      f"{r['discarded_energy']:.4f}", f"{r['relative_error']:.3g}", f"{r['agreement']:.4f}",
                      f"{r['accuracy_after']:.4f}", f"{r['random_basis_accuracy']:.4f}", *tuned)
    console.print(table)
    doc = {"model": "models.ViT (dim 32, depth 2, heads 4, mlp 64, patch 7), pre-LN", "epochs": args.epochs, "lr": args.lr,
           "ort_optimized": args.ort_optimized,
           "base_accuracy": base, "base_params": base_cost.params, "base_macs": base_cost.macs,
           "calibration_samples": args.samples, "test_samples": len(test), "finetune_epochs": args.finetune_epochs,
           "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, onnxruntime CPU", "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
