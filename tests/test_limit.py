"""The calibrated limit: a planted knee, the search on its own, CLI options and the exit-4 message."""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from graphprune.analysis.cost import cost_with_keep, model_cost
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.cli import main
from graphprune.coupling.groups import build_groups
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx
from graphprune.pipeline.config import parse_pipeline
from graphprune.pipeline.run import run_model
from graphprune.planning.limit import (
    CalibratedLimit,
    CalibrationPoint,
    finetuned_limit,
    measured_curve,
    paired_margin,
    search,
)

REAL, COPIES, DEAD = 4, 4, 4
"""The planted conv: 4 real filters, a copy of each (the pair shares the real filter's head weights) and 4 dead ones."""


class Planted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, REAL + COPIES + DEAD, 3, padding=1)
        self.fc = nn.Linear(REAL + COPIES + DEAD, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _planted() -> Planted:
    torch.manual_seed(0)
    m = Planted().eval()
    real = torch.linalg.qr(torch.randn(9, REAL))[0].T.reshape(REAL, 1, 3, 3) * 3.0  # orthogonal, equal norms
    head = 4.0 * torch.eye(4)[:, :REAL]  # feature j votes for class j
    with torch.no_grad():
        m.conv.weight.zero_()
        m.conv.bias.zero_()
        m.conv.weight[:REAL] = real
        m.conv.weight[REAL:REAL + COPIES] = real
        m.fc.weight.zero_()
        m.fc.weight[:, :REAL] = head / 2
        m.fc.weight[:, REAL:REAL + COPIES] = head / 2
        m.fc.bias.zero_()
    return m


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("limit") / "planted.onnx"
    torch.onnx.export(_planted(), (torch.zeros(2, 1, 8, 8),), str(path), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}})
    x = np.random.default_rng(0).standard_normal((2048, 1, 8, 8)).astype(np.float32)
    return path, x


def _knee_reduction(path) -> float:
    om = load_onnx(path)
    coupling = build_groups(om.graph)
    (group,) = coupling.prunable
    return model_cost(om.graph).macs / cost_with_keep(om.graph, coupling, {group.id: REAL}).macs


def test_calibrated_limit_lands_at_the_planted_knee(planted):
    path, x = planted
    model = OnnxPrunable(load_onnx(path))
    pipeline = parse_pipeline({"pass": [{"name": "analyze", "samples": 512, "loss": "fisher"},
                                        {"name": "limit", "samples": 512, "holdout": 1024, "points": 8}]})
    ws = run_model(pipeline, model, Calibration((x,), None, "planted"))
    limit = ws.limit
    assert limit is not None and limit.metric == "agreement" and limit.base_quality == 1.0
    (count,) = limit.effective.values()
    assert count == REAL  # dead and copied filters go for free (compensation folds the copies); the next one costs
    assert limit.macs_reduction == pytest.approx(_knee_reduction(path))
    assert limit.quality >= 1.0 - limit.tolerance
    failing = [p for p in limit.points if p.quality < limit.threshold]
    assert failing and min(p.macs_reduction for p in failing) > limit.macs_reduction
    assert len(limit.points) <= 8
    assert CalibratedLimit.from_dict(json.loads(json.dumps(limit.to_dict()))) == limit


def _fake(threshold_reduction: float):
    """A curve with a knee at ``threshold_reduction``: budget b removes up to reduction 1 + b."""
    calls: list[float] = []

    def counts(b: float) -> dict[int, int]:
        return {0: round(1000 * (1 + b))}

    def evaluate(b: float) -> CalibrationPoint:
        calls.append(b)
        red = 1 + b
        return CalibrationPoint(b, red, red, b, 0.9 if red <= threshold_reduction else 0.5)

    return counts, evaluate, calls


def test_points_sharing_the_originals_activations_measure_what_unshared_points_do(planted, monkeypatch):
    """Sharing the original's reads across points (the default when they fit a quarter of the bound) changes only
    the cost: when they do not fit, every point runs the original again, measures the same, and says why."""
    import graphprune.recovery.reconstruct as reconstruct

    path, x = planted
    model = OnnxPrunable(load_onnx(path))
    pipeline = parse_pipeline({"pass": [{"name": "analyze", "samples": 512, "loss": "fisher"},
                                        {"name": "limit", "samples": 512, "holdout": 1024, "points": 8}]})
    points = []
    for huge in (False, True):
        if huge:
            monkeypatch.setattr(reconstruct, "original_activation_bytes", lambda graph, samples: 1 << 62)
        lines = io.StringIO()
        limit = run_model(pipeline, model, Calibration((x,), None, "planted"), console=Console(file=lines, width=400)).limit
        assert limit is not None
        points.append([(p.budget, p.macs_reduction, p.quality) for p in limit.points])
        assert ("exceed a quarter of the" in lines.getvalue()) == huge
    assert points[0] == points[1]


@pytest.mark.parametrize("knee", [1.3, 2.5, 9.0])
def test_search_brackets_and_narrows_from_either_side(knee):
    counts, evaluate, calls = _fake(knee)
    base = CalibrationPoint(0.0, 1.0, 1.0, 0.0, 0.9)
    lo, hi, measured = search(evaluate, counts, 1.0, 100.0, 0.89, base, points=12)
    assert hi is not None and lo.macs_reduction <= knee < hi.macs_reduction
    assert hi.macs_reduction / lo.macs_reduction <= 1.05 and len(measured) == len(calls) <= 12


def test_search_stops_at_the_point_budget():
    counts, evaluate, calls = _fake(2.5)
    base = CalibrationPoint(0.0, 1.0, 1.0, 0.0, 0.9)
    _, _, measured = search(evaluate, counts, 1.0, 100.0, 0.89, base, points=3)
    assert len(measured) == len(calls) == 3


def test_a_power_law_drop_is_narrowed_in_log_drop_and_log_budget():
    """The measured drops grow as a power of the budget: between two such points the next budget lands on the
    crossing (here exactly), where a line in the drop would land low; knowing each budget's MACs reduction, the
    next point closes the bracket within the resolution."""
    import graphprune.planning.limit as limit

    def evaluate(b: float) -> CalibrationPoint:
        return CalibrationPoint(b, 1 + b, 1 + b, b, 0.9 - 0.004 * b**2)  # drop 0.004 b^2: 0.01 at b = 1.58

    assert limit._between(evaluate(1.0), evaluate(4.0), 0.89, 0.9) == pytest.approx(2.5**0.5, rel=1e-9)
    t_line = (0.01 - 0.004) / (0.064 - 0.004)  # a line in the drop: 0.1 of the log bracket, clamped to 0.25
    assert 4.0 ** max(t_line, limit.INTERPOLATION_CLAMP) < 0.95 * 2.5**0.5
    base = CalibrationPoint(0.0, 1.0, 1.0, 0.0, 0.9)
    counts = lambda b: {0: round(10000 * (1 + b))}  # noqa: E731
    _, _, plain = search(evaluate, counts, 1.0, 100.0, 0.89, base, points=12)
    lo_b, hi_b, closing = search(evaluate, counts, 1.0, 100.0, 0.89, base, points=12, reduction=lambda b: 1 + b)
    assert hi_b is not None and lo_b.budget <= 1.5812 < hi_b.budget and hi_b.macs_reduction / lo_b.macs_reduction <= 1.05
    assert len(closing) == 4 < len(plain)  # from START: 4 fails, 1 passes, 1.58, and 1.70 closes the bracket


def test_a_point_scores_more_held_out_samples_only_while_its_drop_is_undecided():
    from graphprune.pipeline.limit import decided

    rng = np.random.default_rng(0)
    base = rng.random(4096) < 0.9
    enough = decided(base, 0.01, 0.5)

    def flipped(rate: float, n: int) -> np.ndarray:
        out = base[:n].copy()
        out[rng.choice(n, int(rate * n), replace=False) if rate else []] = False
        return out

    assert enough(base[:1024])  # no drop at all: clearly within 1 pp
    assert enough(flipped(0.2, 1024))  # 20 pp: clearly beyond
    assert not enough(flipped(0.012, 1024))  # about 1 pp: undecided after 1,024
    assert enough(flipped(0.012, 4096))  # every sample scored


def _flips_on_the_unsure(rate: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4,096 held-out samples: the original's margins, its correctness (0.9), and a pruned model's whose flips fall on
    the samples the original is least sure of (``rate`` of them flip, all within the lowest fifth by margin)."""
    rng = np.random.default_rng(seed)
    margin = rng.random(4096)
    base = rng.random(4096) < 0.9
    pruned = base.copy()
    unsure = np.flatnonzero(margin < 0.2)
    pruned[rng.choice(unsure, int(rate * 4096), replace=False)] ^= True
    return margin, base, pruned


def test_stratified_scoring_puts_the_unsure_samples_first_and_weights_them_by_their_share():
    from graphprune.planning.limit import FRAGILE_RATE, FRAGILE_SHARE, paired_drop, stratified_order

    margin, base, pruned = _flips_on_the_unsure(0.015)
    order, strata = stratified_order(margin, seed=0)
    assert sorted(order) == list(range(4096)) and strata.sizes == (1024, 3072)
    fragile = order[strata.of == 0]
    assert margin[fragile].max() <= np.quantile(margin, FRAGILE_SHARE) + 1e-9  # the least sure quarter
    assert (strata.of[:1024] == 0).sum() == round(FRAGILE_RATE * 1024)  # three quarters of the first chunk
    b, c = base[order], pruned[order]
    full, full_se = paired_drop(b, c, strata)
    assert full == pytest.approx(float(base.mean() - pruned.mean()), abs=1e-12)  # all scored: the plain drop
    assert full_se <= paired_drop(b, c)[1] + 1e-12  # within-stratum variance only
    half, half_se = paired_drop(b[:2048], c[:2048], strata)
    assert abs(half - full) < 2 * half_se  # half the samples: the same drop within its error
    assert paired_drop(b[:2048], c[:2048])[0] > 1.5 * full  # where the plain mean of that prefix is biased


def test_the_margin_is_the_top_two_probabilities_apart_averaged_over_tokens():
    from graphprune.pipeline.limit import _margin

    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    np.testing.assert_allclose(_margin(logits), [0.5, 0.05], atol=1e-12)
    tokens = np.stack([logits, logits[::-1]], axis=0)  # (2 samples, 2 tokens, 3 classes)
    np.testing.assert_allclose(_margin(tokens), [0.275, 0.275], atol=1e-12)


def test_a_stratified_point_stops_once_scoring_the_rest_would_not_sharpen_it():
    """Flips only among the unsure samples: after half of them and a third of the others, scoring the robust rest
    would narrow the standard error by under 10%, so the point stops there; unstratified, a drop this close to the
    line needs every sample."""
    from graphprune.pipeline.limit import decided
    from graphprune.planning.limit import stratified_order

    margin, base, pruned = _flips_on_the_unsure(0.008)
    order, strata = stratified_order(margin, seed=0)
    b, c = base[order], pruned[order]
    stratified, plain = decided(b, 0.01, 0.8, strata), decided(base, 0.01, 0.8)  # plain: in the held-out order
    assert not stratified(c[:1024]) and stratified(c[:2048])
    assert not plain(pruned[:2048]) and not plain(pruned[:3072]) and plain(pruned)


def test_the_limit_says_how_many_samples_its_points_scored():
    def limit(*samples: int) -> CalibratedLimit:
        points = tuple(CalibrationPoint(0.01 * (i + 1), 1.5, 1.5, 0.0, 0.9, samples=n) for i, n in enumerate(samples))
        return CalibratedLimit("accuracy", 0.01, 0.9, 4096, 0.01, 1.2, 0.01, 1.5, 1.5, 0.9, {0: 1}, points)

    assert limit(2048, 1024).scored == 2048 and "each point scored 2048 of them at most" in limit(2048, 1024).lines()[2]
    assert limit(4096, 1024).scored == 0 and "each point" not in limit(4096, 1024).lines()[2]  # one scored them all


def test_the_bracket_steps_to_where_the_drop_is_expected_to_fail_clearly():
    """A drop growing as budget^1.5 (the prior exponent): from a passing point the bracket's next budget is where the
    drop reaches twice the allowed one, or 1.5 times what the fine-tuned estimate needs, so one point serves both."""
    import graphprune.planning.limit as limit

    def evaluate(b: float) -> CalibrationPoint:
        return CalibrationPoint(b, 1 + b, 1 + b, b, 0.9 - 0.004 * b**1.5)

    first = evaluate(1.0)  # drop 0.004 of the allowed 0.01
    assert limit._bracket_step(first, 0.01, 0.0, 0.9) == pytest.approx(5.0 ** (1 / 1.5))  # to a drop of 0.02
    assert limit._bracket_step(first, 0.01, 0.0365, 0.9) == pytest.approx((1.5 * 0.0365 / 0.004) ** (1 / 1.5))
    assert limit._bracket_step(evaluate(0.1), 0.01, 0.0, 0.9) == limit.STEP  # a drop too small to extrapolate from
    assert limit._bracket_step(first, 0.01, 10.0, 0.9) == limit.STEP**2  # at most STEP^2
    base = CalibrationPoint(0.0, 1.0, 1.0, 0.0, 0.9)
    counts = lambda b: {0: round(10000 * (1 + b))}  # noqa: E731
    _, hi, measured = search(evaluate, counts, 0.25, 100.0, 0.89, base, points=12, reduction=lambda b: 1 + b,
                             reach=0.0365)
    assert measured[0].budget == pytest.approx(0.25 * limit.START)  # the first point: START above the spectral budget
    assert hi is not None and 0.9 - measured[1].quality >= 0.0365  # the bracket's failing end shows the drop needed


def test_the_default_confidence_depends_on_where_the_held_out_samples_come_from():
    from graphprune.planning.limit import default_confidence

    assert default_confidence(0.0, unseen=True) == 0.8 and default_confidence(0.0, unseen=False) == 0.5
    assert default_confidence(0.6, unseen=True) == 0.6 == default_confidence(0.6, unseen=False)  # given: kept


def test_paired_margin_is_z_standard_errors_of_the_paired_drop():
    """Samples both models score alike add no variance; the margin is z * sd(d) / sqrt(n), d the per-sample drop."""
    rng = np.random.default_rng(0)
    base = rng.random(4000) < 0.9
    flipped = base.copy()
    flipped[rng.choice(4000, 60, replace=False)] ^= True  # 1.5% of the samples change
    d = base.astype(float) - flipped.astype(float)
    assert paired_margin(base, flipped, 0.8) == pytest.approx(0.8416 * d.std(ddof=1) / np.sqrt(4000), rel=1e-3)
    assert paired_margin(base, base, 0.95) == 0.0 and paired_margin(base, flipped, 0.5) == 0.0
    assert 0 < paired_margin(base, flipped, 0.8) < paired_margin(base, flipped, 0.95)
    unpaired = np.sqrt(2 * 0.09 / 4000)  # what two independent accuracies near 0.9 would give
    assert paired_margin(base, flipped, 0.8) < 0.8416 * unpaired / 2


def test_a_point_passes_only_when_its_drop_holds_at_the_confidence():
    """Two curves with the same measured qualities: where the margins put a point's bound under the threshold, the
    search treats it as failing and the limit moves back."""
    def run(margin: float) -> CalibrationPoint:
        def evaluate(b: float) -> CalibrationPoint:
            red = 1 + b
            return CalibrationPoint(b, red, red, b, 0.9 - 0.004 * b, margin=margin)
        lo, _hi, _ = search(evaluate, lambda b: {0: round(1000 * (1 + b))}, 1.0, 100.0, 0.89, base, points=12)
        return lo

    base = CalibrationPoint(0.0, 1.0, 1.0, 0.0, 0.9)
    plain, held = run(0.0), run(0.004)
    assert plain.quality >= 0.89 and held.bound >= 0.89
    assert plain.macs_reduction == pytest.approx(3.5, rel=0.05) and held.macs_reduction == pytest.approx(2.5, rel=0.05)


def test_finetuned_estimate_reads_the_same_curve():
    pts = [CalibrationPoint(0.1, 2.0, 2.0, 0, 0.89), CalibrationPoint(0.4, 4.0, 4.0, 0, 0.70)]
    curve = measured_curve(0.90, pts)
    one = finetuned_limit(curve, 0.90, 0.01, 1.0)  # one epoch leaves 0.274 of the drop: drops up to 0.0365 hold
    quarter = finetuned_limit(curve, 0.90, 0.01, 0.25)  # a quarter epoch leaves 0.82: up to 0.0122
    assert not one.bounded and not quarter.bounded
    assert 2.0 < quarter.macs_reduction < one.macs_reduction < 4.0
    assert quarter.remaining == pytest.approx(0.82, abs=0.005)
    assert one.macs_reduction == pytest.approx(2.0 * 2.0 ** ((0.01 / 0.274 - 0.01) / 0.19), rel=1e-6)
    assert finetuned_limit(measured_curve(0.9, pts[:1]), 0.90, 0.01, 1.0).bounded  # never dropped far enough


@pytest.mark.parametrize("value", ["1", "0", "-0.1", "x"])
def test_tolerance_must_be_a_fraction(planted, capsys, value):
    path, _ = planted
    with pytest.raises(SystemExit) as info:
        main(["analyze", str(path), "--data", "fashion-mnist", "--tolerance", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--tolerance" in err and err.count("\n") == 1


def test_target_beyond_the_limit_exits_4_with_the_expected_accuracy(planted, tmp_path, capsys):
    path, x = planted
    data = tmp_path / "cal.npz"
    np.savez(data, input=x)
    out = tmp_path / "small.onnx"
    code = main(["prune", str(path), "-o", str(out), "--data", str(data), "--samples", "512", "--macs", "0.2",
                 "--no-profile", "--latency-runs", "0", "--limit-points", "8"])
    err = capsys.readouterr().err
    assert code == 4 and not out.exists()
    assert "agreement expected at " in err and "fewer MACs" in err and "the calibrated limit: 3.00x fewer MACs" in err
    assert err.count("\n") == 1


def test_analyze_reports_both_numbers(planted, tmp_path, capsys):
    path, x = planted
    data = tmp_path / "cal.npz"
    np.savez(data, input=x)
    report = tmp_path / "a.json"
    assert main(["analyze", str(path), "--data", str(data), "--samples", "512", "--limit-points", "8", "-o", str(report),
                 "--html", str(tmp_path / "a.html")]) == 0
    text = capsys.readouterr().out
    assert "spectral estimate" in text and "calibrated limit" in text and "calibrated" in text
    saved = json.loads(report.read_text())["limit"]
    assert list(saved["effective"].values()) == [REAL] and saved["spectral_macs_reduction"] > 0
    assert "Calibrated limit" in (tmp_path / "a.html").read_text()


def test_prune_plans_down_to_the_calibrated_floors_and_reports_the_curve(planted, tmp_path):
    path, x = planted
    data = tmp_path / "cal.npz"
    np.savez(data, input=x)
    out = tmp_path / "small.onnx"
    assert main(["prune", str(path), "-o", str(out), "--data", str(data), "--samples", "512", "--macs", "0.34",
                 "--no-profile", "--latency-runs", "0", "--limit-points", "8"]) == 0
    report = json.loads((tmp_path / "small.report.json").read_text())
    limit = report["figures"]["limit"]
    assert list(limit["effective"].values()) == [REAL]
    kept = model_cost(load_onnx(out).graph).macs / model_cost(load_onnx(path).graph).macs
    assert kept <= 0.34 and kept == pytest.approx(1 / _knee_reduction(path))  # the planted knee is the floor it stops at
    page = (tmp_path / "small.report.html").read_text()
    assert "Calibrated limit" in page and page.count("data:image/png;base64,") >= 2


class TwoLayers(nn.Module):
    """Two prunable groups of different cost per channel, so the two excess rules plan differently."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def _two_layers_analysed(tmp_path):
    """:class:`TwoLayers` exported to ONNX and analysed on 256 of 1,536 random images (the rest are held out)."""
    from graphprune.pipeline.passes import AnalyzePass, AnalyzePassOptions, Workspace

    torch.manual_seed(0)
    path = tmp_path / "two.onnx"
    torch.onnx.export(TwoLayers().eval(), (torch.zeros(2, 1, 8, 8),), str(path), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}})
    x = np.random.default_rng(0).standard_normal((1536, 1, 8, 8)).astype(np.float32)
    model = OnnxPrunable(load_onnx(path))
    ws = Workspace(original=model, model=model, data=Calibration((x,), None, "random"))
    return AnalyzePass(AnalyzePassOptions(samples=256, loss="fisher"))(ws).workspace


def _scores_of_plan_correct(monkeypatch) -> list[float]:
    """The mean score of every later ``plan_correct`` call, in call order."""
    import graphprune.pipeline.limit as limit_mod

    scored: list[float] = []
    real = limit_mod.plan_correct

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        scored.append(float(out.mean()))
        return out

    monkeypatch.setattr(limit_mod, "plan_correct", spy)
    return scored


def test_past_the_floors_the_plan_pass_keeps_the_excess_rule_that_scores_better(tmp_path, monkeypatch):
    """Over the limit, the plan pass plans the excess by predicted loss and per unit saved, scores both on held-out
    samples (compensated, rewritten, repaired) and keeps the better; with ``excess = "loss"`` it plans one way only."""
    from graphprune.pipeline.passes import PlanPass
    from graphprune.planning.options import PlanOptions

    ws = _two_layers_analysed(tmp_path)
    scored = _scores_of_plan_correct(monkeypatch)
    options = PlanOptions(macs=0.1, allow_over_limit=True)
    plans = {rule: PlanPass(dataclasses.replace(options, excess=rule))(dataclasses.replace(ws)).workspace.plan
             for rule in ("loss", "per_unit")}
    assert not scored  # a fixed rule measures nothing
    keeps = {rule: {g.group: len(g.keep) for g in p.groups} for rule, p in plans.items()}  # type: ignore[union-attr]
    assert keeps["loss"] != keeps["per_unit"]
    chosen = PlanPass(options)(dataclasses.replace(ws)).workspace.plan
    assert chosen is not None and len(scored) == 2
    meta = chosen.meta
    assert set(meta["excess_scores"]) == {"loss", "per_unit"} and meta["excess_samples"] == 1536 - 1024
    assert meta["excess_scores"] == pytest.approx(dict(zip(("loss", "per_unit"), scored)))
    best = max(("loss", "per_unit"), key=lambda r: (meta["excess_scores"][r], r == "loss"))
    assert meta["excess"] == best and {g.group: len(g.keep) for g in chosen.groups} == keeps[best]


def _two_layers_with_limit(tmp_path):
    from graphprune.pipeline.limit import LimitPass, LimitPassOptions

    return LimitPass(LimitPassOptions(tolerance=0.05, points=4))(_two_layers_analysed(tmp_path)).workspace


def test_the_budget_family_reaches_a_target_at_its_smallest_budget(tmp_path):
    from graphprune.pipeline.limit import BudgetFamily

    ws = _two_layers_with_limit(tmp_path)
    family = BudgetFamily.of(ws)
    assert family is not None and ws.limit is not None
    graph, coupling = ws.original.graph, ws.groups()
    whole = cost_with_keep(graph, coupling, dict(family.full)).macs

    def kept(budget: float) -> float:
        return cost_with_keep(graph, coupling, family.counts(budget)).macs / whole

    for target in (0.9, 0.7, 0.5):
        plan = family.reaching(ws, "macs", target, ws.limit.budget)
        assert plan is not None
        budget = float(plan.meta["budget"])
        assert budget <= ws.limit.budget and kept(budget) <= target < kept(budget * 0.999)
        assert {g.group: len(g.keep) for g in plan.groups} == {g: k for g, k in family.counts(budget).items() if k < family.full[g]}
    assert family.reaching(ws, "macs", 0.5, 1e-9) is None  # that budget keeps more than half


def test_within_the_limit_the_plan_pass_keeps_the_allocation_that_scores_better(tmp_path, monkeypatch):
    """A MACs target within the calibrated limit: the hierarchical plan and the budget family's plan at the same
    target are both scored on held-out samples (compensated, rewritten, repaired) and the better is kept; with a
    fixed excess rule, or when the family's plan is the same, nothing is measured."""
    import graphprune.pipeline.limit as limit_mod
    from graphprune.pipeline.passes import PlanPass
    from graphprune.planning.options import PlanOptions

    ws = _two_layers_with_limit(tmp_path)
    family = limit_mod.BudgetFamily.of(ws)
    assert family is not None and ws.limit is not None and ws.limit.macs_reduction > 2
    scored = _scores_of_plan_correct(monkeypatch)
    options = PlanOptions(macs=0.7)
    hierarchical = PlanPass(options)(dataclasses.replace(ws)).workspace.plan
    assert hierarchical is not None and not scored  # the family plans the same here: nothing to measure
    other = limit_mod._plan(ws, family.orders, {0: 14, 1: 5}, 0.0, "macs 0.7 (budget family)")  # a different allocation
    monkeypatch.setattr(limit_mod.BudgetFamily, "reaching", lambda self, w, kind, kept, within: other)
    chosen = PlanPass(options)(dataclasses.replace(ws)).workspace.plan
    assert chosen is not None and len(scored) == 2
    meta = chosen.meta
    assert meta["allocation_scores"] == pytest.approx(dict(zip(("hierarchical", "budget"), scored)))
    best = max(("hierarchical", "budget"), key=lambda r: (meta["allocation_scores"][r], r == "hierarchical"))
    want = hierarchical if best == "hierarchical" else other
    assert meta["allocation"] == best and [g.keep for g in chosen.groups] == [g.keep for g in want.groups]
    scored.clear()
    PlanPass(dataclasses.replace(options, excess="loss"))(dataclasses.replace(ws))
    assert not scored  # a fixed rule measures nothing


def test_a_language_model_is_calibrated_on_per_token_agreement(tmp_path):
    """(batch, tokens, vocabulary) logits with no labels: quality is the top-1 agreement with the original, token by
    token (the limit pass and the excess scoring share it)."""
    from graphprune import models
    from graphprune.pipeline.limit import predictions

    torch.manual_seed(0)
    path = tmp_path / "lm.onnx"
    models.export_tokens(models.build("gpt2"), path)
    model = OnnxPrunable(load_onnx(path))
    ids = np.random.default_rng(0).integers(0, 64, (768, 8)).astype(np.int64)
    data = Calibration((ids,), None, "tokens")
    assert predictions(model, Calibration((ids[:5],), None, "tokens"), 4).shape == (5, 8)
    pipeline = parse_pipeline({"pass": [{"name": "analyze", "samples": 256, "loss": "projection"},
                                        {"name": "limit", "samples": 256, "holdout": 512, "points": 3}]})
    limit = run_model(pipeline, model, data).limit
    assert limit is not None and limit.metric == "agreement" and limit.base_quality == 1.0 and limit.holdout == 512
    assert limit.points and all(0.0 <= p.quality <= 1.0 and p.margin >= 0.0 for p in limit.points)


def test_the_limit_scores_on_held_out_data_when_given(planted):
    """With held-out data (never trained on) the points are scored on up to ``holdout`` of it and every calibration
    sample stays with the analysis and compensation; a labelled held-out set makes the metric accuracy."""
    path, x = planted
    model = OnnxPrunable(load_onnx(path))
    pipeline = parse_pipeline({"pass": [{"name": "analyze", "samples": 512, "loss": "fisher"},
                                        {"name": "limit", "samples": 512, "holdout": 600, "points": 3}]})
    rng = np.random.default_rng(1)
    held_x = rng.standard_normal((800, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        labels = _planted()(torch.from_numpy(held_x)).argmax(1).numpy()
    labels[:40] = (labels[:40] + 1) % 4  # 5% the original gets wrong: accuracy, not agreement
    lines = io.StringIO()
    ws = run_model(pipeline, model, Calibration((x[:512],), None, "planted"), console=Console(file=lines, width=400),
                   held_out=Calibration((held_x,), labels, "held"))
    limit = ws.limit
    assert limit is not None and limit.metric == "accuracy" and limit.holdout == 600
    assert limit.confidence == 0.8  # the default on data the model never saw
    assert 0.9 < limit.base_quality < 0.97 and "600 held-out samples of held (held out)" in lines.getvalue()
    assert all(0 < p.samples <= 600 for p in limit.points)
    # the calibration data alone (512 samples, all of them read by the analysis) leaves nothing to score on
    alone = run_model(pipeline, model, Calibration((x[:512],), None, "planted"), console=Console(file=io.StringIO()))
    assert alone.limit is None


def test_prune_takes_held_out_data_from_the_command_line(planted, tmp_path, capsys):
    path, x = planted
    np.savez(tmp_path / "cal.npz", input=x[:512])
    np.savez(tmp_path / "held.npz", input=x[512:1536])
    out = tmp_path / "small.onnx"
    code = main(["prune", str(path), "-o", str(out), "--data", str(tmp_path / "cal.npz"), "--held-out",
                 str(tmp_path / "held.npz"), "--samples", "512", "--limit-points", "3", "--latency-runs", "0",
                 "--no-profile"])
    assert code == 0 and out.exists()
    assert "1024 held-out samples of" in capsys.readouterr().out
    assert json.loads((tmp_path / "small.report.json").read_text())["figures"]["limit"]["holdout"] == 1024
    code = main(["analyze", str(path), "--data", str(tmp_path / "cal.npz"), "--held-out", str(tmp_path / "held.npz"),
                 "--samples", "512", "--limit-points", "3", "-o", str(tmp_path / "a.json")])
    assert code == 0 and "1024 held-out samples of" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["limit"]["confidence"] == 0.8
    code = main(["prune", str(path), "-o", str(tmp_path / "other.onnx"), "--data", str(tmp_path / "cal.npz"),
                 "--held-out", str(tmp_path / "missing.npz")])
    err = capsys.readouterr().err
    assert code == 2 and f"--held-out {tmp_path / 'missing.npz'}: not 'fashion-mnist'" in err and "Traceback" not in err
    assert not (tmp_path / "other.onnx").exists()


def test_fashion_mnist_fit_and_val_part_the_training_images(tmp_path, monkeypatch):
    import gzip

    import graphprune.frontends.data as data

    n = 50
    images = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28) % 251
    labels = np.arange(n) % 10
    for name, arr, dims in (("train-images-idx3-ubyte.gz", images, (n, 28, 28)), ("train-labels-idx1-ubyte.gz", labels, (n,))):
        head = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
        with gzip.open(tmp_path / name, "wb") as fh:
            fh.write(head + arr.astype(np.uint8).tobytes())
    monkeypatch.setattr(data, "FASHION_MNIST_VALIDATION", 12)
    x, _ = data.load_fashion_mnist("train", tmp_path)
    (fx, fy), (vx, vy) = (data.load_fashion_mnist(s, tmp_path) for s in ("fit", "val"))
    assert len(vy) == 12 and len(fy) == n - 12
    rows = {r.tobytes(): i for i, r in enumerate(x)}
    fit_rows, val_rows = ({rows[r.tobytes()] for r in part} for part in (fx, vx))
    assert not fit_rows & val_rows and fit_rows | val_rows == set(range(n))
    assert sorted(fit_rows) == [rows[r.tobytes()] for r in fx]  # file order kept
    assert (data.load_fashion_mnist("val", tmp_path)[0] == vx).all()  # the same split every time


def test_predictions_run_on_onnxruntime_and_fall_back_to_the_interpreter(planted, tmp_path, caplog):
    """An ONNX model is scored on one onnxruntime session; one whose session cannot run the batches (a fixed batch
    of 2 here) is scored by the torch interpreter; both give the module's own top-1 classes."""
    from graphprune.pipeline.limit import predictions

    path, x = planted
    fixed = tmp_path / "fixed.onnx"
    torch.onnx.export(_planted(), (torch.zeros(2, 1, 8, 8),), str(fixed), input_names=["input"], dynamo=False)
    data = Calibration((x[:300],), None, "planted")
    with torch.no_grad():
        want = _planted()(torch.from_numpy(x[:300])).argmax(1).numpy()
    for p, falls_back in ((path, False), (fixed, True)):
        caplog.clear()
        with caplog.at_level("INFO", logger="graphprune.pipeline.limit"):
            np.testing.assert_array_equal(predictions(OnnxPrunable(load_onnx(p)), data, 64), want)
        assert ("the torch interpreter does" in caplog.text) == falls_back
