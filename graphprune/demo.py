"""The demo: export a reference model, list its groups, prune, verify, report."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from graphprune.coupling import build_groups
from graphprune.io import write_text_atomic
from graphprune.onnx_frontend import load_onnx
from graphprune.onnx_prune import PruneOptions, prune_file
from graphprune.report import groups_table, prune_json, prune_table

__all__ = ["run_demo"]


def run_demo(model: str, ratio: float, out_dir: Path, console: Console) -> Path:
    """Export ``model`` from ``models/`` to ONNX, prune it by ``ratio`` and verify exactness.

    Returns:
        Path of the JSON report.
    """
    import models

    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / f"{model}.onnx"
    with console.status(f"exporting reference model '{model}' to ONNX..."):
        models.export_onnx(models.build(model), source, bn="keep")
    console.print(f"exported {source}")
    groups_table(build_groups(load_onnx(source).graph), console)
    output = out_dir / f"{model}.pruned.onnx"
    with console.status("pruning, validating on onnxruntime, measuring latency..."):
        result = prune_file(source, output, PruneOptions(ratio=ratio, verify=True, force=True))
    prune_table(result, console)
    report = out_dir / "report.json"
    write_text_atomic(report, prune_json(result))
    write_text_atomic(out_dir / "plan.json", result.plan.to_json())
    console.print(f"report: {report}")
    return report
