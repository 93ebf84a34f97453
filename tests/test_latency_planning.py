"""Latency-aware planning: the profile pass, level 1 by predicted ms, fast counts, both batches in validate and report.

No assertion depends on how fast this machine is: structure, finiteness,
cache counters, floors and fast counts, and the direction of a planted case.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
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
from graphprune.ir.model import Int8Form
from graphprune.pipeline.config import parse_pipeline, run_passes
from graphprune.pipeline.passes import Workspace, measured_line, slower_line
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


@pytest.fixture(scope="module")
def deep(profiled, tmp_path_factory) -> Workspace:
    """The same vgg profiled below its floors (tables from one channel up, as --allow-over-limit profiles)."""
    cache = str(tmp_path_factory.mktemp("deep-cache"))
    pipeline = parse_pipeline({"pass": [{**PROFILE, "cache_dir": cache, "below_floors": True}]})
    om = profiled.original
    return run_passes(pipeline, Workspace(original=om, model=om, data=_data(), analysis=profiled.analysis))


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
    cache = lm.setting  # a fresh cache: measured; then the second build is all cache hits (trusted: no spot checks)
    pipeline = parse_pipeline({"pass": [{**PROFILE, "cache_dir": str(tmp_path), "cache_check": 0}]})
    first = run_passes(pipeline, again).latency
    second = run_passes(pipeline, Workspace(original=om, model=om, status=lines.append)).latency
    assert first is not None and second is not None and cache["provider"] == second.setting["provider"]
    assert first.stats.measurements > 0 and second.stats.measurements == 0
    assert second.stats.cache_hits == first.stats.cache_hits + first.stats.measurements
    cost = [line for line in lines if line.startswith("latency model:")]
    assert len(cost) == 2 and "0 measurements" in cost[1] and "cache hits" in cost[1] and " s on " in cost[1]



def test_a_stale_cache_is_spot_checked_and_measured_again(exported, tmp_path):
    """Cached points planted 10x too slow: each cached table's full-size point is timed again, found stale, re-measured."""
    om = OnnxPrunable(load_onnx(exported("vgg")))
    fresh = run_passes(parse_pipeline({"pass": [{**PROFILE, "cache_dir": str(tmp_path)}]}), Workspace(original=om, model=om)).latency
    assert fresh is not None and fresh.stats.measurements > 0 and fresh.stats.spot_checks == 0
    for f in tmp_path.glob("*.json"):
        data = json.loads(f.read_text())
        data["points"] = [[p, 10.0 * v] for p, v in data["points"]]
        f.write_text(json.dumps(data))
    trusted = run_passes(parse_pipeline({"pass": [{**PROFILE, "cache_dir": str(tmp_path), "cache_check": 0}]}),
                         Workspace(original=om, model=om)).latency
    assert trusted is not None and trusted.stats.measurements == 0 and trusted.stats.spot_checks == 0
    lines: list[str] = []
    checked = run_passes(parse_pipeline({"pass": [{**PROFILE, "cache_dir": str(tmp_path)}]}),
                         Workspace(original=om, model=om, status=lines.append)).latency
    assert checked is not None and checked.stats.spot_checks == checked.stats.stale_tables == fresh.stats.tables
    assert checked.stats.tables_cached == 0 and checked.stats.measurements == fresh.stats.measurements - fresh.stats.tables
    assert any("stale and measured again" in line for line in lines)
    again = run_passes(parse_pipeline({"pass": [{**PROFILE, "cache_dir": str(tmp_path), "cache_check": 0}]}),
                       Workspace(original=om, model=om)).latency
    assert again is not None and again.stats.measurements == 0  # the re-measured points were written back
    total = {name: sum(v for t in lm.tables for _, v in t.points) for name, lm in (("again", again), ("fresh", fresh))}
    assert total["again"] < 5 * total["fresh"]  # measured anew, not the planted 10x (one-run points are noisy: summed)


def test_profile_below_floors_tabulates_from_one_channel_and_the_cli_sets_it_past_the_limit(deep, tmp_path):
    from graphprune.cli import _prune_passes, build_parser

    ws = deep
    assert ws.latency is not None and all(min(c) == 1 for c in ws.latency.counts.values())
    data = str(_npz(tmp_path / "cal.npz"))
    for flag, expected in (([], False), (["--allow-over-limit"], True)):
        args = build_parser().parse_args(["prune", "m.onnx", "-o", "s.onnx", "--macs", "0.5", "--data", data, *flag])
        (profile,) = [p for p in _prune_passes(args) if p["name"] == "profile"]
        assert profile["below_floors"] is expected

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



def _stairs(ws: Workspace, step: int = 8) -> LatencyModel:
    """A latency model where every group costs ceil(k / step) ms: its fast counts are the multiples of ``step`` (and C)."""
    channels = {g.id: g.channels for g in ws.groups().prunable}
    tables = tuple(OpTable(f"n{g}", ("Conv",), (AxisSpec("t", 1, c, ((g, 1, c),)),),
                           tuple(((k,), float(math.ceil(k / step))) for k in range(1, c + 1)), "planted")
                   for g, c in channels.items())
    total = sum(math.ceil(c / step) for c in channels.values())
    return LatencyModel(float(total), tables, {g: tuple(range(1, c + 1)) for g, c in channels.items()}, channels, (),
                        {"batch": 1, "threads": 0, "provider": "planted"}, BuildStats())


@pytest.mark.parametrize("macs", [0.6, 0.45, 0.3])
def test_fast_counts_do_not_overshoot_the_macs_target(profiled, macs):
    """Snapped to fast counts, the plan meets the target and no group could rise to its next fast count and still meet it."""
    from graphprune.analysis.cost import cost_with_keep

    ws = profiled
    lm = _stairs(ws)
    graph, coupling = ws.original.graph, ws.groups()
    plan = make_plan(graph, coupling, PlanOptions(macs=macs, allow_over_limit=True), ws.analysis, lm)
    assert plan.meta.get("fast_counts") is True
    full = {g.id: g.channels for g in coupling.prunable}
    keep = {**full, **{g.group: len(g.keep) for g in plan.groups}}
    assert all(k % 8 == 0 or k == full[g] for g, k in keep.items())
    goal = macs * cost_with_keep(graph, coupling, full).macs
    assert cost_with_keep(graph, coupling, keep).macs <= goal
    for gid in lm.channels:
        up = [c for c in fast_candidates(lm, gid, 1) if c > keep[gid]]
        if up:
            assert cost_with_keep(graph, coupling, {**keep, gid: up[0]}).macs > goal, (gid, keep[gid], up[0])


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


def test_latency_target_plans_with_the_model_then_measures_once(deep):
    from graphprune.planning.targets import plan_for

    ws = deep
    lm = ws.latency
    assert lm is not None
    # The target lies halfway between the full model and every group at one channel, as this machine's tables
    # (profiled from one channel up) predict them: reachable by construction, whatever the machine's speed or
    # noise. A cap below 1 could fall under that deepest point when the tables show little to gain.
    deepest = lm.predict({g: 1 for g in lm.channels})
    assert deepest < lm.original_ms
    target = math.ceil((lm.original_ms + deepest) / 2 / lm.original_ms * 1000) / 1000
    plan, described = plan_for(ws.groups(), ws.analysis, PlanOptions(latency=target, latency_runs=3, allow_over_limit=True),
                               ws.original, lm)
    assert described == f"latency {target:g}"
    for key in ("predicted_ms", "measured_ms", "measured_original_ms", "measured_latency"):
        assert math.isfinite(plan.meta[key]) and plan.meta[key] > 0
    assert plan.meta["predicted_ms"] <= target * lm.original_ms * (1 + 1e-9)


def test_slower_line_wording():
    before, after = Figures(10, 10, 1.0, None), Figures(5, 5, 1.15, None)
    line = slower_line(Validation("CPUExecutionProvider", before, after), {"predicted_ms": 0.9, "original_predicted_ms": 1.0})
    assert line is not None and line.startswith("the pruned model is 1.15x slower at batch 1 than the original on CPUExecutionProvider: ")
    assert "written anyway" in line and "\n" not in line
    assert slower_line(Validation("CPUExecutionProvider", after, before), {}) is None
    v = Validation("CPUExecutionProvider", Figures(1, 1, 1.0, None, 4.0), Figures(1, 1, 0.5, None, 2.0), 4, 2.2)
    assert v.prediction_error == pytest.approx(0.1)
    # faster at batch 1, slower at the validation's batch: said too
    v = Validation("CPUExecutionProvider", Figures(1, 1, 1.0, None, 4.0), Figures(1, 1, 0.5, None, 5.0), 4)
    line = slower_line(v, {})
    assert line is not None and line.startswith("the pruned model is 1.25x slower at batch 4 than the original on CPUExecutionProvider: ")
    # after a quantize pass each precision is compared with its own original, and a float prediction with the fp32 model
    fp32, int8 = Figures(1, 1, 1.0, None, 4.0), Figures(1, 1, 0.8, None, 3.0)
    v = Validation("CPUExecutionProvider", fp32, Figures(1, 1, 0.9, None, 3.3), 4, 1.65, Figures(1, 1, 0.5, None, 1.5), int8, True)
    line = slower_line(v, {})
    assert line is not None and "the fp32 pruned" not in line
    assert line.startswith("the int8 pruned model is 1.12x slower at batch 1 and 1.10x slower at batch 4 than the int8 original")
    assert v.prediction_error == pytest.approx(0.1)  # 1.65 against the fp32 pruned 1.5


def test_validation_reads_the_plans_own_prediction(profiled):
    """A plan made on the latency model keeps the prediction the anchors gave it; a plan from elsewhere is predicted."""
    from graphprune.pipeline.passes import plan_prediction

    lm = profiled.latency
    plan = make_plan(profiled.original.graph, profiled.groups(), PlanOptions(macs=0.6, allow_over_limit=True), profiled.analysis, lm)
    counts = {g.group: len(g.keep) for g in plan.groups if g.group in lm.channels}
    anchored = dataclasses.replace(plan, meta={**plan.meta, "predicted_ms": 0.5 * plan.meta["predicted_ms"]})
    assert plan_prediction(anchored, lm) == pytest.approx(0.5 * plan.meta["predicted_ms"])
    other = dataclasses.replace(anchored, meta={**anchored.meta, "original_predicted_ms": 2 * lm.original_ms})
    assert plan_prediction(other, lm) == pytest.approx(lm.predict(counts))


def test_prediction_error_with_the_machines_change_of_speed_cancelled():
    from graphprune.report.prune import prediction_change

    # the plan pass's line: profiled on a slower machine (0.494 ms), checked at 0.34 ms
    meta = {"measured_ms": 0.25, "measured_original_ms": 0.34, "predicted_ms": 0.366, "original_predicted_ms": 0.494}
    assert "predicted 0.366 ms (+46.4% error; +0.8% as a fraction of the original)" in measured_line(meta, 1)
    assert "predicted 0.366 ms (+46.4% error)" in measured_line({**meta, "original_predicted_ms": None}, 1)

    # profiled: original 4.0 ms, plan predicted 2.2 (0.55); validated on a machine 1.25x slower: 5.0 and 2.5 (0.5)
    v = Validation("CPUExecutionProvider", Figures(1, 1, 1.0, None, 5.0), Figures(1, 1, 0.5, None, 2.5), 4, 2.2,
                   predicted_original_ms=4.0)
    assert v.prediction_error == pytest.approx(-0.12)
    assert v.relative_prediction_error == pytest.approx(0.1)
    assert prediction_change(v) == "-12.0% error (+10.0% as a fraction of the original)"
    assert Validation("CPUExecutionProvider", v.before, v.after, 4, 2.2).relative_prediction_error is None
    # after a quantize pass a float prediction is of the fp32 pruned model, against the fp32 original
    q = Validation("CPUExecutionProvider", Figures(1, 1, 1.0, None, 4.0), Figures(1, 1, 0.9, None, 3.3), 4, 1.65,
                   Figures(1, 1, 0.5, None, 1.5), Figures(1, 1, 0.8, None, 3.0), True, 3.0)
    assert q.relative_prediction_error == pytest.approx((0.55 - 0.375) / 0.375)


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
    for key in ("speedup_batch_1", "speedup_batch_2", "predicted_ms", "prediction_error", "relative_prediction_error"):
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


class _Planted:
    """A model whose measured latency is planted: 1.0 ms unpruned; pruned, ``ms_of(counts)``; every call counted."""

    def __init__(self, inner, ms_of, calls, counts=None):
        self.inner, self.ms_of, self.calls, self.counts = inner, ms_of, calls, counts

    def pruned(self, coupling, plan):
        return _Planted(self.inner.pruned(coupling, plan), self.ms_of, self.calls, {g.group: len(g.keep) for g in plan.groups})

    def latency_ms(self, batch, runs, threads=0, quantized=None):
        self.calls.append((batch, threads, self.counts, quantized))
        if self.counts is None:
            return 1.0
        return self.ms_of(self.counts, batch) if self.ms_of.__code__.co_argcount == 2 else self.ms_of(self.counts)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(autouse=True)
def _planted_side_by_side(monkeypatch):
    """Side-by-side timings of planted models read their planted figures, in the order given (the real timing is
    tested in tests/test_sessions.py)."""
    from graphprune.execution import timing

    real = timing.side_by_side_ms

    def side_by_side(models, batch, runs, threads=0, quantized=None):
        if all(isinstance(m, _Planted) for m in models):
            return [m.latency_ms(batch, runs, threads, quantized) for m in models]
        return real(models, batch, runs, threads, quantized)

    monkeypatch.setattr(timing, "side_by_side_ms", side_by_side)


def _measured_plan(profiled, ms_of, setting=None, **options):
    from graphprune.planning.targets import plan_for

    calls: list = []
    model = _Planted(profiled.original, ms_of, calls)
    lm = profiled.latency if setting is None else dataclasses.replace(profiled.latency, setting={**profiled.latency.setting, **setting})
    plan, _ = plan_for(profiled.groups(), profiled.analysis, PlanOptions(macs=0.6, latency_runs=2, allow_over_limit=True, **options),
                       model, lm)
    assert all(b in (1, lm.setting["batch"]) and t == lm.setting["threads"] and q == Int8Form.of_setting(lm.setting)
               for b, t, _, q in calls)
    return plan, calls


def _blocked_anchor(plan) -> int:
    """The timings of the first plan's blocked re-plan as an anchor (2, the re-plan beside the original, at the latency
    batch): taken when the machine's fast counts put the first plan off multiples of 8 (see _blocked_first)."""
    return 2 if "blocked_anchor_measured" in plan.meta else 0


def _first_at(planned: dict, ms: float):
    """``planned`` counts take ``ms``, any other 0.4 (one argument: the same at every batch)."""
    return lambda counts: ms if counts == planned else 0.4


def _plan_and_fewer(profiled, kept: float):
    """A plan at macs 0.6, its counts, and a re-plan with one channel fewer in every group of more than one,
    said to keep ``kept`` x the plan's fraction of the target (no machine's fast counts decide the test)."""
    ws, lm = profiled, profiled.latency
    plan = make_plan(ws.original.graph, ws.groups(), PlanOptions(macs=0.6, allow_over_limit=True), ws.analysis, lm)
    planned = {g.group: len(g.keep) for g in plan.groups}
    assert 0 < plan.meta["target_kept"] <= 0.6
    fewer = tuple(dataclasses.replace(g, keep=g.keep[:-1]) if len(g.keep) > 1 else g for g in plan.groups)
    other = dataclasses.replace(plan, groups=fewer, meta={**plan.meta, "target_kept": plan.meta["target_kept"] * kept})
    assert {g.group: len(g.keep) for g in other.groups} != planned
    return plan, planned, other


def _repaired_multiple(plan, slow: dict, coupling) -> int:
    """The multiple of the re-plan that repaired ``plan``: 8, or 16 where the multiples-of-8 re-plan had the slow
    plan's own counts (the machine's tables chose multiples of 8 already, so that re-plan was not measured again)."""
    match = re.fullmatch(r"re-planned with counts multiples of (\d+)", plan.meta.get("repaired", ""))
    assert match, plan.meta.get("repaired")
    multiple = int(match.group(1))
    full = {g: coupling.by_id(g).channels for g in slow}
    assert multiple == 8 or (multiple == 16 and all(k % 8 == 0 or k == full[g] for g, k in slow.items()))
    return multiple


def test_the_plan_is_checked_at_batch_1_and_the_latency_batch_and_repaired_when_slower_at_either(profiled):
    """Planted: at batch 4 every plan is 2x faster; at batch 1 the first plan is 1.25x slower, the re-plans faster."""
    first, _ = _measured_plan(profiled, lambda counts: 0.5, {"batch": 4})
    slow = {g.group: len(g.keep) for g in first.groups}
    plan, calls = _measured_plan(profiled, lambda counts, b: 1.25 if counts == slow and b == 1 else 0.5, {"batch": 4})
    # the original and the first plan at batch 4 (the anchor), then the plan and the 8s, each beside the original,
    # at both batches
    assert {b for b, *_ in calls} == {1, 4} and len(calls) == plan.meta["measurements"] == 10 + _blocked_anchor(plan)
    _repaired_multiple(plan, slow, profiled.groups())
    assert "measured_slower" not in plan.meta
    assert plan.meta["measured_at"] == {"1": [0.5, 1.0], "4": [0.5, 1.0]}
    line = measured_line(plan.meta, 4)
    assert "at batch 4: 0.500 ms against 1.000 ms (2.00x faster), at batch 1: 0.500 ms" in line
    # slower at batch 1 whatever is tried: kept as the least slower, and said
    plan, _ = _measured_plan(profiled, lambda counts, b: 1.25 if b == 1 else 0.5, {"batch": 4})
    assert plan.meta["measured_slower"] is True and "at batch 1: 1.250 ms against 1.000 ms (1.25x slower)" in measured_line(plan.meta, 4)


def test_the_first_plan_is_measured_and_anchors_the_latency_model_before_the_plan_is_made(profiled):
    """Planted: every pruned model runs at 0.7 of the original; the kept plan is predicted from the anchored model."""
    plan, calls = _measured_plan(profiled, lambda counts: 0.7)
    assert calls[0][2] is None and calls[1][2] is not None, "the original, then the first plan"
    assert plan.meta["anchor_measured"] == pytest.approx(0.7)
    first = make_plan(profiled.original.graph, profiled.groups(), PlanOptions(macs=0.6, allow_over_limit=True), profiled.analysis,
                      profiled.latency)
    assert plan.meta["anchor_predicted"] == pytest.approx(first.meta["predicted_ms"] / profiled.latency.original_ms)
    anchored = profiled.latency.anchored({g.group: len(g.keep) for g in first.groups}, 0.7)
    assert plan.meta["predicted_ms"] == pytest.approx(anchored.predict({g.group: len(g.keep) for g in plan.groups}))


def test_the_first_plans_blocked_re_plan_anchors_the_blocked_plans_curve(profiled):
    """Planted: counts that are all multiples of 8 run at 0.5 of the original, others at 0.7. The first plan (counts
    multiples of 3) anchors its curve; its re-plan with multiples of 8, which the check measures too, anchors the
    blocked plans' curve; the kept plan is predicted on the curve of its kind."""
    from graphprune.planning.targets import _blocked_first

    lm, graph, coupling = profiled.latency, profiled.original.graph, profiled.groups()
    assert lm.block == 8

    def counts(plan):
        return {g.group: len(g.keep) for g in plan.groups}

    def options(round_to):
        return PlanOptions(macs=0.6, allow_over_limit=True, round_to=round_to)

    first = make_plan(graph, coupling, options(3), profiled.analysis, lm)
    assert not lm.is_blocked(counts(first)), "multiples of 3 that are all multiples of 8: the test needs another rounding"
    plan, calls = _measured_plan(profiled, lambda c: 0.5 if lm.is_blocked(c) else 0.7, round_to=3)
    once = lm.anchored(counts(first), 0.7)
    blocked = make_plan(graph, coupling, options(8), profiled.analysis, once)
    assert calls[3][2] == counts(blocked), "the original and the first plan, then the original and its blocked re-plan"
    assert plan.meta["anchor_measured"] == pytest.approx(0.7) and plan.meta["blocked_anchor_measured"] == pytest.approx(0.5)
    assert plan.meta["blocked_anchor_predicted"] == pytest.approx(blocked.meta["predicted_ms"] / lm.original_ms)
    assert plan.meta["measurements"] == len(calls)
    assert plan.meta["repaired"] == "kept with counts multiples of 8, measured faster than the planned counts"
    twice = once.anchored(counts(blocked), 0.5)
    assert plan.meta["predicted_ms"] == pytest.approx(twice.predict(counts(plan)))
    # no blocked anchor: a model that does not tell blocked plans apart, or a first plan whose counts keep the blocking
    replan = lambda m: make_plan(graph, coupling, options(m), profiled.analysis, once)  # noqa: E731
    assert _blocked_first(replan, first, once, 3) is not None
    assert _blocked_first(replan, first, dataclasses.replace(once, block=0), 3) is None
    assert _blocked_first(replan, blocked, once, 1) is None


def test_a_latency_model_of_the_int8_model_times_the_check_quantized(profiled):
    plan, calls = _measured_plan(profiled, lambda counts: 0.5, {"quantized": "int8 QDQ", "int8": {"activations": "int8", "reduce_range": False}})
    assert calls and all(q == Int8Form("int8", False) for *_, q in calls) and plan.meta["measured_ms"] == 0.5


def test_a_plan_measured_slower_is_repaired_by_measurement(profiled):
    """Planted: the first plan measures 2x slower than the original, any other 2x faster: the re-plan at multiples of 8 is kept."""
    first, _ = _measured_plan(profiled, lambda counts: 0.5)
    # the plan and its multiples-of-8 re-plan are both measured; equal times keep the plan
    assert first.meta["measured_ms"] == 0.5 and first.meta["measurements"] - _blocked_anchor(first) in (4, 6) and "repaired" not in first.meta
    slow = {g.group: len(g.keep) for g in first.groups}
    plan, calls = _measured_plan(profiled, lambda counts: 2.0 if counts == slow else 0.5)
    counts = {g.group: len(g.keep) for g in plan.groups}
    multiple = _repaired_multiple(plan, slow, profiled.groups())
    assert counts != slow and all(k % multiple == 0 or k == profiled.groups().by_id(g).channels for g, k in counts.items())
    assert plan.meta["measured_ms"] == 0.5 and plan.meta["measured_original_ms"] == 1.0
    # anchor (2, and its blocked re-plan's 2), plan and one re-plan (no other needed), each beside the original
    assert len(calls) == plan.meta["measurements"] == 6 + _blocked_anchor(plan)
    assert "measured_slower" not in plan.meta
    assert f"re-planned with counts multiples of {multiple}" in measured_line(plan.meta, 1)


def test_multiples_of_8_measured_faster_than_a_fast_plan_are_kept(profiled):
    """The re-plan keeps as much of the target as the plan (within OVERSHOOT) and measures faster: kept."""
    from graphprune.planning.targets import never_slower

    plan, planned, other = _plan_and_fewer(profiled, 1.0)
    calls: list = []
    model = _Planted(profiled.original, _first_at(planned, 0.8), calls)
    checked = never_slower(model, profiled.groups(), plan, profiled.latency, lambda multiple: other, runs=2)
    assert checked.meta["measured_ms"] == 0.4 and "measured_slower" not in checked.meta
    assert checked.meta["repaired"] == "kept with counts multiples of 8, measured faster than the planned counts"
    assert len(calls) == 4  # the plan and the re-plan, each beside the original


def test_a_plan_still_slower_after_repair_is_kept_and_said_in_one_line(profiled):
    plan, calls = _measured_plan(profiled, lambda counts: 1.5)
    assert plan.meta["measured_slower"] is True and "repaired" not in plan.meta
    # the anchors; the plan and two re-plans, each beside the original
    assert plan.meta["measurements"] == len(calls) <= 2 + _blocked_anchor(plan) + 2 * 3
    line = measured_line(plan.meta, 1)
    assert "1.50x slower" in line and "still slower" in line and "\n" not in line
    v = Validation("CPUExecutionProvider", Figures(1, 1, 1.0, None), Figures(1, 1, 1.5, None))
    why = slower_line(v, plan.meta, True)
    assert why is not None and "no re-plan with counts multiples of 8 or 16 measured faster" in why


def test_a_slow_plan_at_the_limit_names_the_faster_counts_within_it(profiled):
    """Planted: the plan measures 1.5x slower and its re-plans at multiples go past the effective filters. The
    within-limit plan at multiples measures faster: reported with the target share it keeps, never kept."""
    from graphprune.errors import OverLimitError
    from graphprune.planning.targets import never_slower

    plan, planned, other = _plan_and_fewer(profiled, 1.2)
    calls: list = []
    model = _Planted(profiled.original, _first_at(planned, 1.5), calls)

    def beyond(multiple):
        raise OverLimitError(f"with --round-to {multiple} the target is beyond the estimated maximum compression")

    checked = never_slower(model, profiled.groups(), plan, profiled.latency, beyond, runs=2, within=lambda multiple: other)
    assert {g.group: len(g.keep) for g in checked.groups} == planned, "the slow plan at the target is kept"
    found = checked.meta["faster_within"]
    assert checked.meta["measured_slower"] is True and found["multiple"] == 8
    assert found["target_kept"] == pytest.approx(other.meta["target_kept"]) and found["measured_at"] == {"1": [0.4, 1.0]}
    line = measured_line(checked.meta, 1)
    assert f"keep {other.meta['target_kept']:.3f} of the macs and measured 2.50x faster at batch 1" in line
    assert f"ask for --macs {other.meta['target_kept']:.3f}" in line
    assert checked.meta["measurements"] == len(calls) == 4  # the plan and the within-limit plan, each beside the original
    # a within-limit plan no faster than the original is not reported
    slow = never_slower(_Planted(profiled.original, lambda counts: 1.5, []), profiled.groups(), plan, profiled.latency, beyond,
                        runs=2, within=lambda multiple: other)
    assert "faster_within" not in slow.meta and slow.meta["measured_slower"] is True


def test_no_measured_check_with_zero_runs(profiled):
    from graphprune.planning.targets import plan_for

    calls: list = []
    model = _Planted(profiled.original, lambda counts: 2.0, calls)
    plan, _ = plan_for(profiled.groups(), profiled.analysis, PlanOptions(macs=0.6, latency_runs=0, allow_over_limit=True), model,
                       profiled.latency)
    assert calls == [] and "measured_ms" not in plan.meta
    with pytest.raises(BadInputError):
        PlanOptions(latency=0.5, latency_runs=0).check()


def test_a_faster_plan_is_not_traded_for_a_re_plan_that_removes_more_than_asked(profiled):
    """A re-plan keeping 10% less of the target is measured only when the plan itself is measured slower."""
    from graphprune.planning.targets import OVERSHOOT, never_slower

    ws, lm = profiled, profiled.latency
    plan, planned, deeper = _plan_and_fewer(profiled, 1 - 2 * OVERSHOOT)
    for first_ms, kept in ((0.8, planned), (2.0, {g.group: len(g.keep) for g in deeper.groups})):
        calls: list = []
        model = _Planted(ws.original, _first_at(planned, first_ms), calls)
        checked = never_slower(model, ws.groups(), plan, lm, lambda multiple: deeper, runs=2)
        assert {g.group: len(g.keep) for g in checked.groups} == kept
        assert checked.meta["measurements"] == len(calls) == (2 if first_ms < 1.0 else 4)  # the plan (, the re-plan), beside the original


def test_the_limit_plan_says_how_it_was_planned(profiled):
    """No target: every group at its effective filters; the status line names the limit (it printed 'planned by None')."""
    from graphprune.pipeline.passes import PlanPass

    lines: list[str] = []
    ws = dataclasses.replace(profiled, status=lines.append)
    PlanPass(PlanOptions(latency_runs=0))(ws)
    planned = [line for line in lines if line.startswith("planned")]
    assert planned and planned[0].startswith("planned at the limit: predicted ") and "None" not in planned[0]
