"""Terminal tables and JSON for groups and pruning results."""
from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from graphprune.coupling.groups import Coupling

__all__ = ["groups_json", "groups_table"]


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
