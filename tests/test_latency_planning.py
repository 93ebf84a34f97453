"""Latency-aware planning: the profile pass, level 1 by predicted ms, fast counts, both batches in validate and report.

No assertion depends on how fast this machine is: structure, finiteness,
cache counters, floors and fast counts, and the direction of a planted case.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from graphprune import models
from graphprune.analysis.latency import AxisSpec, BuildStats, LatencyModel, OpTable
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.cli import main
from graphprune.errors import BadInputError
from graphprune.execution.measure import Figures
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx
from graphprune.pipeline.config import parse_pipeline, run_passes
from graphprune.pipeline.passes import Workspace, slower_line
from graphprune.pipeline.workspace import Validation
from graphprune.planning.hierarchical import make_plan
from graphprune.planning.latency import fast_candidates
from graphprune.planning.options import PlanOptions


def _data(n: int = 64) -> Calibration:
    x = np.random.default_rng(1).standard_normal((n, *models.INPUT_SHAPE)).astype(np.float32)
    return Calibration((x,), np.random.default_rng(2).integers(0, 10, n), "random")


def _npz(path: Path, n: int = 64) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.standard_normal((n, *models.INPUT_SHAPE)).astype(np.float32), labels=rng.integers(0, 10, n))
    return path


PROFILE = {"name": "profile", "runs": 1, "model_runs": 3}


@pytest.fixture(scope="module")
def profiled(exported, tmp_path_factory) -> Workspace:
    """vgg analysed and profiled (tables from the analysis' floors up)."""
    om = OnnxPrunable(load_onnx(exported("vgg")))
    ws = Workspace(original=om, model=om, data=_data())
    cache = str(tmp_path_factory.mktemp("cache"))
    pipeline = parse_pipeline({"pass": [{"name": "analyze", "samples": 64}, {**PROFILE, "cache_dir": cache}]})
    return run_passes(pipeline, ws)


def test_profile_pass_stores_the_model_and_says_what_it_cost(exported, profiled, tmp_path):
    lm = profiled.latency
    assert lm is not None and "latency" in profiled.facts()
    assert lm.stats.measurements > 0 and math.isfinite(lm.original_ms) and lm.original_ms > 0
    assert lm.setting["batch"] == 1
    floors = {g.group: g.effective for g in profiled.analysis.groups}
    assert all(min(lm.counts[g]) == max(1, f) for g, f in floors.items() if g in lm.counts)
    lines: list[str] = []
    om = OnnxPrunable(load_onnx(exported("vgg")))
    again = Workspace(original=om, model=om, data=_data(), status=lines.append)
    cache = lm.setting  # a fresh cache: measured; then the second build is all cache hits
    pipeline = parse_pipeline({"pass": [{**PROFILE, "cache_dir": str(tmp_path)}]})
    first = run_passes(pipeline, again).latency
    second = run_passes(pipeline, Workspace(original=om, model=om, status=lines.append)).latency
    assert first is not None and second is not None and cache["provider"] == second.setting["provider"]
    assert first.stats.measurements > 0 and second.stats.measurements == 0
    assert second.stats.cache_hits == first.stats.cache_hits + first.stats.measurements
    cost = [line for line in lines if line.startswith("latency model:")]
    assert len(cost) == 2 and "0 measurements" in cost[1] and "cache hits" in cost[1] and " s on " in cost[1]


def test_profile_options_are_checked_before_anything_runs():
    with pytest.raises(BadInputError, match="batch"):
        parse_pipeline({"pass": [{"name": "profile", "batch": 0}]})
    with pytest.raises(BadInputError, match="profile"):
        parse_pipeline({"pass": [{"name": "plan", "ratio": 0.3, "method": "uniform", "criterion": "l1"}, {"name": "profile"}]})
    with pytest.raises(BadInputError, match="objective"):
        PlanOptions(ratio=0.3, objective="speed").check()


def test_profile_skips_torch_models_in_one_line():
    import torch

    from graphprune.backends.torch_model import module_model

    model = module_model(models.build("vgg").eval(), (torch.zeros(2, *models.INPUT_SHAPE),))
    lines: list[str] = []
    ws = run_passes(parse_pipeline({"pass": [PROFILE]}), Workspace(original=model, model=model, status=lines.append))
    assert ws.latency is None
    assert sum("skipped" in line for line in lines) == 1


def test_latency_plan_respects_floors_and_fast_counts(profiled):
    ws, lm = profiled, profiled.latency
    assert lm is not None
    plan = make_plan(ws.original.graph, ws.groups(), PlanOptions(macs=0.7), ws.analysis, lm)
    assert plan.meta["objective"] == "latency"
    floors = {g.group: max(1, g.effective) for g in ws.analysis.groups}
    kept = {g.group: len(g.keep) for g in plan.groups}
    for gid, k in kept.items():
        assert k >= floors[gid]
        if plan.meta.get("fast_counts"):
            assert k in fast_candidates(lm, gid, floors[gid])
    assert math.isfinite(plan.meta["predicted_ms"])
    old = make_plan(ws.original.graph, ws.groups(), PlanOptions(macs=0.7), ws.analysis)
    assert old.meta["objective"] == "macs" and "predicted_ms" not in old.meta
    same = make_plan(ws.original.graph, ws.groups(), PlanOptions(macs=0.7, objective="macs"), ws.analysis)
    assert same.groups == old.groups
    rounded = make_plan(ws.original.graph, ws.groups(), PlanOptions(macs=0.7, round_to=8), ws.analysis, lm)
    assert "fast_counts" not in rounded.meta


def _planted(ws: Workspace, steep: int) -> LatencyModel:
    """A latency model where only group ``steep`` costs time (1 ms per channel); every other group is free."""
    coupling = ws.groups()
    channels = {g.id: g.channels for g in coupling.prunable}
    counts = {g: tuple(range(1, c + 1)) for g, c in channels.items()}
    c = channels[steep]
    axis = AxisSpec("t", 1, c, ((steep, 1, c),))
    table = OpTable("n", ("Conv",), (axis,), tuple(((k,), float(k)) for k in range(1, c + 1)), "planted")
    return LatencyModel(float(c) + 1.0, (table,), counts, channels, (), {"batch": 1, "threads": 0, "provider": "planted"}, BuildStats())


def test_objective_latency_moves_pruning_to_the_group_that_costs_time(profiled):
    ws = profiled
    floors = {g.group: max(1, g.effective) for g in ws.analysis.groups}
    room = {g: ws.groups().by_id(g).channels - f for g, f in floors.items()}
    steep = max(room, key=lambda g: room[g])
    lm = _planted(ws, steep)
    by_macs = make_plan(ws.original.graph, ws.groups(), PlanOptions(macs=0.8, objective="macs", allow_over_limit=True), ws.analysis)
    by_ms = make_plan(ws.original.graph, ws.groups(), PlanOptions(macs=0.8, objective="latency", allow_over_limit=True), ws.analysis, lm)
    kept_macs = {g.group: len(g.keep) for g in by_macs.groups}
    kept_ms = {g.group: len(g.keep) for g in by_ms.groups}
    full = ws.groups().by_id(steep).channels
    assert kept_ms.get(steep, full) < kept_macs.get(steep, full)
    # groups that save no time keep all their channels when they can (their only fast count is C)
    free_pruned_ms = sum(ws.groups().by_id(g).channels - k for g, k in kept_ms.items() if g != steep)
    free_pruned_macs = sum(ws.groups().by_id(g).channels - k for g, k in kept_macs.items() if g != steep)
    assert free_pruned_ms < free_pruned_macs
    assert by_ms.meta["predicted_ms"] < lm.original_ms


def test_latency_target_plans_with_the_model_then_measures_once(profiled):
    from graphprune.planning.targets import plan_for

    ws = profiled
    plan, described = plan_for(ws.groups(), ws.analysis, PlanOptions(latency=0.9, latency_runs=3, allow_over_limit=True),
                               ws.original, ws.latency)
    assert described == "latency 0.9"
    for key in ("predicted_ms", "measured_ms", "measured_original_ms", "measured_latency"):
        assert math.isfinite(plan.meta[key]) and plan.meta[key] > 0
    assert plan.meta["predicted_ms"] <= 0.9 * ws.latency.original_ms * (1 + 1e-9)


def test_slower_line_wording():
    before, after = Figures(10, 10, 1.0, None), Figures(5, 5, 1.15, None)
    line = slower_line(Validation("CPUExecutionProvider", before, after), {"predicted_ms": 0.9, "original_predicted_ms": 1.0})
    assert line is not None and line.startswith("the pruned model is 1.15x slower than the original on CPUExecutionProvider at batch 1: ")
    assert "written anyway" in line and "\n" not in line
    assert slower_line(Validation("CPUExecutionProvider", after, before), {}) is None
    v = Validation("CPUExecutionProvider", Figures(1, 1, 1.0, None, 4.0), Figures(1, 1, 0.5, None, 2.0), 4, 2.2)
    assert v.prediction_error == pytest.approx(0.1)


def test_prune_cli_reports_both_batches_and_the_prediction(exported, tmp_path, capsys):
    data = _npz(tmp_path / "cal.npz")
    out = tmp_path / "small.onnx"
    args = ["prune", str(exported("vgg")), "-o", str(out), "--macs", "0.7", "--data", str(data), "--samples", "64",
            "--latency-batch", "2", "--threads", "1", "--latency-runs", "3", "--allow-over-limit"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "latency model: " in text and "planned by latency: predicted" in text
    report = json.loads((tmp_path / "small.report.json").read_text())
    f = report["figures"]
    assert f["latency_batch"] == 2
    for key in ("speedup_batch_1", "speedup_batch_2", "predicted_ms", "prediction_error"):
        assert math.isfinite(f[key])
    assert f["latency_model"]["setting"]["batch"] == 2 and f["latency_model"]["setting"]["threads"] == 1
    assert f["latency_model"]["stats"]["measurements"] + f["latency_model"]["stats"]["cache_hits"] > 0
    assert report["plan_meta"]["objective"] == "latency"
    saved = LatencyModel.load(tmp_path / "small.latency.json")
    assert saved.setting["batch"] == 2
    assert "--no-profile" in _help()


def _help() -> str:
    from graphprune.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices["prune"].format_help()  # type: ignore[union-attr]


def test_report_rows_name_both_batches_and_the_prediction(profiled):
    from graphprune.report.prune import before_after_rows

    ws = profiled
    ws.validation = Validation("CPUExecutionProvider", Figures(10, 10, 1.0, None, 4.0), Figures(5, 5, 1.15, None, 2.0), 4, 2.2)
    try:
        rows = {r[0]: r for r in before_after_rows(ws)}
    finally:
        ws.validation = None
    assert rows["latency, batch 1 (CPUExecutionProvider)"][3] == "1.15x slower"
    assert rows["latency, batch 4 (CPUExecutionProvider)"][3] == "2.00x faster"
    assert rows["latency predicted / measured, batch 4"][3] == "+10.0% error"
    assert "latency model build" in rows


def test_the_limit_plan_keeps_r_g_or_rises_to_fast_counts(profiled):
    """No target: every group keeps at least its effective filters; with the tables, counts rise to fast ones only
    when that is predicted faster, and the plan records its prediction."""
    from graphprune.planning.targets import limit_plan

    lm, analysis = profiled.latency, profiled.analysis
    assert lm is not None and analysis is not None
    graph, coupling = profiled.original.graph, profiled.groups()
    bare = limit_plan(graph, coupling, analysis, "effective", 1)
    timed = limit_plan(graph, coupling, analysis, "effective", 1, lm)
    floors = {g.group: g.effective for g in analysis.groups}
    for g in timed.groups:
        assert len(g.keep) >= floors[g.group]
    assert timed.meta["predicted_ms"] <= lm.predict({g.group: len(g.keep) for g in bare.groups if g.group in lm.channels}) + 1e-12
    if timed.meta.get("fast_counts"):
        assert all(len(g.keep) in fast_candidates(lm, g.group, floors[g.group]) for g in timed.groups if g.group in lm.channels)
    else:
        assert [len(g.keep) for g in timed.groups] == [len(g.keep) for g in bare.groups]
