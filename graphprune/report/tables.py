"""Terminal tables and JSON for groups and pruning results."""
from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from graphprune.backends.onnx_prune import ModelStats, PruneResult
from graphprune.coupling.groups import Coupling
from graphprune.report.plots import fmt_count

__all__ = ["groups_json", "groups_table", "prune_json", "prune_table"]


def groups_table(coupling: Coupling, console: Console) -> None:
    """One row per group, then a summary line."""
    table = Table(title="Coupling groups")
    for col in ("id", "channels", "members", "status"):
        table.add_column(col, justify="right" if col in ("id", "channels") else "left")
    for g in coupling.groups:
        names = ", ".join(m.label for m in g.members[:4]) + (f" (+{len(g.members) - 4})" if len(g.members) > 4 else "")
        status = "prunable" if g.prunable else "frozen: " + "; ".join(g.frozen[:2])
        table.add_row(str(g.id), str(g.channels), names, status)
    console.print(table)
    n_pr = len(coupling.prunable)
    console.print(f"{len(coupling.groups)} groups: {n_pr} prunable, {len(coupling.groups) - n_pr} frozen")


def groups_json(coupling: Coupling) -> str:
    data: list[dict[str, Any]] = [
        {
            "id": g.id,
            "anchor": g.anchor,
            "channels": g.channels,
            "prunable": g.prunable,
            "frozen": list(g.frozen),
            "members": [{"tensor": m.tensor, "axis": m.axis, "kind": m.kind, "per_channel": int(m.indices.shape[1])} for m in g.members],
        }
        for g in coupling.groups
    ]
    return json.dumps({"groups": data, "prunable": len(coupling.prunable)}, indent=1)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def prune_table(result: PruneResult, console: Console) -> None:
    """Before/after table with the reduction factor of each figure."""
    b, a = result.before, result.after
    table = Table(title=f"graphprune: {result.output}")
    for col in ("", "before", "after", "reduction"):
        table.add_column(col, justify="right")
    rows = (
        ("parameters", b.params, a.params, fmt_count),
        ("MACs / sample", b.macs, a.macs, fmt_count),
        ("file size (bytes)", b.file_bytes, a.file_bytes, fmt_count),
        ("latency, batch 1 (ms)", b.latency_ms, a.latency_ms, lambda x: f"{x:.3f}"),
    )
    for label, x, y, fmt in rows:
        table.add_row(label, fmt(x) if x is not None else "-", fmt(y) if y is not None else "-", _ratio(x, y))
    groups = result.coupling.groups
    pruned = len(result.plan.groups)
    frozen = sum(not g.prunable for g in groups)
    table.add_row("groups pruned / frozen / total", "", f"{pruned} / {frozen} / {len(groups)}", "")
    console.print(table)
    v = result.validation
    exact = "not checked (use --verify)" if v.exact is None else f"exact (max abs error {v.max_abs_error:.2g})"
    where = f"onnxruntime ({v.provider})" if v.provider.endswith("ExecutionProvider") else v.provider
    console.print(f"validated on {where}: {exact}")


def _stats(s: ModelStats) -> dict[str, Any]:
    return {"params": s.params, "macs": s.macs, "file_bytes": s.file_bytes, "latency_ms": s.latency_ms}


def prune_json(result: PruneResult) -> str:
    return json.dumps(
        {
            "output": str(result.output),
            "before": _stats(result.before),
            "after": _stats(result.after),
            "groups": {"total": len(result.coupling.groups), "pruned": len(result.plan.groups), "frozen": sum(not g.prunable for g in result.coupling.groups)},
            "validation": {"provider": result.validation.provider, "exact": result.validation.exact, "max_abs_error": result.validation.max_abs_error},
            "plan_meta": dict(result.plan.meta),
        },
        indent=1,
    )
