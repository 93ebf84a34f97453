"""Command line: ``graphprune groups|prune|demo``."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from graphprune.errors import BadInputError, GraphpruneError

__all__ = ["main", "build_parser"]

log = logging.getLogger("graphprune")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"graphprune: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphprune", description="Structured channel pruning for ONNX models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("groups", help="list the coupling groups of a model")
    g.add_argument("model", type=Path)
    g.add_argument("--json", type=Path, help="also write the groups as JSON")

    pr = sub.add_parser("prune", help="remove a fraction of the channels of every prunable group")
    pr.add_argument("model", type=Path)
    pr.add_argument("-o", "--output", type=Path, required=True)
    pr.add_argument("--ratio", type=_ratio, default=0.5, help="fraction of each group's channels to remove (default 0.5)")
    pr.add_argument("--criterion", choices=("l1", "l2", "random"), default="l1")
    pr.add_argument("--round-to", type=_positive, default=1, help="keep channel counts multiples of N")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--verify", action="store_true", help="check the pruned model equals the original with removed channels zeroed")
    plan = pr.add_mutually_exclusive_group()
    plan.add_argument("--plan-out", type=Path, help="write the plan as JSON")
    plan.add_argument("--plan", type=Path, help="apply this plan instead of making one")
    pr.add_argument("--force", action="store_true", help="replace an existing output file")
    pr.add_argument("--json", type=Path, help="write the result as JSON")
    pr.add_argument("--latency-runs", type=int, default=20, help="onnxruntime runs per latency figure (0: skip)")

    d = sub.add_parser("demo", help="export a reference model, prune it, verify it, report")
    d.add_argument("--model", default="resnet20")
    d.add_argument("--ratio", type=_ratio, default=0.5)
    d.add_argument("-o", "--output-dir", type=Path, default=Path("graphprune-demo"))
    return p


def _groups(args: argparse.Namespace, console: Console) -> None:
    from graphprune.coupling import build_groups
    from graphprune.io import write_text_atomic
    from graphprune.onnx_frontend import load_onnx
    from graphprune.report import groups_json, groups_table

    coupling = build_groups(load_onnx(args.model).graph)
    groups_table(coupling, console)
    if args.json:
        write_text_atomic(args.json, groups_json(coupling))


def _prune(args: argparse.Namespace, console: Console) -> None:
    from graphprune.io import write_text_atomic
    from graphprune.onnx_prune import PruneOptions, prune_file
    from graphprune.plan import Plan
    from graphprune.report import prune_json, prune_table

    for path in (args.plan_out, args.json):
        if path is not None and path.resolve() == args.model.resolve():
            raise BadInputError(f"{path} is the input model: choose another path")
    options = PruneOptions(
        ratio=args.ratio, criterion=args.criterion, round_to=args.round_to, seed=args.seed,
        verify=args.verify, plan=Plan.load(args.plan) if args.plan else None, force=args.force,
        latency_runs=max(0, args.latency_runs),
    )
    with console.status("pruning and validating..."):
        result = prune_file(args.model, args.output, options)
    prune_table(result, console)
    if args.plan_out:
        write_text_atomic(args.plan_out, result.plan.to_json())
    if args.json:
        write_text_atomic(args.json, prune_json(result))


def _demo(args: argparse.Namespace, console: Console) -> None:
    from graphprune.demo import run_demo

    run_demo(args.model, args.ratio, args.output_dir, console)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    err = Console(stderr=True)
    try:
        {"groups": _groups, "prune": _prune, "demo": _demo}[args.command](args, console)
    except GraphpruneError as exc:
        if args.debug:
            raise
        err.print(f"graphprune: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("graphprune: interrupted; nothing was written", markup=False)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        if args.debug:
            raise
        err.print(f"graphprune: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", markup=False, highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
