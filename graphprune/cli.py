"""Command line: ``graphprune groups|analyze|prune|demo``."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from graphprune.errors import BadInputError, GraphpruneError
from graphprune.planning.options import ANALYSIS_CRITERIA, CRITERIA_NAMES, EXCESS_RULES, METHODS, NEEDS_ANALYSIS, OBJECTIVES, TARGETS

__all__ = ["build_parser", "main"]

log = logging.getLogger("graphprune")


def _unit_float(text: str, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0.0 if zero_ok else value > 0.0) or value >= 1.0:
        interval = "[0, 1)" if zero_ok else "(0, 1)"
        raise argparse.ArgumentTypeError(f"{'ratio ' if zero_ok else ''}must be in {interval}, got {value}")
    return value


def _ratio(text: str) -> float:
    return _unit_float(text, zero_ok=True)


def _fraction(text: str) -> float:
    return _unit_float(text, zero_ok=False)


def _keep(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _add_hidden(parser: argparse.ArgumentParser) -> None:
    """``--hidden KEEP`` / ``--hidden-energy E``: the hidden pass (rotation, SliceGPT), off by default."""
    hidden = parser.add_mutually_exclusive_group()
    hidden.add_argument("--hidden", type=_keep, metavar="KEEP",
                        help="slice a transformer's hidden size by rotation, keeping this fraction of it (approximate; needs --data)")
    hidden.add_argument("--hidden-energy", type=_keep, metavar="E",
                        help="like --hidden, keeping the directions that hold this fraction of the stream's energy (e.g. 0.99)")


def _hidden_step(args: argparse.Namespace) -> dict[str, Any] | None:
    """The hidden pass the flags ask for, or None."""
    if args.hidden is None and args.hidden_energy is None:
        return None
    if not args.data:
        raise BadInputError("--hidden and --hidden-energy need calibration data (--data)")
    keep = {"keep": args.hidden} if args.hidden is not None else {"energy": args.hidden_energy}
    return {"name": "hidden", "seed": getattr(args, "seed", 0), **keep}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12}


def _size(text: str) -> int:
    """A byte count: ``1500000``, ``500M``, ``1.5GB`` (decimal units)."""
    number = text.strip().rstrip("bBkKmMgGtT")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 6G, 500M, 1000000)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return int(value)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1) (0.01 is 1 pp), got {value}")
    return value


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.5 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0.5, 1) (0.5: the measured drop alone), got {value}")
    return value


HELD_OUT_HELP = ("data the model was not trained on (fashion-mnist:val, .npz, image folder) for the limit to score its "
                 "points on (default: calibration samples the analysis and compensation do not read; samples the "
                 "model was trained on lose more to pruning, so the limit lands lower)")


def _limit_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """--calibrate, --tolerance, --holdout, --held-out, --limit-points, --confidence (analyze and prune)."""
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate the limit on held-out calibration samples (a few measured points; default: on"
                        + (" with --data and the hierarchical method)" if command == "prune" else ")"))
    p.add_argument("--tolerance", type=_tolerance, default=0.01,
                   help="the limit keeps accuracy (or agreement with the original) within this of the original's, "
                        "with no fine-tuning (default 0.01: 1 pp)")
    p.add_argument("--holdout", type=_positive, default=4096,
                   help="most held-out calibration samples a measured point is scored on (default 4096; a point "
                        "clearly within or beyond the tolerance stops after 1024)")
    p.add_argument("--held-out", metavar="DATA", help=HELD_OUT_HELP)
    p.add_argument("--limit-points", type=_positive, default=6, help="most measured points of the calibration (default 6)")
    p.add_argument("--confidence", type=_confidence, default=0.0,
                   help="a point passes when its drop is within the tolerance at this one-sided confidence, paired with "
                        "the original on the held-out samples (0.5: the measured drop alone; 0.8 adds 0.84 standard "
                        "errors; default 0.8 with --held-out, else 0.5)")
    if command == "analyze":
        p.add_argument("--finetune-epochs", type=float, default=0.0,
                       help="also estimate the limit after this many epochs of fine-tuning")


def _limit_step(args: argparse.Namespace, finetune_epochs: float, compensate: bool, repair: bool) -> dict[str, Any]:
    """The limit pass of a command's pipeline."""
    if args.limit_points < 2:
        raise BadInputError(f"--limit-points must be at least 2, got {args.limit_points}")
    if args.holdout < 16:
        raise BadInputError(f"--holdout must be at least 16, got {args.holdout}")
    step: dict[str, Any] = {"name": "limit", "tolerance": args.tolerance, "points": args.limit_points, "holdout": args.holdout,
                            "confidence": args.confidence, "finetune_epochs": float(finetune_epochs), "compensate": compensate, "repair": repair, "seed": args.seed}
    if args.budget is not None:
        step["budget"] = float(args.budget)
    if getattr(args, "compensate_memory", None) is not None:
        step["memory_bytes"] = args.compensate_memory
    return step


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"graphprune: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphprune", description="Structured channel pruning for ONNX models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("groups", help="list the coupling groups of a model")
    g.add_argument("model", type=Path, help="an ONNX file or a saved torch ExportedProgram (.pt2)")
    g.add_argument("--json", type=Path, help="also write the groups as JSON")

    an = sub.add_parser("analyze", help="effective filters per group and the network's maximum compression")
    an.add_argument("model", type=Path, help="an ONNX file or a saved torch ExportedProgram (.pt2)")
    an.add_argument("--data", required=True, help="fashion-mnist, an .npz (arrays named after the inputs, optional 'labels') or an image folder")
    an.add_argument("--samples", type=_positive, default=1024, help="calibration samples (default 1024)")
    an.add_argument("--seq-len", type=_positive, help="sequence length the MACs count (default: the calibration data's)")
    an.add_argument("--batch-size", type=_positive, default=64)
    an.add_argument("--loss", choices=("fisher", "labels", "projection"),
                    help="default: labels when the data has them, else fisher for (batch, classes) outputs and projection for others")
    an.add_argument("--eps", type=_ratio, default=1e-2, help="spectral energy left out of the effective rank (default 0.01)")
    an.add_argument("--floor", type=float, default=0.0, help="absolute eigenvalue floor (default 0)")
    an.add_argument("--budget", type=float, help="network-wide predicted loss increase allowed; sets every r_g instead of --eps")
    _limit_arguments(an, "analyze")
    an.add_argument("--split", choices=("train", "test", "fit", "val"), default="train",
                    help="Fashion-MNIST split (fit / val: the training images less / only the 5,000 held out of them)")
    an.add_argument("--image-size", type=_positive, nargs=2, metavar=("H", "W"), help="image folder: resize to H W")
    an.add_argument("--mean", type=float, nargs="+", default=[0.0], help="image folder: per-channel mean")
    an.add_argument("--std", type=float, nargs="+", default=[1.0], help="image folder: per-channel std")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("-o", "--output", type=Path, help="write the analysis as JSON (F matrices beside it as .fisher.npz)")
    an.add_argument("--plot", type=Path, help="write a PNG plot")
    an.add_argument("--html", type=Path, help="write a self-contained HTML report")

    pr = sub.add_parser("prune", help="remove a fraction of the channels of every prunable group")
    pr.add_argument("model", type=Path, help="an ONNX file or a saved torch ExportedProgram (.pt2)")
    pr.add_argument("-o", "--output", type=Path, required=True, help="the pruned model (.onnx; .pt2 or .onnx for a .pt2 input)")
    target = pr.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=_ratio, help="fraction of the channels to remove (default 0.5 without --data)")
    target.add_argument("--macs", type=_fraction, help="fraction of the original MACs to keep")
    target.add_argument("--params", type=_fraction, help="fraction of the original parameters to keep")
    target.add_argument("--latency", type=_fraction, help="fraction of the original onnxruntime latency to reach (measured)")
    pr.add_argument("--method", choices=METHODS, help="default: hierarchical with --data, else uniform")
    pr.add_argument("--criterion", choices=CRITERIA_NAMES,
                    help="level 2 rule; default: effective with --data, else l1")
    pr.add_argument("--data", help="calibration / fine-tuning data (fashion-mnist, .npz, image folder): enables the analysis")
    pr.add_argument("--eval-data", help="labelled data for accuracy figures")
    pr.add_argument("--samples", type=_positive, default=2048, help="analysis samples (default 2048)")
    pr.add_argument("--seq-len", type=_positive,
                    help="sequence length the MACs (and a --macs target) count: default the calibration data's, else 1, said in the table")
    pr.add_argument("--eps", type=_ratio, default=1e-2, help="analysis: spectral energy left out of the effective rank")
    pr.add_argument("--budget", type=float, help="analysis: one network-wide predicted-loss budget instead of --eps")
    pr.add_argument("--loss", choices=("fisher", "labels", "projection"),
                    help="analysis loss (default: fisher, labels sampled from the model, for (batch, classes) outputs; "
                         "projection for others)")
    pr.add_argument("--allow-over-limit", action="store_true", help="allow targets beyond the estimated maximum compression")
    pr.add_argument("--excess", choices=EXCESS_RULES, default="measured",
                    help="past the limit, remove the excess by predicted loss, per unit saved, or both scored on held-out "
                         "samples and the better kept (default: measured)")
    _limit_arguments(pr, "prune")
    pr.add_argument("--finetune-epochs", type=float, default=0.0, help="fine-tune after pruning (needs --data)")
    pr.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,
                    help="least-squares compensation of dropped channels (default: on with --data)")
    pr.add_argument("--compensate-memory", type=_size, metavar="SIZE",
                    help="most memory compensation's Gram matrices may take, e.g. 6G (default: a quarter of the machine's memory)")
    pr.add_argument("--repair", action=argparse.BooleanOptionalAction, default=None,
                    help="BN re-estimation or bias correction after rewrite (default: on with --data)")
    pr.add_argument("--round-to", type=_positive, default=1,
                    help="keep channel counts multiples of N (default: with a latency model, the counts its tables show are fast)")
    pr.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                    help="measure latency tables of the original on its runtime and plan for latency (default: on with --data)")
    pr.add_argument("--latency-batch", type=_positive, default=1,
                    help="batch size the model will run at: latency tables, the latency target and the second speed-up figure use it")
    pr.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads of every latency figure (0: its default)")
    pr.add_argument("--objective", choices=OBJECTIVES, default="auto",
                    help="level 1 prices by predicted ms saved (latency) or by the target's unit (macs); auto: latency with a latency model")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--verify", action="store_true", help="check the pruned model equals the original with removed channels zeroed")
    plan = pr.add_mutually_exclusive_group()
    plan.add_argument("--plan-out", type=Path, help="write the plan as JSON")
    plan.add_argument("--plan", type=Path, help="apply this plan instead of making one")
    pr.add_argument("--force", action="store_true", help="replace an existing output file")
    pr.add_argument("--json", type=Path, help="write the result as JSON")
    pr.add_argument("--latency-runs", type=int, default=20, help="onnxruntime runs per latency figure (0: skip)")
    _add_hidden(pr)

    r = sub.add_parser("run", help="run a pipeline (passes/*.toml) on a model")
    r.add_argument("pipeline", type=Path, help="a pipeline TOML file or a shipped preset name: hierarchical, deploy, magnitude, taylor, uniform")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("-o", "--output", type=Path, required=True)
    r.add_argument("--data", help="training / calibration data: fashion-mnist, an .npz or an image folder")
    r.add_argument("--eval-data", help="labelled data for accuracy figures (e.g. fashion-mnist:test)")
    r.add_argument("--held-out", metavar="DATA", help=HELD_OUT_HELP)
    r.add_argument("--set", action="append", default=[], metavar="PASS.KEY=VALUE", help="override a pass option (repeatable)")
    r.add_argument("--force", action="store_true", help="replace an existing output file")
    _add_hidden(r)

    d = sub.add_parser("demo", help="train a reference CNN on Fashion-MNIST, analyse, prune hierarchically, fine-tune, validate, report")
    d.add_argument("--model", default="resnet20")
    d.add_argument("--epochs", type=float, default=2.0, help="training epochs of the reference model (cached)")
    d.add_argument("--finetune-epochs", type=float, default=1.0)
    d.add_argument("--pipeline", type=Path, help="pipeline TOML (default: passes/hierarchical.toml)")
    d.add_argument("-o", "--output-dir", type=Path, default=Path("graphprune-demo"))
    return p


def _groups(args: argparse.Namespace, console: Console) -> None:
    from graphprune.backends import load_model
    from graphprune.coupling.groups import build_groups
    from graphprune.io import write_text_atomic
    from graphprune.report.tables import groups_json, groups_table

    coupling = build_groups(load_model(args.model).graph)
    groups_table(coupling, console)
    if args.json:
        write_text_atomic(args.json, groups_json(coupling))


def _analyze(args: argparse.Namespace, console: Console) -> None:

    from graphprune.analysis.cost import resolve_dims
    from graphprune.backends import load_model
    from graphprune.execution.distributed import is_main, process_group
    from graphprune.frontends.data import ImageOptions, load_data
    from graphprune.pipeline.config import parse_pipeline
    from graphprune.pipeline.run import run_model
    from graphprune.report.analysis import analysis_table, write_html, write_plot

    for path in (args.output, args.plot, args.html):
        if path is not None and path.resolve() == args.model.resolve():
            raise BadInputError(f"{path} is the input model: choose another path")
        if path is not None and not path.parent.resolve().is_dir():
            raise BadInputError(f"output folder {path.parent} does not exist")
    with process_group():
        model = load_model(args.model)
        images = ImageOptions(tuple(args.image_size) if args.image_size else None, tuple(args.mean), tuple(args.std))
        calibrate = args.calibrate is not False
        if args.finetune_epochs < 0:
            raise BadInputError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
        extra = args.holdout if calibrate and not args.held_out else 0
        data = load_data(args.data, model.graph, args.samples + extra, args.seed, args.split, images)
        held = (load_data(args.held_out, model.graph, args.holdout, args.seed, args.split, images, "--held-out")
                if args.held_out else None)
        resolve_dims(model.graph, args.seq_len, data.inputs)
        if args.loss == "labels" and data.labels is None:
            raise BadInputError("--loss labels needs labels in the data; use --loss fisher for unlabelled data")
        loss = args.loss or ("labels" if data.labels is not None else "fisher")
        step = {"name": "analyze", "eps": args.eps, "floor": args.floor, "loss": loss, "batch_size": args.batch_size,
                "seed": args.seed, "samples": min(args.samples, len(data))}
        if args.budget is not None:
            step["budget"] = args.budget
        steps = [step]
        if calibrate:
            steps.append({**_limit_step(args, args.finetune_epochs, True, True), "samples": min(1024, args.samples),
                          "batch_size": args.batch_size})
        pipeline = parse_pipeline({"pipeline": {"name": "analyze"}, "pass": steps}, "analyze")
        ws = run_model(pipeline, model, data, console=console, source=args.model, held_out=held)
        result = ws.analysis
        assert result is not None
        if not is_main():
            return
        analysis_table(result, console, ws.limit)
        if args.output:
            npz = result.save(args.output, {"limit": ws.limit.to_dict()} if ws.limit is not None else None)
            console.print(f"analysis: {args.output} (F matrices: {npz})")
        if args.plot:
            write_plot(result, args.plot, ws.limit)
            console.print(f"plot: {args.plot}")
        if args.html:
            write_html(result, args.html, f"graphprune analysis of {args.model.name}", ws.limit)
            console.print(f"report: {args.html}")


def _method_and_criterion(args: argparse.Namespace) -> tuple[str, str]:
    """Defaults: hierarchical with the effective filters when there is data, else uniform by L1."""
    method = args.method or ("hierarchical" if args.data else "uniform")
    return method, args.criterion or ("effective" if method == "hierarchical" else "l1")


def _prune_passes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The pipeline ``prune`` runs: the same passes as ``graphprune run``, chosen from the flags."""
    from graphprune.pipeline.run import prune_passes

    target = {k: getattr(args, k) for k in TARGETS if getattr(args, k) is not None}
    if args.plan is not None:
        if target or args.method or args.data:
            raise BadInputError("--plan applies a saved plan: do not combine it with a target, --method or --data")
        saved = prune_passes(ratio=0.0, criterion="l1", round_to=1, seed=args.seed, plan=args.plan,
                             verify=args.verify or args.model.suffix == ".pt2", latency_runs=args.latency_runs, reports=False)
        return [*saved[:-1], _report(args)]
    hidden = _hidden_step(args)
    if hidden is not None and not (target or args.method or args.criterion):  # the hidden size only
        tune = [{"name": "finetune", "epochs": args.finetune_epochs, "seed": args.seed}] if args.finetune_epochs > 0 else []
        return [hidden, *tune, {"name": "validate", "latency_runs": args.latency_runs, "run_check": True,
                                "batch": args.latency_batch, "threads": args.threads}, _report(args)]
    method, criterion = _method_and_criterion(args)
    if not args.data and not target:
        target = {"ratio": 0.5}
    passes: list[dict[str, Any]] = []
    if method == "hierarchical" or criterion in NEEDS_ANALYSIS:
        if not args.data:
            raise BadInputError(f"--method {method} --criterion {criterion} needs calibration data (--data)")
        analyze = {"name": "analyze", "samples": args.samples, "eps": args.eps, "seed": args.seed}
        if args.budget is not None:
            analyze["budget"] = args.budget
        if args.loss is not None:
            analyze["loss"] = args.loss
        passes.append(analyze)
    compensate = bool(args.data) if args.compensate is None else args.compensate
    repair = bool(args.data) if args.repair is None else args.repair
    calibrate = bool(args.data) and method == "hierarchical" if args.calibrate is None else args.calibrate
    if calibrate:
        if not args.data or method != "hierarchical":
            raise BadInputError("--calibrate calibrates the hierarchical plan's limit: it needs --data and --method hierarchical")
        passes.append(_limit_step(args, args.finetune_epochs, compensate, repair))
    profile = bool(args.data) if args.profile is None else args.profile
    if profile:
        passes.append({"name": "profile", "batch": args.latency_batch, "threads": args.threads, "runs": 5,
                       "below_floors": bool(args.allow_over_limit)})
    elif args.objective == "latency":
        raise BadInputError("--objective latency needs the latency tables: drop --no-profile")
    passes.append({"name": "plan", "method": method, "criterion": criterion, "round_to": args.round_to,
                   "allow_over_limit": args.allow_over_limit, "excess": args.excess, "seed": args.seed, "objective": args.objective,
                   "latency_runs": max(args.latency_runs, 1) if args.latency is not None else args.latency_runs, **target})
    if (compensate or repair) and not args.data:
        raise BadInputError("--compensate and --repair need calibration data (--data)")
    if args.compensate_memory is not None and not compensate:
        raise BadInputError("--compensate-memory bounds the compensation: use it with --data (and without --no-compensate)")
    if compensate:
        memory = {"memory_bytes": args.compensate_memory} if args.compensate_memory is not None else {}
        passes.append({"name": "compensate", "seed": args.seed, **memory})
    verify = args.verify or bool(args.data) or args.model.suffix == ".pt2"  # a rewritten program is always checked
    passes.append({"name": "rewrite", "verify": verify})
    if repair:
        passes.append({"name": "repair", "seed": args.seed})
    if hidden is not None:
        passes.append(hidden)
    if args.finetune_epochs > 0:
        if not args.data:
            raise BadInputError("--finetune-epochs needs --data")
        passes.append({"name": "finetune", "epochs": args.finetune_epochs, "seed": args.seed})
    # the written file is always validated before it is moved in place; a plain magnitude prune checks it only there
    passes += [{"name": "validate", "latency_runs": args.latency_runs, "run_check": bool(args.data),
                "batch": args.latency_batch, "threads": args.threads}, _report(args)]
    return passes


def _report(args: argparse.Namespace) -> dict[str, Any]:
    """Reports beside the output unless the prune is a plain magnitude one (``--ratio``, ``--plan``); ``--json F`` anywhere."""
    planned = bool(args.data or args.hidden or args.hidden_energy or args.method or args.compensate or args.repair or args.criterion in ANALYSIS_CRITERIA
                   or any(getattr(args, k) is not None for k in TARGETS if k != "ratio"))
    beside = planned and args.plan is None
    report: dict[str, Any] = {"name": "report", "json": beside, "html": beside}
    if args.json is not None:
        report["json_path"] = str(args.json)
    return report


def _prune(args: argparse.Namespace, console: Console) -> None:
    from graphprune.execution.distributed import process_group
    from graphprune.io import write_text_atomic
    from graphprune.pipeline.config import parse_pipeline
    from graphprune.pipeline.run import run_file

    for path in (args.plan_out, args.json):
        if path is not None and path.resolve() == args.model.resolve():
            raise BadInputError(f"{path} is the input model: choose another path")
    if args.latency_runs < 0:
        raise BadInputError(f"--latency-runs must be >= 0, got {args.latency_runs}")
    if args.threads < 0:
        raise BadInputError(f"--threads must be >= 0, got {args.threads}")
    pipeline = parse_pipeline({"pipeline": {"name": "prune"}, "pass": _prune_passes(args)}, "prune")
    with process_group():
        result = run_file(pipeline, args.model, args.output, args.data, args.eval_data, args.force, console, args.seq_len,
                          args.held_out)
    if result is None:  # not the main rank
        return
    if args.plan_out:
        write_text_atomic(args.plan_out, result.plan.to_json())
    console.print(f"wrote {result.output}")
    for path in result.reports:
        console.print(f"report: {path}")


def _run(args: argparse.Namespace, console: Console) -> None:
    from graphprune.execution.distributed import process_group
    from graphprune.pipeline.config import load_pipeline
    from graphprune.pipeline.run import run_file

    pipeline = load_pipeline(args.pipeline, args.set, _hidden_step(args))
    with process_group():
        result = run_file(pipeline, args.model, args.output, args.data, args.eval_data, args.force, console,
                          held_out=args.held_out)
    if result is None:  # not the main rank
        return
    console.print(f"wrote {result.output}")
    for path in result.reports:
        console.print(f"report: {path}")


def _demo(args: argparse.Namespace, console: Console) -> None:
    from graphprune import models
    from graphprune.pipeline.demo import run_demo

    if args.model not in models.REFERENCE_MODELS:
        raise BadInputError(f"unknown reference model '{args.model}' (known: {', '.join(models.REFERENCE_MODELS)})")
    if models.INPUT_SHAPES[args.model] != models.INPUT_SHAPE:
        raise BadInputError(f"the demo trains on Fashion-MNIST (1 x 28 x 28); '{args.model}' takes {models.INPUT_SHAPES[args.model]}")
    if args.epochs <= 0 or args.finetune_epochs <= 0:
        raise BadInputError("--epochs and --finetune-epochs must be positive")
    result = run_demo(args.model, args.output_dir, console, args.epochs, args.finetune_epochs, args.pipeline)
    console.print(f"pruned model: {result.output}")
    for path in (result.report_html, result.report_json):
        if path is not None:
            console.print(f"report: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    err = Console(stderr=True)
    try:
        from graphprune.execution.sessions import quiet_onnxruntime

        quiet_onnxruntime()
        {"groups": _groups, "analyze": _analyze, "prune": _prune, "run": _run, "demo": _demo}[args.command](args, console)
    except GraphpruneError as exc:
        if args.debug:
            raise
        err.print(f"graphprune: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("graphprune: interrupted; nothing was written", markup=False)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        err.print(f"graphprune: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", markup=False, highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
