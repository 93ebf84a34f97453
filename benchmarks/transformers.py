"""Transformers at 2x fewer parameters (issue 17): graphprune against Torch-Pruning 1.6 and onnxsim 0.8.1.

Run: nice -n 15 python benchmarks/transformers.py [--models vit lm] [--epochs 5] [--lm-epochs 8]
     [--finetune-epochs 0.25] [--params 0.5] [--json benchmarks/transformers.json] [--smoke]

Data.
- ``vit``: the reference ``models.ViT`` (dim 32, depth 2, 4 heads, mlp 64, 16 patches, mean pooling) trained on the
  Fashion-MNIST training split with ``graphprune.models.fashion.trained`` (cached in benchmarks/.cache); metric: top-1
  accuracy on the 10,000 test images (onnxruntime).
- ``lm``: the reference GPT-2-style causal LM ``models.build("gpt2")`` (dim 32, depth 2, 4 heads, mlp 64, context 64,
  vocabulary 64, tied head) trained here with graphprune's ``fit`` (cached in benchmarks/.cache) on the King James
  Bible of the Debian package ``bible-kjv-text`` (public domain; ``apt-get install -y bible-kjv-text``; its files,
  ``/usr/lib/bible.data*``, are compressed and read with the ``bible`` reader of ``bible-kjv``:
  ``bible -f gen1:1-rev22:21``, one verse a line). Tokenisation: character level, lower-cased, verse references dropped,
  the 38 symbols of ``ALPHABET`` (newline, space, a-z, punctuation) plus one unknown id (vocabulary 39 of the model's 64).
  Split: the verses in blocks of 100, every 10th block held out (10%), the rest for training; samples are
  non-overlapping 65-character windows (inputs: the first 64 ids, labels: the next-character ids), the first
  ``--lm-windows`` of the training text (from Genesis on) and an eighth as many of the held-out text. Metric: per-token
  perplexity on those held-out windows (onnxruntime).

Methods, all planned or bisected to the same parameter count (``--params`` of the original's, counted on the ONNX
export by graphprune's cost model), measured before fine-tuning and after the same brief fine-tuning (SGD, labels,
``--finetune-epochs``, lr ``FT_LR``):
- graphprune: effective-filter analysis, hierarchical plan with a params target, compensation, rewrite, repair (heads
  and feed-forward through the normal ONNX path); and the same with the hidden size rotated and sliced to
  ``--hidden`` of its width (the ``hidden`` pass), the channel target bisected so the total is the same. Fine-tuned
  with ``FineTunePass`` (through the interpreter). With ``--ort-input`` (on by default) both rows again with the
  onnxruntime-optimized export as graphprune's input (fused ``SkipLayerNormalization``, ``BiasGelu``...: the file a
  deployment engineer ships), "(on the ORT-optimized file)".
- Torch-Pruning 1.6 ``MetaPruner`` on the torch model, L2 magnitude, whole heads (``num_heads``,
  ``prune_num_heads``, ``head_pruning_ratio`` = ``pruning_ratio``) with feed-forward and hidden size at
  ``pruning_ratio``, the ratio bisected; fine-tuned in torch with the same epochs and lr.
- onnxsim 0.8.1 on the same ONNX: ``apply_structured_wanda_pruning`` (sparsity bisected), ``apply_transformer_block_pruning``
  (sparsity bisected), and ``apply_attention_head_pruning`` on the onnxruntime-fused model (its ``Attention`` ops; heads
  only, so at the parameter count that reaches). Fine-tuned by ``FineTunePass`` on their ONNX when it loads and runs
  in the interpreter, else the row says why ("no fine-tuning path"). A failure is an error row.
At equal measured latency (``--equal-latency``, on by default): for each peer row that removed something,
graphprune heads + feed-forward, and the same with the hidden size at ``--hidden``, each with its params target
bisected so that, ORT-optimized and timed interleaved with that peer's model at every step, it is no slower; then
compensated, repaired, scored and fine-tuned like the other rows, and the pair timed once more in one interleaved
run (``interleaved_ms``).
Each model is also run through ``onnxruntime.transformers.optimizer`` (model type vit / gpt2, the original's heads and
hidden size given; the optimizer uses the values it detects where they differ) and timed against the original the same way (median ms, batch ``LAT_BATCH``, on a shared machine); and the
coupling groups (prunable / frozen) of the exports are counted with ``benchmarks/transformer_groups.py``'s ``count``.
Goals are reported, not tuned to. Needs: apt-get install -y dataset-fashion-mnist bible-kjv-text;
pip install torch==2.13.0 torch-pruning==1.6.* onnxsim==0.8.1.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from common import analyzed_workspace, load_onnx_bytes  # benchmarks/ (same folder)
from common import interleaved_ms as common_interleaved_ms
from rich.console import Console
from rich.table import Table
from torch import nn

from graphprune import models
from graphprune.analysis.cost import model_cost
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.execution.measure import ort_accuracy
from graphprune.execution.sessions import make_session, measure_latency
from graphprune.execution.training import FitOptions, fit
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx
from graphprune.ir.onnx import model_bytes
from graphprune.models.fashion import fashion_mnist, trained
from graphprune.pipeline.passes import (
    CompensateOptions,
    CompensatePass,
    FineTunePass,
    HiddenPass,
    PlanPass,
    RepairPass,
    RewriteOptions,
    RewritePass,
    Workspace,
)
from graphprune.planning.options import PlanOptions
from graphprune.recovery.rotation import HiddenOptions

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
ALPHABET = "\n abcdefghijklmnopqrstuvwxyz.,;:!?'()-"
WINDOW = 64
FT_LR = 0.01
LAT_BATCH = 32
console = Console(width=150)


def log(*args: Any) -> None:
    console.print(time.strftime("%H:%M:%S"), *args, highlight=False)


@dataclasses.dataclass
class Task:
    """One model and its data: ``lm`` scores by perplexity (lower is better), else by accuracy."""

    name: str
    module: nn.Module
    train: Calibration
    test: Calibration
    calib: Calibration
    lm: bool

    @property
    def metric(self) -> str:
        return "perplexity" if self.lm else "accuracy"


# ---------------------------------------------------------------- data and models

def kjv_verses() -> list[str]:
    """The King James Bible, one lower-cased verse a line, references dropped (bible-kjv-text, via ``bible``)."""
    out = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    return [line.split(" ", 1)[1].lower() for line in out.splitlines() if " " in line]


def kjv_windows(verses: list[str], held_out: bool, limit: int) -> Calibration:
    """Non-overlapping windows of ``WINDOW`` + 1 character ids from the training or held-out blocks of 100 verses."""
    picked = [v for i, v in enumerate(verses) if ((i // 100) % 10 == 9) == held_out]
    table = np.full(256, len(ALPHABET), dtype=np.int64)
    for i, ch in enumerate(ALPHABET):
        table[ord(ch)] = i
    raw = np.frombuffer("\n".join(picked).encode("ascii", "replace"), dtype=np.uint8)
    ids = table[raw]
    n = min(limit, len(ids) // (WINDOW + 1))
    win = ids[:n * (WINDOW + 1)].reshape(n, WINDOW + 1)
    return Calibration((np.ascontiguousarray(win[:, :-1]),), np.ascontiguousarray(win[:, 1:]), f"kjv/{'held-out' if held_out else 'train'}")


def trained_lm(train: Calibration, epochs: float, lr: float) -> nn.Module:
    """The GPT-2-style reference trained on ``train`` (state dict cached by setting)."""
    path = CACHE / f"gpt2-kjv-n{len(train)}-e{epochs:g}-lr{lr:g}.pt"
    model = models.build("gpt2")
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    fit(model, train, FitOptions(epochs=epochs, lr=lr, batch_size=64, seed=0))
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


HELD_OUT = 1024
"""Calibration samples past the analysis's: the plan pass scores its two ways of removing the excess past the
floors on those the compensation leaves (``PlanOptions.excess``)."""


def make_task(name: str, args: argparse.Namespace) -> Task:
    if name == "vit":
        train, test = fashion_mnist("train"), fashion_mnist("test")
        if args.smoke:
            train, test = train.subset(2048), test.subset(1000)
        module = trained("vit", epochs=args.epochs, cache_dir=CACHE) if args.epochs > 0 else models.build("vit")
        return Task("vit", module, train, test, train.subset(args.samples + HELD_OUT, seed=1), lm=False)
    verses = kjv_verses()
    train, test = kjv_windows(verses, False, args.lm_windows), kjv_windows(verses, True, args.lm_windows // 8)
    module = trained_lm(train, args.lm_epochs, args.lm_lr) if args.lm_epochs > 0 else models.build("gpt2")
    return Task("lm", module, train, test, train.subset(args.samples + HELD_OUT, seed=1), lm=True)


def export(task: Task, module: nn.Module, path: Path) -> Path:
    if task.lm:
        models.export_tokens(module, path)
    else:
        models.export_onnx(module, path)
    return path


# ---------------------------------------------------------------- measures

def score(model: bytes, task: Task) -> float:
    """Test accuracy, or held-out per-token perplexity, on onnxruntime."""
    if not task.lm:
        return ort_accuracy(model, task.test)
    session = make_session(model)
    name = session.get_inputs()[0].name
    nll, count = 0.0, 0
    for _, (ids,), labels in task.test.batches(256):
        assert labels is not None
        z = session.run(None, {name: ids})[0].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= float(np.take_along_axis(logp, labels[..., None], -1).sum())
        count += labels.size
    return math.exp(nll / count)


def params_of(model: bytes) -> int:
    return model_cost(load_onnx_bytes(model).graph).params


def ort_settings(task: Task) -> dict[str, Any]:
    """The optimizer's model type and the original's heads / hidden size (it uses the values it detects when they differ)."""
    return {"model_type": "gpt2" if task.lm else "vit", "num_heads": 4, "hidden_size": 32}


def cleaned(model: bytes) -> bytes:
    """The model without initializers no node reads (onnxsim's block pruning leaves them; they are not parameters)."""
    m = onnx.load_from_string(model)
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    keep = [t for t in m.graph.initializer if t.name in used]
    if len(keep) == len(m.graph.initializer):
        return model
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m.SerializeToString()


def ort_optimized(model: bytes, task: Task) -> tuple[bytes, int]:
    """The model after ``onnxruntime.transformers.optimizer``, and its count of fused attention ops."""
    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "opt.onnx"
        src.write_bytes(model)
        opt = optimize_model(str(src), **ort_settings(task))
        opt.save_model_to_file(str(dst))
        fused = sum(n.op_type in ("Attention", "MultiHeadAttention") for n in opt.model.graph.node)
        return dst.read_bytes(), fused


def _ms(optimized: bytes, task: Task, runs: int) -> float:
    session = make_session(optimized, threads=1)
    return measure_latency(session, {session.get_inputs()[0].name: task.test.inputs[0][:LAT_BATCH]}, runs=runs)


def ort_optimized_ms(model: bytes, task: Task, runs: int) -> dict[str, Any]:
    """Median latency (one thread, batch ``LAT_BATCH``) after ``onnxruntime.transformers.optimizer``, and its fused attention ops."""
    optimized, fused = ort_optimized(model, task)
    return {"ort_optimized_ms": _ms(optimized, task, runs), "fused_attention": fused}


def interleaved_ms(models: dict[str, bytes], task: Task, runs: int, rounds: int = 5) -> dict[str, float]:
    """Median ORT-optimized latency of each model over ``rounds`` alternating rounds (one session alive at a time)."""
    optimized = {name: ort_optimized(m, task)[0] for name, m in models.items()}
    return common_interleaved_ms(optimized, task.test.inputs[0][:LAT_BATCH], rounds, max(1, runs // rounds))


def finetune_bytes(model: bytes, task: Task, epochs: float) -> bytes:
    """``FineTunePass`` on an ONNX model (labels, through the interpreter)."""
    om = load_onnx_bytes(model)
    ws = Workspace(original=OnnxPrunable(om), model=OnnxPrunable(om), data=task.train)
    ws = FineTunePass(FitOptions(epochs=epochs, lr=FT_LR, seed=0))(ws).workspace
    assert isinstance(ws.model, OnnxPrunable)
    return model_bytes(ws.model.om.model)


def bisect(value: Callable[[float], tuple[Any, float]], goal: float, lo: float, hi: float, steps: int) -> tuple[Any, float]:
    """The setting in [lo, hi] (larger prunes more) whose kept-params fraction is the largest at or below ``goal``."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        out, frac = value(mid)
        if frac <= goal:
            hi, best = mid, (out, frac)
        else:
            lo = mid
    return best if best is not None else value(hi)


# ---------------------------------------------------------------- graphprune

def analyzed(task: Task, path: Path, samples: int) -> Workspace:
    return analyzed_workspace(load_onnx(path), task.calib, samples, loss="projection" if task.lm else "labels")


def graphprune_model(ws: Workspace, params: float, hidden: float, samples: int, recover: bool = True) -> bytes:
    """Plan at ``params``, compensate, rewrite, repair (unless not ``recover``), then slice the hidden size to ``hidden``."""
    w = dataclasses.replace(ws, model=ws.original)
    if params < 1.0:  # 1: the hidden size only
        w = PlanPass(PlanOptions(params=params, allow_over_limit=True))(w).workspace
        if recover:
            w = CompensatePass(CompensateOptions(samples=samples))(w).workspace
        w = RewritePass(RewriteOptions(verify=False))(w).workspace
        if recover:
            w = RepairPass(CompensateOptions(samples=samples))(w).workspace
    if hidden < 1.0:
        w = HiddenPass(HiddenOptions(keep=hidden, samples=samples, eval_samples=min(256, samples)))(w).workspace
    assert isinstance(w.model, OnnxPrunable)
    return model_bytes(w.model.om.model)


def graphprune_variants(ws: Workspace, base_params: int, args: argparse.Namespace) -> dict[str, Callable[[], bytes]]:
    def with_hidden() -> bytes:
        def at(p: float) -> tuple[float, float]:
            return p, params_of(graphprune_model(ws, 1.0 - p, args.hidden, 64, recover=False)) / base_params
        p, _ = bisect(at, args.params, 0.0, 1.0 - args.params, args.bisect_steps)
        return graphprune_model(ws, 1.0 - p, args.hidden, args.samples)

    return {"graphprune heads+ffn": lambda: graphprune_model(ws, args.params, 1.0, args.samples),
            f"graphprune heads+ffn+hidden {args.hidden:g}": with_hidden}


# ---------------------------------------------------------------- Torch-Pruning

def _attention(module: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(module holding ``heads``, its head-splitting projections) of each attention in the reference models."""
    found: list[tuple[nn.Module, list[nn.Linear]]] = []
    for m in module.modules():
        if hasattr(m, "c_attn"):
            found.append((m, [m.c_attn]))
        elif hasattr(m, "q") and hasattr(m, "heads"):
            found.append((m, [m.q, m.k, m.v]))
    return found


def tp_pruned(task: Task, ratio: float, heads_too: bool) -> nn.Module:
    """MetaPruner at ``ratio`` (L2); whole heads too, or with the attention projections ignored (feed-forward and hidden size)."""
    import torch_pruning as tp

    m = copy.deepcopy(task.module).eval()
    example = torch.from_numpy(task.calib.inputs[0][:2])
    attn = _attention(m)
    heads = {lin: int(owner.heads) * (3 if hasattr(owner, "c_attn") else 1)  # fused QKV: 3 x heads
             for owner, lins in attn for lin in lins} if heads_too else {}
    ignored = [m.lm_head] if task.lm else [m.head]
    if not heads_too:
        ignored += [lin for _, lins in attn for lin in lins]
    unwrapped = [(m.pos, 2)] if hasattr(m, "pos") else None
    pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=ignored, num_heads=dict(heads), prune_num_heads=heads_too, prune_head_dims=False,
                                  head_pruning_ratio=min(ratio, 0.75) if heads_too else 0.0,  # at least one head of 4
                                  unwrapped_parameters=unwrapped)  # num_heads: a copy, TP updates it
    pruner.step()
    for owner, lins in attn if heads_too else ():
        owner.heads = pruner.num_heads[lins[0]] // (heads[lins[0]] // int(owner.heads))  # per attention, not per projection
    return m


def tp_model(task: Task, goal: float, steps: int, tmp: Path, heads_too: bool) -> tuple[bytes, nn.Module]:
    base = sum(p.numel() for p in task.module.parameters())

    def at(r: float) -> tuple[nn.Module, float]:
        m = tp_pruned(task, r, heads_too)
        return m, sum(p.numel() for p in m.parameters()) / base

    m, _ = bisect(at, goal, 0.0, 0.9, steps)
    return export(task, m, tmp / "tp.onnx").read_bytes(), m


def tp_row(task: Task, args: argparse.Namespace, tmp: Path, base_params: int, store: dict[str, bytes] | None = None) -> dict[str, Any]:
    """Torch-Pruning's row: heads, feed-forward and hidden size; without heads (the error noted) when its head pruning fails."""
    held: dict[str, nn.Module] = {}
    notes: dict[str, Any] = {}

    def make() -> bytes:
        try:
            model, held["m"] = tp_model(task, args.params, args.bisect_steps, tmp, heads_too=True)
        except Exception as exc:  # noqa: BLE001 - Torch-Pruning's head pruning fails on some layouts: reported, then without heads
            notes["tp_heads_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            model, held["m"] = tp_model(task, args.params, args.bisect_steps, tmp, heads_too=False)
        return model

    def finetune(_: bytes) -> bytes:
        fit(held["m"], task.train, FitOptions(epochs=args.finetune_epochs, lr=FT_LR, seed=0))
        return export(task, held["m"].eval(), tmp / "tp-ft.onnx").read_bytes()

    row = measured("torch-pruning heads+ffn+hidden", make, task, base_params, args, finetune, store)
    if notes:
        row.update(notes, method="torch-pruning ffn+hidden (heads failed)")
        if store is not None and "torch-pruning heads+ffn+hidden" in store:
            store[row["method"]] = store.pop("torch-pruning heads+ffn+hidden")
    return row


# ---------------------------------------------------------------- onnxsim

def onnxsim_batches(task: Task) -> list[dict[str, np.ndarray]]:
    return [{"input_ids" if task.lm else "input": task.calib.inputs[0][i:i + 64]} for i in range(0, min(256, len(task.calib)), 64)]


def onnxsim_heads(ort_path: Path) -> bytes:
    """``apply_attention_head_pruning`` at 0.5 on the onnxruntime-optimized model (it needs fused attention ops)."""
    import onnxsim

    fused = onnx.load(str(ort_path))
    if not any(n.op_type in ("Attention", "MultiHeadAttention", "GroupQueryAttention") for n in fused.graph.node):
        raise ValueError("no fused attention op in the onnxruntime-optimized model (its attention fusion does not match this "
                         "export), so apply_attention_head_pruning has no head to remove")
    return cleaned(onnxsim.apply_attention_head_pruning(fused, sparsity=0.5).SerializeToString())


def onnxsim_variants(task: Task, path: Path, ort_path: Path, base_params: int, args: argparse.Namespace) -> dict[str, Callable[[], bytes]]:
    import onnxsim

    m = onnx.load(str(path))
    batches = onnxsim_batches(task)

    def bisected(fn: Callable[[float], onnx.ModelProto], hi: float) -> bytes:
        def at(s: float) -> tuple[bytes, float]:
            out = cleaned(fn(s).SerializeToString())
            return out, params_of(out) / base_params
        return bisect(at, args.params, 0.0, hi, args.bisect_steps)[0]

    return {
        "onnxsim structured wanda": lambda: bisected(
            lambda s: onnxsim.apply_structured_wanda_pruning(m, calibration_data=batches, sparsity=s), 0.95),
        "onnxsim transformer blocks": lambda: bisected(
            lambda s: onnxsim.apply_transformer_block_pruning(m, calibration_data=batches, sparsity=s), 1.0),
        "onnxsim attention heads 0.5 (fused)": lambda: onnxsim_heads(ort_path),
    }


# ---------------------------------------------------------------- one model

def measured(name: str, make: Callable[[], bytes], task: Task, base_params: int, args: argparse.Namespace,
             finetune: Callable[[bytes], bytes] | None, store: dict[str, bytes] | None = None) -> dict[str, Any]:
    """One method's row: params kept, score before and after fine-tuning, ORT-optimized latency; errors as a row.

    ``store``: the pruned model (before fine-tuning: latency depends on shapes only) is kept there by method name.
    """
    t = time.perf_counter()
    try:
        model = make()
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result to report
        return {"method": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    if store is not None:
        store[name] = model
    row: dict[str, Any] = {"method": name, "params": params_of(model), "prune_s": time.perf_counter() - t}
    row["params_kept"] = row["params"] / base_params
    if row["params_kept"] > args.params + 0.02 and name != "original":
        row["target_note"] = f"target {args.params:g} not reached"
    row["before"] = score(model, task)
    if args.finetune_epochs > 0:
        try:
            assert finetune is not None
            row["after"] = score(finetune(model), task)
        except Exception as exc:  # noqa: BLE001 - a missing fine-tuning path is reported
            row["finetune_note"] = f"no fine-tuning path: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    try:
        row.update(ort_optimized_ms(model, task, args.latency_runs))
    except Exception as exc:  # noqa: BLE001
        row["latency_note"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    log(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "method"})
    return row


def groups(task: Task, path: Path, tmp: Path) -> dict[str, Any]:
    """Prunable / frozen groups of the export and of its ORT-optimized form (transformer_groups.count)."""
    spec = importlib.util.spec_from_file_location("transformer_groups", HERE / "transformer_groups.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    count: Callable[[Path], dict[str, Any]] = module.count
    root = tmp / "groups"
    root.mkdir()
    (root / f"{task.name}.onnx").write_bytes(path.read_bytes())
    (root / f"{task.name}-ort.onnx").write_bytes((tmp / "base-ort.onnx").read_bytes())
    return count(root)


def run_task(task: Task, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    path = export(task, task.module, tmp / "base.onnx")
    base = path.read_bytes()
    base_params = params_of(base)
    from onnxruntime.transformers.optimizer import optimize_model

    optimize_model(str(path), **ort_settings(task)).save_model_to_file(str(tmp / "base-ort.onnx"))
    doc: dict[str, Any] = {"metric": task.metric, "base_params": base_params, "train_samples": len(task.train),
                           "test_samples": len(task.test), "rows": []}
    doc["base"] = measured("original", lambda: base, task, base_params, argparse.Namespace(**{**vars(args), "finetune_epochs": 0.0}), None)
    doc["groups"] = groups(task, path, tmp)
    t = time.perf_counter()
    ws = analyzed(task, path, args.samples)
    doc["analysis_s"] = time.perf_counter() - t

    def ft_onnx(model: bytes) -> bytes:
        return finetune_bytes(model, task, args.finetune_epochs)

    store: dict[str, bytes] = {}
    for name, make in graphprune_variants(ws, base_params, args).items():
        doc["rows"].append(measured(name, make, task, base_params, args, ft_onnx))
    if args.ort_input:  # the file a deployment engineer ships: pruned as optimized, fused ops and all
        ws_ort = analyzed(task, tmp / "base-ort.onnx", args.samples)
        for name, make in graphprune_variants(ws_ort, base_params, args).items():
            doc["rows"].append(measured(f"{name} (on the ORT-optimized file)", make, task, base_params, args, ft_onnx))
    doc["rows"].append(tp_row(task, args, tmp, base_params, store))
    for name, make in onnxsim_variants(task, path, tmp / "base-ort.onnx", base_params, args).items():
        doc["rows"].append(measured(name, make, task, base_params, args, ft_onnx, store))
    if args.equal_latency:
        doc["equal_latency"] = equal_latency_rows(ws, task, doc, store, base_params, args, ft_onnx)
    doc["goals"] = goals(task, doc, args.params)
    return doc


def at_latency(ws: Workspace, task: Task, peer: bytes, hidden: float, args: argparse.Namespace) -> Callable[[], bytes]:
    """graphprune heads + feed-forward (+ the hidden size at ``hidden``) with the params target bisected so that,
    ORT-optimized and timed interleaved with the ``peer`` model at each step, it is no slower than the peer."""
    def make() -> bytes:
        def at(removed: float) -> tuple[float, float]:
            model = graphprune_model(ws, 1.0 - removed, hidden, 64, recover=False)  # latency depends on shapes only
            ms = interleaved_ms({"ours": model, "peer": peer}, task, args.latency_runs)
            return removed, ms["ours"] / ms["peer"]
        removed, _ = bisect(at, 1.0, 0.0, 0.9, args.bisect_steps)
        return graphprune_model(ws, 1.0 - removed, hidden, args.samples)
    return make


def equal_latency_rows(ws: Workspace, task: Task, doc: dict[str, Any], store: dict[str, bytes], base_params: int,
                       args: argparse.Namespace, finetune: Callable[[bytes], bytes]) -> list[dict[str, Any]]:
    """For each peer that removed something: graphprune planned to that peer's measured latency, then both timed
    again in one interleaved run (ORT-optimized, alternating rounds) and scored before and after the same fine-tuning."""
    out = []
    for peer in doc["rows"]:
        name = peer["method"]
        if "error" in peer or "ort_optimized_ms" not in peer or peer["params_kept"] > 0.99 or name not in store:
            continue
        for hidden in (1.0, args.hidden):
            ours: dict[str, bytes] = {}
            label = f"graphprune heads+ffn{f'+hidden {hidden:g}' if hidden < 1.0 else ''} at {name}'s latency"
            row = measured(label, at_latency(ws, task, store[name], hidden, args), task, base_params,
                           argparse.Namespace(**{**vars(args), "params": 1.0}), finetune, ours)
            if "error" not in row:
                row["interleaved_ms"] = interleaved_ms({label: ours[label], name: store[name]}, task, args.latency_runs)
            out.append({"peer": name, "peer_row": {k: peer.get(k) for k in ("params_kept", "before", "after", "ort_optimized_ms")},
                        "graphprune": row})
    return out


# ---------------------------------------------------------------- report

def goals(task: Task, doc: dict[str, Any], target: float) -> dict[str, Any]:
    """The issue's goals, checked (reported, not tuned to).

    Margins are in the metric's units, positive when graphprune's best row is better than the best peer's (peers
    count when within 0.02 of the target parameter fraction); ``loss_from_base_after`` is positive when worse.
    """
    sign = -1.0 if task.lm else 1.0  # sign * score: larger is better
    base, rows = doc["base"], [r for r in doc["rows"] if "error" not in r]
    ours = [r for r in rows if r["method"].startswith("graphprune")]
    peers = [r for r in rows if not r["method"].startswith("graphprune") and r["params_kept"] <= target + 0.02]
    out: dict[str, Any] = {}
    for when in ("before", "after"):
        best_ours = max((sign * r[when] for r in ours if when in r), default=None)
        best_peer = max((sign * r[when] for r in peers if when in r), default=None)
        if best_ours is not None and best_peer is not None:
            out[f"margin_over_best_peer_{when}"] = best_ours - best_peer
        if best_ours is not None:
            out[f"loss_from_base_{when}"] = sign * base["before"] - best_ours
    if task.lm:
        out["goal_ppl_rises_less_than_each_peer_before"] = out.get("margin_over_best_peer_before", -1.0) > 0
    else:
        out["goal_within_1pp_after"] = out.get("loss_from_base_after", 1.0) <= 0.01
        out["goal_ahead_0.5pp_before_and_after"] = all(out.get(f"margin_over_best_peer_{w}", -1.0) >= 0.005 for w in ("before", "after"))
    out["faster_on_ort_optimized"] = {r["method"]: r["ort_optimized_ms"] < base["ort_optimized_ms"] for r in rows if "ort_optimized_ms" in r}
    for e in doc.get("equal_latency", []):  # margins at the peer's latency (positive: graphprune better)
        g, p = e["graphprune"], e["peer_row"]
        if "error" in g:
            continue
        ms = g.get("interleaved_ms", {})
        out.setdefault("equal_latency", {})[g["method"]] = {
            **{f"margin_{w}": sign * (g[w] - p[w]) for w in ("before", "after") if w in g and p.get(w) is not None},
            "graphprune_over_peer_ms": ms.get(g["method"], math.nan) / ms.get(e["peer"], math.nan) if ms else math.nan}
    return out


def equal_latency_table(task: Task, doc: dict[str, Any]) -> Table:
    t = Table(title=f"{task.name}: {task.metric} at each peer's measured latency (ORT-optimized, batch {LAT_BATCH}; "
                    "the pair timed again interleaved)")
    for col in ("graphprune, at the peer's latency", "params kept (peer / ours)", f"{task.metric} before FT (peer / ours)", "after FT (peer / ours)",
                "interleaved ms (peer / ours)"):
        t.add_column(col, justify="right" if "/" in col else "left")
    for e in doc.get("equal_latency", []):
        g, p = e["graphprune"], e["peer_row"]
        if "error" in g:
            t.add_row(g["method"], "-", "-", "-", f"error: {g['error'][:60]}")
            continue
        ms = g.get("interleaved_ms", {})
        t.add_row(g["method"], f"{p['params_kept']:.3f} / {g['params_kept']:.3f}", f"{p['before']:.4f} / {g['before']:.4f}",
                  f"{p['after']:.4f} / {g['after']:.4f}" if p.get("after") is not None and "after" in g else "-",
                  f"{ms.get(e['peer'], math.nan):.3f} / {ms.get(g['method'], math.nan):.3f}")
    return t


def table(task: Task, doc: dict[str, Any], target: float) -> Table:
    base = doc["base"]
    t = Table(title=f"{task.name}: {task.metric} at {target:g}x the parameters (original {base['before']:.4f}, "
                    f"{doc['base_params']} params, ORT-optimized {base.get('ort_optimized_ms', float('nan')):.3f} ms at batch {LAT_BATCH})")
    for col in ("method", "params kept", f"{task.metric} before FT", "after FT", "ORT-opt ms", "fused attn", "note"):
        t.add_column(col, justify="left" if col in ("method", "note") else "right")
    for r in doc["rows"]:
        if "error" in r:
            t.add_row(r["method"], "-", "-", "-", "-", "-", f"error: {r['error'][:70]}")
            continue
        t.add_row(r["method"], f"{r['params_kept']:.3f}", f"{r['before']:.4f}", f"{r['after']:.4f}" if "after" in r else "-",
                  f"{r['ort_optimized_ms']:.3f}" if "ort_optimized_ms" in r else "-", str(r.get("fused_attention", "-")),
                  "; ".join(r[k] for k in ("target_note", "tp_heads_error", "finetune_note", "latency_note") if k in r)[:90])
    return t


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=("vit", "lm"), default=["vit", "lm"])
    ap.add_argument("--epochs", type=float, default=5.0, help="ViT training epochs (Fashion-MNIST, cached)")
    ap.add_argument("--lm-epochs", type=float, default=8.0, help="LM training epochs (KJV windows, cached)")
    ap.add_argument("--lm-lr", type=float, default=0.1)
    ap.add_argument("--lm-windows", type=int, default=16384, help="training windows (held out: an eighth of this)")
    ap.add_argument("--finetune-epochs", type=float, default=0.25)
    ap.add_argument("--params", type=float, default=0.5, help="kept fraction of the parameters")
    ap.add_argument("--hidden", type=float, default=0.75, help="kept fraction of the hidden size (graphprune's rotation row)")
    ap.add_argument("--samples", type=int, default=512, help="calibration samples (analysis, compensation, rotation)")
    ap.add_argument("--bisect-steps", type=int, default=7)
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--equal-latency", action=argparse.BooleanOptionalAction, default=True,
                    help="also compare at each peer's measured latency (graphprune's params target bisected to it)")
    ap.add_argument("--ort-input", action=argparse.BooleanOptionalAction, default=True,
                    help="also run graphprune's rows on the onnxruntime-optimized export (fused ops) as input")
    ap.add_argument("--json", type=Path, default=HERE / "transformers.json")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: checks the script end to end in a few minutes")
    args = ap.parse_args(argv)
    if args.smoke:
        args.epochs, args.lm_epochs, args.lm_windows, args.finetune_epochs = 0.05, 1.0, 1024, 0.05
        args.samples, args.bisect_steps, args.latency_runs = 128, 4, 10
        args.json = args.json.with_name(args.json.stem + "_smoke.json")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    doc: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {"models": {}}  # other models' results stay
    doc["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, onnxruntime CPU, shared with other jobs"
    for name in args.models:
        t0 = time.perf_counter()
        task = make_task(name, args)
        log(f"{name}: data and model ready ({time.perf_counter() - t0:.0f} s)")
        with tempfile.TemporaryDirectory() as tmp:
            out = run_task(task, args, Path(tmp))
        out["target_params"], out["seconds"] = args.params, time.perf_counter() - t0
        out["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        doc["models"][name] = out
        console.print(table(task, out, args.params))
        if out.get("equal_latency"):
            console.print(equal_latency_table(task, out))
        console.print(f"goals: {out['goals']}")
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    # This file's name shadows Hugging Face ``transformers``: its folder leaves the import path, so a library that
    # imports ``transformers`` gets the package (or an ImportError), never this script.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    main()
