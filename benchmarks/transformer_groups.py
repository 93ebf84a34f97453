"""Coupling groups (prunable / frozen) and parameters kept at --ratio 0.5 on transformer exports.

Exports the reference transformers (ViT, GPT-2-, BERT- and Llama-style) with
the TorchScript (legacy) and dynamo exporters, their onnxruntime-optimized
forms (``onnxruntime.transformers.optimizer``), and, when Hugging Face
``transformers`` is installed, BERT / GPT-2 / ViT built from small configs
(no weights downloaded). Then counts groups and prunes each at ratio 0.5
with exactness checked, with whichever graphprune is importable, so the
same files can be counted before and after a change::

    PYTHONPATH=. python benchmarks/transformer_groups.py --dir /tmp/tfb --label after
    PYTHONPATH=/path/to/main python benchmarks/transformer_groups.py --dir /tmp/tfb --label before --no-export

Results merge into benchmarks/transformer_groups.json under the label.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("transformer_groups.json")
ORT_TYPES = {"bert": "bert", "gpt2": "gpt2", "vit": "vit", "llama": "gpt2", "hf-bert": "bert", "hf-bert-mask": "bert", "hf-gpt2": "gpt2", "hf-vit": "vit"}


def export_all(root: Path) -> None:
    from graphprune import models

    root.mkdir(parents=True, exist_ok=True)
    for name in ("vit", "gpt2", "bert", "llama"):
        for dynamo in (False, True):
            path = root / f"{name}-{'dynamo' if dynamo else 'legacy'}.onnx"
            if path.exists():
                continue
            opset = 18 if dynamo else 17
            if name == "vit":
                models.export_onnx(models.build(name), path, opset=opset, dynamo=dynamo)
            else:
                models.export_tokens(models.build(name), path, opset=opset, dynamo=dynamo)
    _export_hf(root)
    for path in sorted(root.glob("*-legacy.onnx")):
        name = path.name.removesuffix("-legacy.onnx")
        out = root / f"{name}-ort.onnx"
        if name in ORT_TYPES and not out.exists():
            heads, hidden = (4, 64) if name.startswith("hf-") else (4, 32)
            cmd = [sys.executable, "-m", "onnxruntime.transformers.optimizer", "--input", str(path), "--output", str(out),
                   "--model_type", ORT_TYPES[name], "--num_heads", str(heads), "--hidden_size", str(hidden)]
            subprocess.run(cmd, check=True, capture_output=True)


def _export_hf(root: Path) -> None:
    """BERT / GPT-2 / ViT from Hugging Face configs (random weights), legacy exporter, eager attention; ``hf-bert-mask``
    is BERT with ``attention_mask`` as a second input (onnxruntime's optimizer then fuses its attention)."""
    try:
        import torch
        import transformers as hf
    except ImportError:
        return
    torch.manual_seed(0)
    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 128}
    builders = {
        "hf-bert": (lambda: hf.BertModel(hf.BertConfig(vocab_size=100, **small), add_pooling_layer=True), "ids"),
        "hf-bert-mask": (lambda: hf.BertModel(hf.BertConfig(vocab_size=100, **small), add_pooling_layer=True), "ids+mask"),
        "hf-gpt2": (lambda: hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=128)), "ids"),
        "hf-vit": (lambda: hf.ViTForImageClassification(hf.ViTConfig(image_size=28, patch_size=7, num_channels=1, num_labels=10, **small)), "image"),
    }
    class Wrapped(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, kind: str) -> None:
            super().__init__()
            self.inner, self.kind = inner, kind

        def forward(self, x: torch.Tensor, *mask: torch.Tensor) -> torch.Tensor:
            if self.kind == "image":
                return self.inner(pixel_values=x).logits
            if mask:
                return self.inner(input_ids=x, attention_mask=mask[0]).last_hidden_state
            out = self.inner(input_ids=x, use_cache=False) if "GPT2" in type(self.inner).__name__ else self.inner(input_ids=x)
            return out.logits if hasattr(out, "logits") else out.last_hidden_state

    for name, (build, kind) in builders.items():
        if (root / f"{name}-legacy.onnx").exists() or (root / f"{name}-dynamo.onnx").exists():
            continue
        inner = build()
        inner.config._attn_implementation = "eager"
        model = Wrapped(inner.eval(), kind).eval()
        x = torch.randn(2, 1, 28, 28) if kind == "image" else torch.randint(0, 100, (2, 16))
        axes = {0: "batch"} if kind == "image" else {0: "batch", 1: "seq"}
        args, names = ((x, torch.ones_like(x)), ["input", "attention_mask"]) if kind == "ids+mask" else ((x,), ["input"])
        errors = []
        for dynamo in (False, True):
            path = root / f"{name}-{'dynamo' if dynamo else 'legacy'}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    if dynamo:
                        dims = {k: torch.export.Dim(v, min=2, max=64) for k, v in axes.items()}
                        torch.onnx.export(model, args, str(path), input_names=names, output_names=["out"],
                                          opset_version=18, dynamic_shapes=tuple(dims for _ in args), dynamo=True, verbose=False)
                    else:
                        torch.onnx.export(model, args, str(path), input_names=names, output_names=["out"],
                                          opset_version=17, dynamic_axes={n: axes for n in names}, dynamo=False)
                    break
                except Exception as exc:  # noqa: BLE001 - a failed export is a result to report
                    errors.append(f"{'dynamo' if dynamo else 'legacy'}: {str(exc).splitlines()[0][:300]}")
                    path.unlink(missing_ok=True)
        if errors:
            (root / f"{name}.export-error.txt").write_text("\n".join(errors) + "\n")


def count(root: Path) -> dict[str, Any]:
    from graphprune.coupling.groups import build_groups
    from graphprune.frontends.onnx import load_onnx
    from graphprune.pipeline.run import prune_file

    rows: dict[str, Any] = {}
    for path in sorted(root.glob("*.onnx")):
        if ".pruned" in path.name:
            continue
        row: dict[str, Any] = {}
        try:
            coupling = build_groups(load_onnx(path).graph)
            row["prunable"] = len(coupling.prunable)
            row["frozen"] = len(coupling.groups) - len(coupling.prunable)
            t = time.perf_counter()
            result = prune_file(path, path.with_suffix(".pruned.onnx"), ratio=0.5, verify=True, latency_runs=0, force=True)
            row["params_kept"] = round(result.after.params / result.before.params, 3)
            row["exact"] = result.validation.exact
            row["max_abs_error"] = result.validation.max_abs_error
            row["prune_s"] = round(time.perf_counter() - t, 1)
        except Exception as exc:  # noqa: BLE001 - a failure is a result to report
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows[path.stem] = row
        print(path.stem, row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="folder for the exported models")
    ap.add_argument("--label", required=True, help="key of these results in the JSON (e.g. before / after)")
    ap.add_argument("--no-export", action="store_true", help="count the files already in --dir")
    args = ap.parse_args()
    if not args.no_export:
        export_all(args.dir)
    doc = json.loads(OUT.read_text()) if OUT.exists() else {}
    doc[args.label] = count(args.dir)
    OUT.write_text(json.dumps(doc, indent=1, default=str) + "\n")


if __name__ == "__main__":
    # benchmarks/transformers.py would shadow Hugging Face ``transformers``: this folder leaves the import path.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    main()
