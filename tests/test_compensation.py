"""Compensation and statistics repair: exact on planted dependences, means restored, bad data refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graphprune import models
from graphprune.backends.onnx import apply_kept
from graphprune.cli import main
from graphprune.coupling.groups import build_groups
from graphprune.execution.onnx_finetune import with_constants
from graphprune.execution.sessions import make_session
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx, prepare
from graphprune.ir.onnx import model_bytes
from graphprune.ir.plan import GroupPlan, Plan, kept_elements
from graphprune.recovery.compensation import compensate
from graphprune.recovery.repair import correct_biases, output_means, reestimate_batch_norm

SHAPE = (2, 10, 10)


class Linear2(nn.Module):
    """conv1 -> conv2 (3x3, zero padding) -> relu -> pool -> fc: conv1's channels enter conv2 linearly."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(self.conv1(x))).mean((2, 3)))


def _export(module: nn.Module, path) -> object:
    torch.onnx.export(module.eval(), (torch.zeros(2, *SHAPE),), str(path), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}})
    return load_onnx(path)


def _run(om, x: np.ndarray) -> np.ndarray:
    return make_session(model_bytes(om.model)).run(None, {"input": x})[0]


def _planted(seed: int = 0) -> Linear2:
    """Channel 5 of conv1 is 0.7 * channel 1 - 1.3 * channel 3 (weights and bias); conv2 reads it (non-zero weights)."""
    torch.manual_seed(seed)
    m = Linear2()
    with torch.no_grad():
        m.conv1.weight[5] = 0.7 * m.conv1.weight[1] - 1.3 * m.conv1.weight[3]
        m.conv1.bias[5] = 0.7 * m.conv1.bias[1] - 1.3 * m.conv1.bias[3]
        assert m.conv2.weight[:, 5].abs().sum() > 0
    return m


def _assert_compensation_is_exact(om, coupling, plan) -> None:
    """Compensated and pruned: outputs unchanged; pruned alone: outputs change."""
    x = np.random.default_rng(0).standard_normal((64, *SHAPE)).astype(np.float32)
    comp = compensate(om.graph, coupling, plan, Calibration((x,), None, "cal"))
    assert comp.edges == 1 and not comp.skipped
    pruned = prepare(apply_kept(with_constants(om, comp.values), kept_elements(plan, coupling, om.graph)))
    plain = prepare(apply_kept(om, kept_elements(plan, coupling, om.graph)))
    test = np.random.default_rng(1).standard_normal((16, *SHAPE)).astype(np.float32)
    want = _run(om, test)
    np.testing.assert_allclose(_run(pruned, test), want, rtol=1e-4, atol=1e-4)
    assert np.abs(_run(plain, test) - want).max() > 1e-2  # without compensation the output changes


def test_planted_dependent_channel_is_removed_exactly(tmp_path):
    om = _export(_planted(), tmp_path / "p.onnx")
    coupling = build_groups(om.graph)
    (g,) = [g for g in coupling.groups if g.anchor == "conv1.weight[0]"]
    plan = Plan((GroupPlan(g.id, g.anchor, g.channels, (0, 1, 2, 3, 4)),))
    _assert_compensation_is_exact(om, coupling, plan)


class Grouped(nn.Module):
    """conv1 (2 -> 8) -> grouped conv2 (8 -> 6, groups=2): conv1 channel offsets couple across conv2's groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1, groups=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(self.conv1(x))).mean((2, 3)))


def test_grouped_consumer_is_compensated_within_each_group(tmp_path):
    """Offset 3 of each conv2 group depends on kept offsets of the same group only; dropping it is exact."""
    torch.manual_seed(0)
    m = Grouped()
    with torch.no_grad():
        for base in (0, 4):  # offset 3 in group g = 0.5 * offset 0 - 2 * offset 1 of that group
            m.conv1.weight[base + 3] = 0.5 * m.conv1.weight[base] - 2.0 * m.conv1.weight[base + 1]
            m.conv1.bias[base + 3] = 0.5 * m.conv1.bias[base] - 2.0 * m.conv1.bias[base + 1]
    om = _export(m, tmp_path / "g.onnx")
    coupling = build_groups(om.graph)
    (g,) = [g for g in coupling.groups if g.anchor == "conv1.weight[0]"]
    assert g.channels == 4  # in-group offsets, each two elements (one per conv2 group)
    plan = Plan((GroupPlan(g.id, g.anchor, g.channels, (0, 1, 2)),))
    _assert_compensation_is_exact(om, coupling, plan)


class Tokens(nn.Module):
    """Linear (2 -> 6) then Linear (6 -> 3) on (N, T, 2) tokens: the second is MatMul + Add in ONNX."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def test_matmul_consumer_takes_the_constant_term_into_the_following_add(tmp_path):
    torch.manual_seed(0)
    m = Tokens().eval()
    with torch.no_grad():  # feature 5 = 0.7 f1 - 1.3 f3 + 0.4: the 0.4 must go into fc2's bias
        m.fc1.weight[5] = 0.7 * m.fc1.weight[1] - 1.3 * m.fc1.weight[3]
        m.fc1.bias[5] = 0.7 * m.fc1.bias[1] - 1.3 * m.fc1.bias[3] + 0.4
    torch.onnx.export(m, (torch.zeros(2, 5, 2),), str(tmp_path / "t.onnx"), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}})
    om = load_onnx(tmp_path / "t.onnx")
    assert "MatMul" in {n.op_type for n in om.graph.nodes}
    coupling = build_groups(om.graph)
    (g,) = [g for g in coupling.prunable if g.channels == 6]
    plan = Plan((GroupPlan(g.id, g.anchor, g.channels, (0, 1, 2, 3, 4)),))
    x = np.random.default_rng(0).standard_normal((32, 5, 2)).astype(np.float32)
    comp = compensate(om.graph, coupling, plan, Calibration((x,), None, "cal"))
    assert comp.edges == 1 and not comp.skipped
    pruned = prepare(apply_kept(with_constants(om, comp.values), kept_elements(plan, coupling, om.graph)))
    test = np.random.default_rng(1).standard_normal((4, 5, 2)).astype(np.float32)
    np.testing.assert_allclose(_run(pruned, test), _run(om, test), rtol=1e-4, atol=1e-4)


def _folded(tmp_path, name="resnet20"):
    path = tmp_path / f"{name}.onnx"
    models.export_onnx(models.build(name), path, bn="fold")
    return load_onnx(path)


def test_bias_correction_restores_consumer_means(tmp_path):
    om = _folded(tmp_path)
    coupling = build_groups(om.graph)
    rng = np.random.default_rng(0)
    groups = []
    for g in coupling.prunable[:6]:
        keep = np.sort(rng.permutation(g.channels)[: g.channels // 2])
        groups.append(GroupPlan(g.id, g.anchor, g.channels, tuple(int(i) for i in keep)))
    plan = Plan(tuple(groups))
    kept = kept_elements(plan, coupling, om.graph)
    pruned = prepare(apply_kept(om, kept))
    x = rng.standard_normal((96, *models.INPUT_SHAPE)).astype(np.float32)
    data = Calibration((x,), None, "cal")
    from graphprune.analysis.gates import plan_gates

    gates = plan_gates(coupling, om.graph)
    consumers = sorted({e.node for gp in plan.groups for e in gates.edges[gp.group]})
    values = correct_biases(om.graph, pruned.graph, consumers, kept, data)
    assert values
    repaired = with_constants(pruned, values)
    nodes = {n.name: n for n in repaired.graph.nodes}
    outs = [nodes[c].outputs[0] for c in consumers if c in nodes and nodes[c].inputs[2] in values]
    want, before, after = output_means(om.graph, outs, data), output_means(pruned.graph, outs, data), output_means(repaired.graph, outs, data)
    from graphprune.ir.graph import Axis

    for out in outs:
        idx = kept.get(Axis(out, 1))
        ref = want[out] if idx is None else want[out][idx]
        np.testing.assert_allclose(after[out], ref, rtol=1e-3, atol=1e-4)
    assert any(np.abs(before[o] - (want[o] if kept.get(Axis(o, 1)) is None else want[o][kept[Axis(o, 1)]])).max() > 1e-3 for o in outs)


def test_batchnorm_reestimation_matches_the_batch_statistics(exported):
    om = load_onnx(exported("vgg", 17, "keep"))
    x = np.random.default_rng(0).standard_normal((128, *models.INPUT_SHAPE)).astype(np.float32)
    values = reestimate_batch_norm(om.graph, Calibration((x,), None, "cal"), batch_size=32)
    first = next(n for n in om.graph.nodes if n.op_type == "BatchNormalization")
    mean = output_means(om.graph, [first.inputs[0]], Calibration((x,), None, "cal"))[first.inputs[0]]
    np.testing.assert_allclose(values[first.inputs[3]], mean, rtol=1e-4, atol=1e-5)
    assert len(values) == 2 * sum(n.op_type == "BatchNormalization" for n in om.graph.nodes)


@pytest.mark.parametrize("kind,message", [("nan", "NaN"), ("shape", "sample shape"), ("few", "at least 2 samples")])
def test_bad_calibration_data_is_refused(exported, tmp_path, capsys, kind, message):
    x = np.zeros((8, *models.INPUT_SHAPE), np.float32)
    if kind == "nan":
        x[0, 0, 0, 0] = np.nan
    elif kind == "shape":
        x = np.zeros((8, 2, 28, 28), np.float32)
    else:
        x = x[:1]
    np.savez(tmp_path / "bad.npz", input=x)
    out = tmp_path / "o.onnx"
    assert main(["prune", str(exported("vgg")), "-o", str(out), "--macs", "0.5", "--method", "uniform",
                 "--data", str(tmp_path / "bad.npz"), "--compensate"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_prune_cli_compensates_by_default_with_data(exported, tmp_path):
    import json

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", input=rng.standard_normal((64, *models.INPUT_SHAPE)).astype(np.float32))
    out = tmp_path / "o.onnx"
    assert main(["prune", str(exported("resnet20", 13, "fold")), "-o", str(out), "--macs", "0.5", "--method", "uniform",
                 "--criterion", "l2", "--data", str(tmp_path / "cal.npz"), "--latency-runs", "0"]) == 0
    figures = json.loads((tmp_path / "o.report.json").read_text())["figures"]
    # the sequential refit (the default) fits every consumer's constant term: bias correction would only undo it
    assert figures["compensated_edges"] > 0 and figures["repair"].startswith("none (the sequential refit matched")
    out2 = tmp_path / "o2.onnx"
    assert main(["prune", str(exported("resnet20", 13, "fold")), "-o", str(out2), "--macs", "0.5", "--method", "uniform",
                 "--criterion", "l2", "--data", str(tmp_path / "cal.npz"), "--latency-runs", "0", "--no-compensate"]) == 0
    assert json.loads((tmp_path / "o2.report.json").read_text())["figures"]["repair"].startswith("bias correction")


def test_torch_module_compensation_and_bn_repair():
    from graphprune.backends.torch_module import compensate_module, prune_module, reestimate_module_batch_norm
    from graphprune.frontends.torch.trace import load_module

    module = _planted()
    x = torch.randn(64, *SHAPE)
    tm = load_module(module, [x[:2]])
    coupling = build_groups(tm.graph)
    (g,) = [g for g in coupling.groups if g.anchor == "conv1.weight[0]"]
    plan = Plan((GroupPlan(g.id, g.anchor, g.channels, (0, 1, 2, 3, 4)),))
    compensated = compensate_module(tm, coupling, plan, Calibration((x.numpy(),), None, "cal"))
    tm2 = load_module(compensated, [x[:2]])
    small = prune_module(tm2, build_groups(tm2.graph), plan)
    test = torch.randn(8, *SHAPE)
    with torch.no_grad():
        np.testing.assert_allclose(small(test).numpy(), module(test).numpy(), rtol=1e-4, atol=1e-4)
    bn = models.build("vgg")
    cal = Calibration((np.random.default_rng(0).standard_normal((64, *models.INPUT_SHAPE)).astype(np.float32),), None, "c")
    reestimate_module_batch_norm(bn, cal, batch_size=64)
    first = bn.features[1]
    with torch.no_grad():
        want = bn.features[0](torch.from_numpy(cal.inputs[0])).mean((0, 2, 3))
    np.testing.assert_allclose(first.running_mean.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    assert not bn.training


def _quantized_planted(tmp_path):
    """The planted model as onnxruntime's static QDQ int8 (per-channel weight scales, int32 biases)."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    _export(_planted(), tmp_path / "p.onnx")
    x = np.random.default_rng(0).standard_normal((64, *SHAPE)).astype(np.float32)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": x[i:i + 16]} for i in range(0, 64, 16)])

        def get_next(self) -> dict | None:
            return next(self._it, None)

    out = tmp_path / "p.qdq.onnx"
    quantization.quantize_static(str(tmp_path / "p.onnx"), str(out), Reader(), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True, activation_type=quantization.QuantType.QInt8,
                                 weight_type=quantization.QuantType.QInt8)
    return load_onnx(out), x


@pytest.mark.parametrize("method", ["edges", "sequential"])
def test_qdq_weights_are_refitted_and_stay_int8(tmp_path, method):
    """On a QDQ model the consumer's int8 weight and int32 bias are refitted through their DequantizeLinear."""
    from graphprune.recovery.reconstruct import reconstruct
    from graphprune.recovery.stored import quantized_source

    om, x = _quantized_planted(tmp_path)
    coupling = build_groups(om.graph)
    (g,) = [g for g in coupling.groups if g.anchor.startswith("conv1.") and g.channels == 6]
    plan = Plan((GroupPlan(g.id, g.anchor, g.channels, (0, 1, 2, 3, 4)),))
    data = Calibration((x,), None, "cal")
    comp = (compensate if method == "edges" else reconstruct)(om.graph, coupling, plan, data)
    assert comp.edges >= 1
    conv2 = next(n for n in om.graph.nodes if n.op_type == "Conv" and quantized_source(om.graph, n.inputs[1])
                 and om.graph.shape(n.inputs[1])[1] == 6)
    weight, bias = quantized_source(om.graph, conv2.inputs[1]), quantized_source(om.graph, conv2.inputs[2])
    assert weight is not None and bias is not None
    assert weight.q in comp.values and comp.values[weight.q].dtype == np.int8
    assert comp.values[bias.q].dtype == np.int32
    # a tied int32 bias keeps scale = x_scale * w_scale (what onnxruntime's fused QLinearConv assumes)
    x_scale = float(om.graph.param(next(n for n in om.graph.nodes if n.outputs[0] == conv2.inputs[0]).inputs[1]))
    w_scale = comp.values.get(weight.scale, om.graph.param(weight.scale))
    b_scale = comp.values.get(bias.scale, om.graph.param(bias.scale))
    np.testing.assert_allclose(b_scale, x_scale * w_scale, rtol=1e-5)
    kept = kept_elements(plan, coupling, om.graph)
    pruned = prepare(apply_kept(with_constants(om, comp.values), kept))
    plain = prepare(apply_kept(om, kept))
    test = np.random.default_rng(1).standard_normal((64, *SHAPE)).astype(np.float32)
    want = _run(om, test)
    err, err_plain = np.abs(_run(pruned, test) - want).max(), np.abs(_run(plain, test) - want).max()
    assert err < 0.25 * err_plain, (err, err_plain)


def _dq_matmul(tmp_path, q: np.ndarray, scale: np.ndarray):
    """The channel graph of ``y = x @ DequantizeLinear(q, scale, 0)`` (per-axis scale along the columns)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1), helper.make_node("MatMul", ["x", "w"], ["y"])],
        "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.zeros(2, np.int8), "z")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "dq.onnx"))
    return load_onnx(tmp_path / "dq.onnx").graph


def test_requantized_7_bit_weights_stay_in_7_bits(tmp_path):
    """int8 weights within [-64, 64] (onnxruntime's reduce_range) are requantized within it: the scale grows instead."""
    from graphprune.recovery.stored import float_const, stored_values

    q, scale = np.array([[60, -20], [5, 64]], np.int8), np.array([0.5, 0.1], np.float32)
    g = _dq_matmul(tmp_path, q, scale)
    w = float_const(g, "w")
    w[0, 1] = -12.8  # twice column 1's range: 8 bits would hold it as -128 at the same scale
    grown = stored_values(g, {"w": w})
    assert grown["q"].min() >= -64 and grown["q"].max() <= 64
    assert grown["s"][0] == scale[0] and grown["s"][1] == pytest.approx(12.8 / 64)
    np.testing.assert_array_equal(grown["q"][:, 0], q[:, 0])


def test_requantized_values_grow_the_scale_only_where_they_do_not_fit(tmp_path):
    from graphprune.recovery.stored import float_const, stored_values

    q = np.array([[100, -20], [5, 127]], np.int8)
    scale = np.array([0.5, 0.1], np.float32)
    g = _dq_matmul(tmp_path, q, scale)
    w = float_const(g, "w")
    np.testing.assert_allclose(w, q * scale, rtol=1e-6)  # per-axis scale along axis 1 (columns)
    same = stored_values(g, {"w": w})
    np.testing.assert_array_equal(same["q"], q)  # unchanged values come back bit-identical
    np.testing.assert_array_equal(same["s"], scale)
    w2 = w.copy()
    w2[0, 1] = -25.6  # twice column 1's range
    grown = stored_values(g, {"w": w2})
    assert grown["s"][0] == scale[0] and grown["s"][1] == pytest.approx(0.2)
    np.testing.assert_array_equal(grown["q"][:, 0], q[:, 0])
    assert grown["q"][0, 1] == -128


@pytest.mark.parametrize(("form", "shape", "positions"), [("dense", (3, 6, 5, 4), 1), ("shared", (3, 6, 5, 4), 1),
                                                          ("dense", (7, 12), 2), ("per-position", (7, 12), 2),
                                                          ("shared", (7, 12), 2)])
def test_leading_rows_are_the_full_grams_rows(form, shape, positions):
    """A Gram of only the first channels' rows (the sequential refit's kept channels) holds the full Gram's rows, on
    the channel-major path of conv inputs and the flattened one alike."""
    from graphprune.recovery.compensation import _Stats

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    channels = shape[1] // positions
    idx = np.arange(shape[1])
    full, lead = _Stats(channels, positions, form), _Stats(channels, positions, form, rows=2)
    full.add(x, 1, idx, 1 << 20)
    lead.add(x, 1, idx, 1 << 20)
    rows = 2 * positions if form == "dense" else 2
    part = full.s2[:, :rows] if form == "per-position" else full.s2[:rows]
    assert lead.n == full.n and torch.allclose(lead.s1, full.s1)
    assert torch.allclose(lead.s2, part, rtol=1e-6, atol=1e-6)
    flat = x.movedim(1, -1).reshape(-1, shape[1]).double()
    if form == "dense":
        assert torch.allclose(full.s2, flat.T @ flat, rtol=1e-6, atol=1e-5)
