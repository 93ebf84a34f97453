"""The planner: targets reached, no over-pruning, over-limit policy, rounding, baselines."""
from __future__ import annotations

import numpy as np
import pytest

from graphprune import models
from graphprune.analysis.cost import cost_with_keep, model_cost
from graphprune.analysis.effective import AnalysisOptions, analyze
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.coupling.groups import build_groups
from graphprune.errors import BadInputError, OverLimitError
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx
from graphprune.planning.hierarchical import make_plan
from graphprune.planning.options import PlanOptions, Target
from graphprune.planning.selection import greedy_drop_order, pivoted_cholesky_order
from graphprune.planning.targets import latency_plan, limit_plan


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    path = tmp_path_factory.mktemp("h") / "resnet20.onnx"
    models.export_onnx(models.build("resnet20"), path, bn="keep")
    om = load_onnx(path)
    coupling = build_groups(om.graph)
    x = np.random.default_rng(0).standard_normal((256, *models.INPUT_SHAPE)).astype(np.float32)
    analysis = analyze(om.graph, coupling, Calibration((x,), None, "random"), AnalysisOptions(eps=0.05))
    return om, coupling, analysis


def _keep(plan, coupling):
    out = {g.id: g.channels for g in coupling.prunable}
    out.update({g.group: len(g.keep) for g in plan.groups})
    return out


@pytest.mark.parametrize("kind,value", [("macs", 0.5), ("params", 0.4), ("ratio", 0.3)])
def test_hierarchical_reaches_target_without_over_pruning(analysed, kind, value):
    om, coupling, analysis = analysed
    plan = make_plan(om.graph, coupling, PlanOptions().with_target(Target(kind, value)), analysis)
    keep = _keep(plan, coupling)
    for g in analysis.groups:
        assert keep[g.group] >= max(1, g.effective), g.anchor
    cost, orig = cost_with_keep(om.graph, coupling, keep), model_cost(om.graph)
    if kind == "macs":
        assert cost.macs <= value * orig.macs and cost.macs > 0.9 * value * orig.macs
    elif kind == "params":
        assert cost.params <= value * orig.params
    else:
        total = sum(g.channels for g in analysis.groups)
        assert sum(keep[g.group] for g in analysis.groups) <= (1 - value) * total + 1e-9


def test_beyond_the_limit_is_refused_unless_allowed(analysed):
    om, coupling, analysis = analysed
    limit = analysis.limit.at_limit.macs / analysis.limit.original.macs
    target = Target("macs", limit * 0.6)
    with pytest.raises(OverLimitError, match="maximum compression") as info:
        make_plan(om.graph, coupling, PlanOptions().with_target(target), analysis)
    assert info.value.exit_code == 4
    assert "of the original macs (" in str(info.value) and "x fewer)" in str(info.value)
    plan = make_plan(om.graph, coupling, PlanOptions(allow_over_limit=True).with_target(target), analysis)
    keep = _keep(plan, coupling)
    assert plan.meta["over_limit"] is True
    assert any(keep[g.group] < g.effective for g in analysis.groups)
    assert cost_with_keep(om.graph, coupling, keep).macs <= target.value * analysis.limit.original.macs


def test_the_limit_in_the_refusal_is_worded_as_a_change():
    from graphprune.planning.hierarchical import _change

    assert _change("macs", 0.5) == "2.00x fewer"
    assert _change("latency", 0.8) == "1.25x faster"
    assert _change("latency", 1.104) == "1.10x slower"  # never "0.91x"


def test_limit_plan_keeps_exactly_the_effective_filters(analysed):
    om, coupling, analysis = analysed
    keep = _keep(limit_plan(om.graph, coupling, analysis, "effective", 1), coupling)
    assert all(keep[g.group] == max(1, g.effective) for g in analysis.groups)
    assert cost_with_keep(om.graph, coupling, keep).macs == analysis.limit.at_limit.macs


def test_round_to(analysed):
    om, coupling, analysis = analysed
    for value in (0.6, 0.5):
        plan = make_plan(om.graph, coupling, PlanOptions(round_to=8, allow_over_limit=True).with_target(Target("macs", value)), analysis)
        assert all(len(g.keep) % 8 == 0 or len(g.keep) == g.channels for g in plan.groups)
        keep = _keep(plan, coupling)  # rounding up must not miss the target
        assert cost_with_keep(om.graph, coupling, keep).macs <= value * model_cost(om.graph).macs
    limit = analysis.limit.at_limit.macs / analysis.limit.original.macs
    with pytest.raises(OverLimitError, match="round-to 16"):  # rounding up to 16 cannot reach the limit itself
        make_plan(om.graph, coupling, PlanOptions(round_to=16).with_target(Target("macs", limit)), analysis)
    smallest = min(g.channels for g in coupling.prunable)
    with pytest.raises(BadInputError, match="cannot be reached with --round-to"):  # even past the limit: never a plan that misses
        make_plan(om.graph, coupling, PlanOptions(round_to=smallest, allow_over_limit=True).with_target(Target("macs", 0.05)), analysis)


@pytest.mark.parametrize("value", [0.5, 0.33])
def test_rounded_counts_give_back_what_whole_steps_overshoot(analysed, value):
    """No group can take 8 channels (or the rest of its size) back without the plan missing its MACs target."""
    om, coupling, analysis = analysed
    plan = make_plan(om.graph, coupling, PlanOptions(round_to=8, allow_over_limit=True).with_target(Target("macs", value)), analysis)
    keep, orig = _keep(plan, coupling), model_cost(om.graph).macs
    assert cost_with_keep(om.graph, coupling, keep).macs <= value * orig
    for g in coupling.prunable:
        if keep[g.id] < g.channels:
            up = {**keep, g.id: min(keep[g.id] + 8, g.channels)}
            assert cost_with_keep(om.graph, coupling, up).macs > value * orig, (g.id, keep[g.id])


def test_uniform_prunes_every_group_alike(analysed):
    om, coupling, _ = analysed
    plan = make_plan(om.graph, coupling, PlanOptions(method="uniform", criterion="l1").with_target(Target("macs", 0.5)))
    fractions = {round(len(g.keep) / g.channels, 1) for g in plan.groups}
    assert len(fractions) == 1 and len(plan.groups) == len(coupling.prunable)


def test_global_taylor_ignores_the_limit(analysed):
    om, coupling, analysis = analysed
    limit = analysis.limit.at_limit.macs / analysis.limit.original.macs
    plan = make_plan(om.graph, coupling, PlanOptions(method="global", criterion="taylor").with_target(Target("macs", limit * 0.8)), analysis)
    assert cost_with_keep(om.graph, coupling, _keep(plan, coupling)).macs <= limit * 0.8 * analysis.limit.original.macs


def test_options_are_checked(analysed):
    om, coupling, analysis = analysed
    with pytest.raises(BadInputError, match="needs an analysis"):
        make_plan(om.graph, coupling, PlanOptions().with_target(Target("macs", 0.5)), None)
    with pytest.raises(BadInputError, match="method"):
        make_plan(om.graph, coupling, PlanOptions(method="nope"), analysis)
    with pytest.raises(BadInputError, match="macs"):
        make_plan(om.graph, coupling, PlanOptions().with_target(Target("macs", 1.5)), analysis)


def test_latency_target_is_measured(analysed):
    om, coupling, analysis = analysed
    try:
        plan = latency_plan(OnnxPrunable(om), coupling, analysis, PlanOptions(latency=0.8, latency_runs=10))
    except OverLimitError as exc:  # a loaded machine can make the measured target unreachable: said clearly
        assert "latency" in str(exc)
        return
    keep = _keep(plan, coupling)
    assert cost_with_keep(om.graph, coupling, keep).macs < model_cost(om.graph).macs


def test_level_two_drops_dead_and_dependent_channels_first():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((500, 5))
    g = np.c_[g[:, :2], np.zeros(500), g[:, 2:], g[:, 0] + g[:, 1]]
    f = g.T @ g / 500
    order = greedy_drop_order(f).order
    assert order[0] == 2
    chol = pivoted_cholesky_order(f)
    assert sorted(chol.tolist()) == list(range(7)) and chol[0] == 2
