"""Latency lookup tables (graphprune.analysis.latency, measured by graphprune.execution.latency_tables): coverage, prediction, JSON, cache, fusion, fast counts.

Nothing here depends on how fast this machine is: the assertions are about
structure, exact equalities of cached or reloaded values, and counters.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune import models
from graphprune.analysis.latency import AxisSpec, BuildStats, LatencyModel, OpTable
from graphprune.coupling.groups import Coupling, build_groups
from graphprune.errors import BadInputError
from graphprune.execution.latency_tables import (
    QUANTIZED_SETTING,
    LatencyOptions,
    blocked_point,
    build_latency_model,
    cache_setting,
    calibration_point,
    candidate_counts,
    cut_subgraph,
    measure_plan_error,
)
from graphprune.frontends.onnx import OnnxModel, load_onnx
from graphprune.ir.model import Int8Form


def fast_options(tmp_path: Path, **kw: object) -> LatencyOptions:
    # cache_check 0: these tests count cache hits exactly; one-run spot checks would re-measure noisy tables
    # (the check itself: tests/test_latency_planning.py::test_a_stale_cache_is_spot_checked_and_measured_again)
    base: dict[str, object] = {"batch": 1, "threads": 1, "runs": 1, "warmup": 0, "model_runs": 1, "max_counts": 4,
                               "cache_dir": str(tmp_path / "cache"), "cache_check": 0.0}
    base.update(kw)
    return LatencyOptions(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def vgg(tmp_path_factory: pytest.TempPathFactory) -> tuple[OnnxModel, Coupling]:
    path = tmp_path_factory.mktemp("lat") / "vgg.onnx"
    models.export_onnx(models.build("vgg"), path)
    om = load_onnx(path)
    return om, build_groups(om.graph)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[OnnxModel, Coupling]:
    path = tmp_path_factory.mktemp("lat") / "resnet20.onnx"
    models.export_onnx(models.build("resnet20"), path)
    om = load_onnx(path)
    return om, build_groups(om.graph)


def depthwise_model(path: Path) -> OnnxModel:
    """Conv(1->8) Relu, depthwise Conv(8, group 8) Relu, Conv(8->4): one group of 8 through the depthwise conv."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3"),
    ]
    graph = helper.make_graph(
        nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return load_onnx(path)


def keep_fraction(coupling: Coupling, frac: float) -> dict[int, int]:
    return {g.id: max(1, round(g.channels * frac)) for g in coupling.prunable}


def test_tables_cover_every_touched_kernel(vgg: tuple[OnnxModel, Coupling], tmp_path: Path) -> None:
    om, coupling = vgg
    lm = build_latency_model(om, coupling, fast_options(tmp_path))
    anchors = {t.node for t in lm.tables}
    kernels = {n.name for n in om.graph.nodes if n.op_type in ("Conv", "Gemm")}
    assert kernels <= anchors
    varied = {g for t in lm.tables for a in t.axes for g, _, _ in a.groups}
    assert varied == {g.id for g in coupling.prunable}
    for t in lm.tables:
        assert t.full in dict(t.points)
        assert 1 <= len(t.axes) <= 2
    assert lm.stats.tables == len(lm.tables)
    assert lm.stats.measurements > 0
    assert lm.coverage > 0


def test_predict_full_keep_is_original_and_smaller_keeps_are_finite(vgg: tuple[OnnxModel, Coupling], tmp_path: Path) -> None:
    om, coupling = vgg
    lm = build_latency_model(om, coupling, fast_options(tmp_path))
    full = {g.id: g.channels for g in coupling.prunable}
    assert lm.predict(full) == lm.original_ms
    assert lm.predict({}) == lm.original_ms
    for frac in (0.3, 0.5, 0.7):
        value = lm.predict(keep_fraction(coupling, frac))
        assert math.isfinite(value)
        assert value > 0
    gid = coupling.prunable[0].id
    assert lm.saved_ms(gid, coupling.prunable[0].channels) == 0.0


def test_json_round_trip_gives_identical_predictions(vgg: tuple[OnnxModel, Coupling], tmp_path: Path) -> None:
    om, coupling = vgg
    lm = build_latency_model(om, coupling, fast_options(tmp_path))
    lm.save(tmp_path / "latency.json")
    loaded = LatencyModel.load(tmp_path / "latency.json")
    assert loaded == lm
    for frac in (0.25, 0.5, 0.8):
        keep = keep_fraction(coupling, frac)
        assert loaded.predict(keep) == lm.predict(keep)
    for g in coupling.prunable:
        assert loaded.fast_counts(g.id) == lm.fast_counts(g.id)


def test_second_build_measures_no_table_point_and_times_the_whole_model_again(vgg: tuple[OnnxModel, Coupling], tmp_path: Path) -> None:
    om, coupling = vgg
    first = build_latency_model(om, coupling, fast_options(tmp_path))
    second = build_latency_model(om, coupling, fast_options(tmp_path))
    assert first.stats.measurements > 0
    assert second.stats.measurements == 0
    assert second.stats.cache_hits == first.stats.cache_hits + first.stats.measurements
    assert second.stats.tables_cached == second.stats.tables == len(first.tables)
    assert second.tables == first.tables
    assert first.stats.model_timings >= 1 and second.stats.model_timings >= 1 and second.original_ms > 0


def test_changed_batch_misses_the_cache(vgg: tuple[OnnxModel, Coupling], tmp_path: Path) -> None:
    om, coupling = vgg
    build_latency_model(om, coupling, fast_options(tmp_path))
    other = build_latency_model(om, coupling, fast_options(tmp_path, batch=2))
    assert other.stats.measurements > 0
    assert other.stats.cache_hits == 0
    assert other.setting["batch"] == 2


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    assert LatencyOptions().cache_root() == tmp_path / "latency"
    assert LatencyOptions(cache_dir=str(tmp_path / "x")).cache_root() == tmp_path / "x"


def test_cut_subgraphs_keep_the_fused_ops(vgg: tuple[OnnxModel, Coupling], resnet: tuple[OnnxModel, Coupling], tmp_path: Path) -> None:
    om, _ = vgg
    conv = next(n for n in om.graph.nodes if n.op_type == "Conv")
    relu = om.graph.consumers()[conv.outputs[0]][0]
    sub = cut_subgraph(om, [conv, relu], batch=3)
    assert [n.op_type for n in sub.om.model.graph] == ["Conv", "Relu"]
    assert [v.shape[0] for v in sub.om.model.graph.inputs] == [3]
    lm = build_latency_model(om, vgg[1], fast_options(tmp_path))
    assert {t.ops for t in lm.tables if t.ops[0] == "Conv"} == {("Conv", "Relu")}
    rom, rcoupling = resnet
    rlm = build_latency_model(rom, rcoupling, fast_options(tmp_path))
    assert ("Conv", "Add", "Relu") in {t.ops for t in rlm.tables}
    adds = sum(n.op_type == "Add" for n in rom.graph.nodes)
    assert sum(t.ops.count("Add") for t in rlm.tables) == adds  # each fused Add is timed in one table only
    assert not {n.name for n in rom.graph.nodes if n.op_type in ("Relu", "Add")} & {t.node for t in rlm.tables}


def test_depthwise_conv_has_one_axis(tmp_path: Path) -> None:
    om = depthwise_model(tmp_path / "dw.onnx")
    coupling = build_groups(om.graph)
    lm = build_latency_model(om, coupling, fast_options(tmp_path))
    by_node = {t.node: t for t in lm.tables}
    assert len(by_node["dw"].axes) == 1
    assert by_node["dw"].ops == ("Conv", "Relu")
    assert len(by_node["conv3"].axes) == 1  # its output is the graph output: frozen


def test_fast_counts_within_floor_and_channels(vgg: tuple[OnnxModel, Coupling], tmp_path: Path) -> None:
    om, coupling = vgg
    floors = {g.id: g.channels // 4 + 1 for g in coupling.prunable}
    lm = build_latency_model(om, coupling, fast_options(tmp_path, max_counts=6), floors=floors)
    for g in coupling.prunable:
        fast = lm.fast_counts(g.id)
        assert fast
        assert g.channels in fast
        assert all(floors[g.id] <= k <= g.channels for k in fast)
        assert set(fast) <= set(lm.counts[g.id])
        assert min(lm.counts[g.id]) == floors[g.id]


def test_candidate_counts_policy() -> None:
    opts = LatencyOptions(max_counts=12)
    counts = candidate_counts(5, 64, opts)
    assert counts[0] == 5
    assert counts[-1] == 64
    assert {16, 32, 48, 63} <= set(counts)
    assert len(candidate_counts(1, 512, LatencyOptions(max_counts=7))) == 7
    assert candidate_counts(3, 3, opts) == (3,)


def test_measure_plan_error_reports_the_prediction(vgg: tuple[OnnxModel, Coupling], tmp_path: Path) -> None:
    om, coupling = vgg
    lm = build_latency_model(om, coupling, fast_options(tmp_path))
    keep = keep_fraction(coupling, 0.5)
    predicted, measured, error = measure_plan_error(om, coupling, lm, keep, fast_options(tmp_path))
    assert predicted == lm.predict(keep)
    assert measured > 0
    assert error == pytest.approx((predicted - measured) / measured)


def test_measurement_budget_leaves_ops_out(vgg: tuple[OnnxModel, Coupling], tmp_path: Path) -> None:
    om, coupling = vgg
    lm = build_latency_model(om, coupling, fast_options(tmp_path, max_measurements=0))
    assert lm.tables == ()
    assert any("budget" in why for _, why in lm.left_out)
    assert lm.predict(keep_fraction(coupling, 0.5)) == lm.original_ms


def test_bad_inputs_raise(vgg: tuple[OnnxModel, Coupling], tmp_path: Path) -> None:
    om, coupling = vgg
    with pytest.raises(BadInputError):
        LatencyOptions(batch=0)
    with pytest.raises(BadInputError):
        LatencyOptions(multiples=())
    with pytest.raises(BadInputError):
        build_latency_model(om, coupling, fast_options(tmp_path, provider="NoSuchExecutionProvider"))
    g = coupling.prunable[0]
    with pytest.raises(BadInputError):
        build_latency_model(om, coupling, fast_options(tmp_path), floors={g.id: g.channels + 1})
    lm = build_latency_model(om, coupling, fast_options(tmp_path))
    with pytest.raises(BadInputError):
        lm.predict({g.id: 0})
    with pytest.raises(BadInputError):
        lm.predict({10_000: 1})
    with pytest.raises(BadInputError):
        LatencyModel.from_json('{"format": "other"}')


def planted_model() -> LatencyModel:
    """Two groups of 16 channels, one table each (1 ms at 16 channels, 0.4 ms at 8); the whole model measured 2 ms."""
    tables = tuple(
        OpTable(f"conv{g}", ("Conv",), (AxisSpec(f"t{g}", 1, 16, ((g, 1, 16),)),), (((8,), 0.4), ((12,), 0.9), ((16,), 1.0)), f"k{g}")
        for g in (0, 1)
    )
    return LatencyModel(2.0, tables, {0: (8, 12, 16), 1: (8, 12, 16)}, {0: 16, 1: 16}, (), {"batch": 1}, BuildStats())


def test_calibration_fits_the_scale_to_the_measured_point() -> None:
    lm = planted_model()
    assert lm.scale is None and lm.factor == 1.0 and lm.coverage == 1.0
    point = calibration_point(lm)
    assert point == {0: 8, 1: 8}  # the largest fast count up to half
    assert lm.table_delta(point) == pytest.approx(-1.2)
    cal = lm.calibrated(point, 1.4)  # measured: half the change the tables add up to
    assert cal.scale == pytest.approx(0.5)
    assert cal.predict(point) == pytest.approx(1.4)
    assert cal.predict({0: 16, 1: 16}) == 2.0
    assert cal.predict({0: 8}) == pytest.approx(2.0 - 0.3)
    assert cal.change({0: 8, 1: 16}, 1, 8) == pytest.approx(-0.3)
    assert dict(cal.calibration) == point and cal.calibration_ms == 1.4
    assert LatencyModel.from_json(cal.to_json()) == cal
    assert lm.calibrated(point, 2.5).scale is None  # moved the other way: not identifiable, the coverage rule stays
    assert lm.calibrated(point, 2.0 - 1000).scale == pytest.approx(0.95 * 2.0 / 1.2)  # clamped: the smallest counts stay above 0
    assert lm.calibrated(point, 2.0 - 1000).predict(point) == pytest.approx(0.1)


def test_blocked_plans_read_the_blocked_calibration() -> None:
    """Counts off the channel blocking save less in the whole model than their tables say, blocked ones about what
    they say (ResNet-50 at 224): a plan whose counts keep the blocking is read on the blocked point's curve."""
    cal = planted_model().calibrated({0: 12, 1: 12}, 1.9)  # tables -0.2 ms, measured -0.1: scale 0.5
    assert cal.predict({0: 8}) == pytest.approx(2.0 - 0.5 * 0.6)  # no blocked point: one scale for every plan
    lm = cal.with_blocked({0: 8, 1: 8}, 1.0, 8)  # tables -1.2 ms, measured -1.0
    assert lm.is_blocked({0: 8, 1: 16}) and not lm.is_blocked({0: 12, 1: 8}) and lm.is_blocked({})
    assert lm.predict({0: 8, 1: 8}) == pytest.approx(1.0)
    assert lm.predict({0: 8}) == pytest.approx(2.0 - 0.6 / 1.2)
    assert lm.predict({0: 12, 1: 8}) == pytest.approx(2.0 - 0.5 * 0.7), "a count off the blocking: the first calibration"
    assert lm.predict({0: 12}) == pytest.approx(1.95)
    anchored = lm.anchored({0: 8}, 0.7)  # a blocked plan measured at all of its tables' saving
    assert anchored.predict({0: 8}) == pytest.approx(1.4)
    assert anchored.predict({0: 8, 1: 8}) == pytest.approx(1.0)
    assert anchored.predict({0: 12, 1: 8}) == pytest.approx(lm.predict({0: 12, 1: 8})), "blocked anchors stay on their curve"
    assert LatencyModel.from_json(anchored.to_json()) == anchored
    assert dataclasses.replace(lm, block=0).predict({0: 8}) == pytest.approx(cal.predict({0: 8}))


def test_anchors_correct_the_prediction_at_their_depth_and_stay_monotone() -> None:
    """Deep cuts measured at half the tables' saving, shallow ones at all of it: one scale cannot hold both."""
    point = {0: 8, 1: 8}
    cal = planted_model().calibrated(point, 1.4)  # tables -1.2 ms, measured -0.6 (scale 0.5)
    shallow = {0: 12, 1: 12}  # tables -0.2 ms
    assert cal.predict(shallow) == pytest.approx(1.9)
    anchored = cal.anchored(shallow, 0.9)  # measured 1.8 ms: what the tables said there
    assert anchored.predict(shallow) == pytest.approx(1.8)
    assert anchored.predict(point) == pytest.approx(1.4), "the calibration point still holds"
    assert anchored.predict({0: 8}) == pytest.approx(2.0 - (0.2 + 0.4 * 0.4))  # tables -0.6: between the two points
    assert anchored.predict({}) == 2.0
    assert LatencyModel.from_json(anchored.to_json()) == anchored
    assert anchored.anchors == ((((0, 12), (1, 12)), 0.9),)
    # a shallow point measured faster than the deep one raises the deeper saving (noise never makes deeper cuts slower)
    noisy = cal.anchored({0: 12}, 0.6)
    assert noisy.predict({0: 12}) == pytest.approx(1.2) and noisy.predict(point) == pytest.approx(1.2)
    # a deeper anchor measured slower than the calibration point holds at its depth: the calibration point is
    # lowered to it (the anchor is the plan's own depth), never the anchor raised
    shallow_cal = planted_model().calibrated(shallow, 1.8)  # tables -0.2 ms, measured -0.2 (scale 1)
    slow = shallow_cal.anchored(point, 0.95)  # measured 1.9 ms (-0.1), though the tables put it deeper (-1.2)
    assert slow.predict(point) == pytest.approx(1.9) and slow.predict(shallow) == pytest.approx(1.9)
    # a point measured slower than the original, or where the tables see no saving, changes nothing
    assert cal.anchored(shallow, 1.1).predict({0: 8}) == pytest.approx(cal.predict({0: 8}))
    assert cal.anchored({}, 0.5).predict(point) == pytest.approx(1.4)


def test_blocked_point_keeps_whole_blocks_of_channels() -> None:
    lm = planted_model()  # counts (8, 12, 16) of 16
    assert blocked_point(lm, 8) == {0: 8, 1: 8}
    assert blocked_point(lm, 16) == {0: 16, 1: 16}  # no smaller multiple tabulated: the group stays whole
    wide = dataclasses.replace(lm, counts={0: (5, 8, 16, 24, 32), 1: (3, 7, 16)}, channels={0: 32, 1: 16})
    assert blocked_point(wide, 8) == {0: 16, 1: 16}  # 0: the largest multiple up to half; 1: none below C


def test_the_calibration_point_is_timed_beside_the_original(vgg: tuple[OnnxModel, Coupling], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted side-by-side timing: the pruned point runs at half the original's time in the same rounds, so it is
    put at half the build's own timing of the original, whatever the load did to that first timing."""
    from graphprune.execution import latency_tables, timing

    seen: list[int] = []

    def planted(runners, rounds, per_round=1, warmup=2, min_ms=timing.ROUND_MS):  # type: ignore[no-untyped-def]
        seen.append(len(runners))
        for r in runners:  # each opens and runs
            with r() as run:
                run()
        return [2.0, 4.0]  # the point, then the original

    monkeypatch.setattr(latency_tables, "interleaved_ms", planted)
    om, coupling = vgg
    lm = build_latency_model(om, coupling, fast_options(tmp_path))
    assert seen and all(n == 2 for n in seen)
    assert lm.calibration_ms == pytest.approx(0.5 * lm.original_ms)
    assert lm.block == 8 and dict(lm.blocked) == blocked_point(dataclasses.replace(lm, scale=None), 16)
    assert lm.blocked_ms == pytest.approx(0.5 * lm.original_ms)  # timed beside the original too


def test_build_calibrates_on_a_measured_whole_model(vgg: tuple[OnnxModel, Coupling], tmp_path: Path) -> None:
    om, coupling = vgg
    lm = build_latency_model(om, coupling, fast_options(tmp_path))
    assert lm.calibration_ms is not None and lm.calibration_ms > 0
    uncalibrated = dataclasses.replace(lm, scale=None)
    assert dict(lm.calibration) in (calibration_point(uncalibrated), blocked_point(uncalibrated, 16))
    deepest = sum(min(ms for _, ms in t.points) - t.value(t.full) for t in lm.tables)
    high = min(10.0, 0.95 * lm.original_ms / -deepest) if deepest < 0 else 10.0
    if lm.scale is not None and 0.1 < lm.scale < high * (1 - 1e-9):  # fitted, not clamped (see LatencyModel.calibrated)
        assert lm.predict(dict(lm.calibration)) == pytest.approx(lm.calibration_ms)
    again = build_latency_model(om, coupling, fast_options(tmp_path))
    assert again.stats.measurements == 0 and again.tables == lm.tables  # every table point from the cache
    assert again.stats.model_timings >= 2 and again.calibration_ms is not None  # the whole model is timed again, never cached
    assert LatencyModel.from_json(lm.to_json()) == lm


def test_cache_key_holds_provider_threads_batch_and_statistics(vgg: tuple[OnnxModel, Coupling], tmp_path: Path) -> None:
    key = cache_setting(fast_options(tmp_path, threads=3, batch=4), "CPUExecutionProvider", "1.0")
    assert {key["provider"], key["threads"], key["batch"], key["statistic"], key["model_statistic"]} == {"CPUExecutionProvider", 3, 4, "min", "median"}
    om, coupling = vgg
    build_latency_model(om, coupling, fast_options(tmp_path, threads=1))
    other = build_latency_model(om, coupling, fast_options(tmp_path, threads=2))
    assert other.stats.cache_hits == 0 and other.stats.measurements > 0
    assert other.setting["threads"] == 2


def test_int8_tables_time_every_probe_and_whole_model_quantized(vgg: tuple[OnnxModel, Coupling], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from graphprune.backends import quantize

    om, coupling = vgg
    build_latency_model(om, coupling, fast_options(tmp_path))
    quantized: list[set[str]] = []
    real = quantize.quantized_for_timing

    forms: set[tuple[str, bool]] = set()

    def spy(model, feeds, options=None, probe=False):  # type: ignore[no-untyped-def]
        out = real(model, feeds, options, probe)
        quantized.append({n.op_type for n in out.graph})
        forms.add((options.activations, options.reduce_range))
        return out

    monkeypatch.setattr(quantize, "quantized_for_timing", spy)
    int8 = build_latency_model(om, coupling, fast_options(tmp_path, quantized=True))
    assert int8.setting["quantized"] == f"{QUANTIZED_SETTING}, uint8 activations, 7-bit weights"
    assert int8.stats.cache_hits == 0  # the fp32 tables are not reused
    assert forms == {("uint8", True)}, "timed in the quantize pass's default form"
    assert len(quantized) == int8.stats.measurements + int8.stats.model_timings
    assert any(ops & {"MaxPool"} and not ops & {"Conv", "Gemm"} for ops in quantized), "VGG's lone MaxPool probes"
    assert all({"QuantizeLinear", "DequantizeLinear"} <= ops for ops in quantized), "MaxPool probes quantized too"
    assert math.isfinite(int8.predict({g: max(1, c // 2) for g, c in int8.channels.items()}))


def test_a_model_timed_int8_is_quantized_once_for_every_batch(vgg: tuple[OnnxModel, Coupling],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The never-slower check times one pruned model at batch 1 and at the latency batch: one quantization."""
    from graphprune.backends import quantize
    from graphprune.backends.onnx_model import OnnxPrunable

    real = quantize.quantized_for_timing

    forms: list[tuple[str, bool]] = []

    def spy(model, feeds, options=None):  # type: ignore[no-untyped-def]
        forms.append((options.activations, options.reduce_range))
        return real(model, feeds, options)

    monkeypatch.setattr(quantize, "quantized_for_timing", spy)
    model = OnnxPrunable(vgg[0])
    ms = [model.latency_ms(b, 2, threads=1, quantized=Int8Form()) for b in (1, 4, 1)]
    assert forms == [("uint8", True)] and all(math.isfinite(m) and m > 0 for m in ms)
    model.latency_ms(1, 2, threads=1)  # fp32 timing does not quantize
    assert len(forms) == 1
    model.latency_ms(1, 2, threads=1, quantized=Int8Form("int8", False))  # another form: quantized in that form, once
    model.latency_ms(4, 2, threads=1, quantized=Int8Form("int8", False))
    assert forms == [("uint8", True), ("int8", False)]


def test_int8_tables_of_another_form_have_their_own_cache_key(tmp_path: Path) -> None:
    uint8 = cache_setting(fast_options(tmp_path, quantized=True), "CPUExecutionProvider", "1.0")
    int8 = cache_setting(fast_options(tmp_path, quantized=True, activations="int8", reduce_range=False), "CPUExecutionProvider", "1.0")
    assert uint8 != int8 and int8["int8"] == {"activations": "int8", "reduce_range": False}
    assert Int8Form.of_setting(int8) == Int8Form("int8", False) and Int8Form.of_setting(uint8) == Int8Form()
    assert Int8Form.of_setting(cache_setting(fast_options(tmp_path), "CPUExecutionProvider", "1.0")) is None
    with pytest.raises(BadInputError, match="activations"):
        fast_options(tmp_path, quantized=True, activations="float8")
