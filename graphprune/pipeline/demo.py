"""The demo: train a reference CNN on Fashion-MNIST, analyse, prune hierarchically, fine-tune, validate, report."""
from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from graphprune.errors import BadInputError
from graphprune.pipeline.config import load_pipeline, preset_path
from graphprune.pipeline.run import RunResult, run_file

__all__ = ["default_pipeline", "run_demo"]


def default_pipeline() -> Path:
    """The shipped ``hierarchical`` preset (``passes/hierarchical.toml`` in the repository)."""
    return preset_path("hierarchical")


def run_demo(
    model: str,
    out_dir: Path,
    console: Console,
    epochs: float = 2.0,
    finetune_epochs: float = 1.0,
    pipeline: Path | None = None,
) -> RunResult:
    """Train ``model`` on Fashion-MNIST (cached), export it to ONNX and run the hierarchical pipeline on it.

    The model trains on the ``fit`` split (55,000 training images); the
    pipeline analyses, compensates and fine-tunes on the same images,
    calibrates the limit on the other 5,000 (``val``: never trained on, as a
    deployment's calibration set would be) with a few measured points,
    prunes every group to its effective filters at the calibrated budget,
    checks exactness, fine-tunes, validates on onnxruntime and writes an HTML
    and a JSON report beside the pruned model.

    Raises:
        BadInputError: Fashion-MNIST is not installed, or a bad option.
    """
    from graphprune import models
    from graphprune.models.fashion import fashion_mnist, trained

    fashion_mnist("test")  # fails early, with the install command, when the dataset is missing
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"stage: training {model} on 55,000 Fashion-MNIST training images ({epochs:g} epochs; cached in "
                  f"{out_dir / 'cache'}; the other 5,000 calibrate the limit)", highlight=False)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"training {model} on Fashion-MNIST ({epochs:g} epochs, cached)", total=None)
        net = trained(model, epochs, cache_dir=out_dir / "cache", split="fit",
                      progress=lambda step, total, _loss=math.nan: bar.update(task, total=total, completed=step))
    source = out_dir / f"{model}.onnx"
    models.export_onnx(net, source, bn="keep")
    console.print(f"trained and exported {source}")
    path = pipeline or default_pipeline()
    overrides = [f"finetune.epochs={finetune_epochs}"]
    if "limit" in load_pipeline(path).names:  # the fine-tuned limit is estimated for the fine-tune that follows
        overrides.append(f"limit.finetune_epochs={finetune_epochs}")
    steps = load_pipeline(path, overrides)
    output = out_dir / f"{model}.pruned.onnx"
    result = run_file(steps, source, output, "fashion-mnist:fit", "fashion-mnist:test", force=True, console=console,
                      held_out="fashion-mnist:val")
    if result is None:
        raise BadInputError("the demo runs in one process: start it without torchrun")
    return result
