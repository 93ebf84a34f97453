"""Sequential reconstruction and the new compensation forms: exact on planted dependences through depthwise blocks,
grouped convs, residual streams and bias-free convs before BN; optimal at the last consumer; within the memory bound."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_compensation import Grouped  # conv1 (2 -> 8) -> grouped conv2 (8 -> 6, groups=2) -> pool -> fc
from torch import nn

from graphprune.backends.onnx import apply_kept
from graphprune.coupling.groups import build_groups
from graphprune.errors import BadInputError
from graphprune.execution.onnx_finetune import with_constants
from graphprune.execution.sessions import make_session
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx, prepare
from graphprune.ir.onnx import model_bytes
from graphprune.ir.plan import GroupPlan, Plan, kept_elements
from graphprune.pipeline.passes import CompensateOptions
from graphprune.recovery.compensation import compensate
from graphprune.recovery.reconstruct import reconstruct, reconstruction_memory

SHAPE = (2, 10, 10)
METHODS = {"edges": compensate, "sequential": reconstruct}


def _export(module: nn.Module, path, shape: tuple[int, ...] = SHAPE):
    torch.onnx.export(module.eval(), (torch.zeros(2, *shape),), str(path), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}})
    return load_onnx(path)


def _run(om, x: np.ndarray) -> np.ndarray:
    return make_session(model_bytes(om.model)).run(None, {"input": x})[0]


def _plan(coupling, anchor: str, keep: tuple[int, ...]) -> Plan:
    (g,) = [g for g in coupling.groups if g.anchor == anchor]
    return Plan((GroupPlan(g.id, g.anchor, g.channels, keep),))


def _pruned(om, coupling, plan, values):
    return prepare(apply_kept(with_constants(om, values), kept_elements(plan, coupling, om.graph)))


def _cal(n: int = 64, shape: tuple[int, ...] = SHAPE, seed: int = 0) -> Calibration:
    return Calibration((np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32),), None, "cal")


def _assert_exact(om, plan, method: str) -> None:
    """Compensated by ``method`` and pruned: outputs unchanged on unseen inputs; pruned alone: they change."""
    coupling = build_groups(om.graph)
    comp = METHODS[method](om.graph, coupling, plan, _cal())
    assert comp.edges >= 1 and not comp.skipped
    test = _cal(16, seed=1).inputs[0]
    want = _run(om, test)
    np.testing.assert_allclose(_run(_pruned(om, coupling, plan, comp.values), test), want, rtol=1e-4, atol=1e-4)
    assert np.abs(_run(_pruned(om, coupling, plan, {}), test) - want).max() > 1e-2


class Depthwise(nn.Module):
    """pw1 (2 -> 6) -> relu -> depthwise 3x3 -> relu -> pw2 (6 -> 4) -> pool -> fc: an inverted-residual body."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(2, 6, 1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw2 = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw2(torch.relu(self.dw(torch.relu(self.pw1(x)))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("method", METHODS)
def test_depthwise_block_is_compensated_at_the_next_dense_consumer(tmp_path, method):
    """Channel 5 is 2x channel 1 through pw1, relu, the depthwise conv and relu: dropping it with its depthwise
    filter is exact once pw2 reconstructs it from the kept channels."""
    torch.manual_seed(0)
    m = Depthwise()
    with torch.no_grad():
        m.pw1.weight[5], m.pw1.bias[5] = 2 * m.pw1.weight[1], 2 * m.pw1.bias[1]
        m.dw.weight[5], m.dw.bias[5] = m.dw.weight[1], 2 * m.dw.bias[1]
    om = _export(m, tmp_path / "dw.onnx")
    coupling = build_groups(om.graph)
    (g,) = [g for g in coupling.groups if g.anchor == "pw1.weight[0]"]
    assert {n.name for n in om.graph.nodes if n.op_type == "Conv" and int(n.attrs.get("group", 1)) == 6}
    _assert_exact(om, _plan(coupling, g.anchor, (0, 1, 2, 3, 4)), method)


def test_grouped_consumer_is_refitted_per_group(tmp_path):
    """Offset 3 of each group is a combination of that group's offsets 0 and 1 (different per group): exact."""
    torch.manual_seed(0)
    m = Grouped()
    with torch.no_grad():
        for base, (a, b) in ((0, (0.5, -2.0)), (4, (-1.5, 0.25))):
            m.conv1.weight[base + 3] = a * m.conv1.weight[base] + b * m.conv1.weight[base + 1]
            m.conv1.bias[base + 3] = a * m.conv1.bias[base] + b * m.conv1.bias[base + 1]
    om = _export(m, tmp_path / "g.onnx")
    _assert_exact(om, _plan(build_groups(om.graph), "conv1.weight[0]", (0, 1, 2)), "sequential")


class Residual(nn.Module):
    """stem (2 -> 4) -> two residual blocks (conv-relu-conv + identity, relu) -> pool -> fc: one stream group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.a = nn.ModuleList(nn.Conv2d(4, 3, 3, padding=1) for _ in range(2))
        self.b = nn.ModuleList(nn.Conv2d(3, 4, 3, padding=1) for _ in range(2))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for a, b in zip(self.a, self.b):
            x = torch.relu(x + b(torch.relu(a(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("method", METHODS)
def test_residual_stream_is_compensated_at_every_reader(tmp_path, method):
    """Stream channel 3 is 1.5x channel 1 in every writer (stem and each block's last conv), so at every depth:
    dropping it from the whole stream is exact once each reader (block convs, the classifier) absorbs it."""
    torch.manual_seed(0)
    m = Residual()
    with torch.no_grad():
        for conv in (m.stem, *m.b):
            conv.weight[3], conv.bias[3] = 1.5 * conv.weight[1], 1.5 * conv.bias[1]
    om = _export(m, tmp_path / "r.onnx")
    coupling = build_groups(om.graph)
    (g,) = [g for g in coupling.prunable if g.anchor.startswith("stem.weight")]
    readers = {n.name for n in om.graph.nodes if n.op_type in ("Conv", "Gemm")} - {n.name for n in om.graph.nodes if "stem" in n.name}
    comp = METHODS[method](om.graph, coupling, _plan(coupling, g.anchor, (0, 1, 2)), _cal())
    assert comp.edges >= 3 and len(readers) == 5  # two block inputs and the classifier read the stream
    _assert_exact(om, _plan(coupling, g.anchor, (0, 1, 2)), method)


class ConvBN(nn.Module):
    """conv1 (2 -> 6) -> bias-free conv2 (6 -> 5) -> BatchNorm -> relu -> pool -> fc (BN kept in the export)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 1)
        self.conv2 = nn.Conv2d(6, 5, 1, bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv2(self.conv1(x)))).mean((2, 3)))


@pytest.mark.parametrize("method", METHODS)
def test_constant_term_of_a_bias_free_conv_goes_into_the_batchnorm_mean(tmp_path, method):
    """Channel 5 = 0.7 ch1 - 1.3 ch3 + 0.4: the 0.4 has no conv bias to go into; BN's running mean takes it."""
    torch.manual_seed(0)
    m = ConvBN()
    with torch.no_grad():
        m.conv1.weight[5] = 0.7 * m.conv1.weight[1] - 1.3 * m.conv1.weight[3]
        m.conv1.bias[5] = 0.7 * m.conv1.bias[1] - 1.3 * m.conv1.bias[3] + 0.4
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "bn.onnx"
    torch.onnx.export(m.eval(), (torch.zeros(2, *SHAPE),), str(path), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}}, training=torch.onnx.TrainingMode.PRESERVE,
                      do_constant_folding=False)
    om = load_onnx(path)
    assert "BatchNormalization" in {n.op_type for n in om.graph.nodes}
    _assert_exact(om, _plan(build_groups(om.graph), "conv1.weight[0]", (0, 1, 2, 3, 4)), method)


class Chain(nn.Module):
    """conv1 -> relu -> conv2 -> relu -> pool -> fc: the classifier is the last consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_sequential_refit_of_the_last_consumer_is_least_squares_optimal(tmp_path):
    """Dropping independent channels is not exact; the classifier refitted on the pruned network's own inputs
    has the least output error on the calibration data (edge compensation leaves it as it was)."""
    torch.manual_seed(0)
    om = _export(Chain(), tmp_path / "c.onnx")
    coupling = build_groups(om.graph)
    plan = _plan(coupling, "conv1.weight[0]", (0, 2, 4))
    cal = _cal(256)
    want = _run(om, cal.inputs[0])
    err = {}
    for method, fn in METHODS.items():
        comp = fn(om.graph, coupling, plan, cal)
        err[method] = float(((_run(_pruned(om, coupling, plan, comp.values), cal.inputs[0]) - want) ** 2).mean())
        assert ("fc.weight" in comp.values) == (method == "sequential")
    assert err["sequential"] < 0.9 * err["edges"], err


class FlatHead(nn.Module):
    """conv1 (2 -> 6) -> Flatten -> Linear (600 -> 3): the Gemm reads 6 channels x 100 positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.fc = nn.Linear(600, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv1(x), 1))


@pytest.fixture()
def flat(tmp_path):
    torch.manual_seed(0)
    m = FlatHead()
    with torch.no_grad():
        m.conv1.weight[5] = 0.7 * m.conv1.weight[1] - 1.3 * m.conv1.weight[3]
        m.conv1.bias[5] = 0.7 * m.conv1.bias[1] - 1.3 * m.conv1.bias[3]
    om = _export(m, tmp_path / "flat.onnx")
    return om, _plan(build_groups(om.graph), "conv1.weight[0]", (0, 1, 2, 3, 4))


def test_oversized_consumer_is_refitted_per_position_within_the_bound(flat):
    """The joint Gram of 5 kept + 6 original channels x 100 positions is 968 kB dense; a bound that leaves about
    630 kB beside the activations takes it per position (still exact on the planted dependence), within the bound."""
    om, plan = flat
    coupling = build_groups(om.graph)
    dense = reconstruction_memory(om.graph, coupling, plan, 10**9, samples=64)
    assert dense.consumers[0].form == "dense" and dense.peak <= dense.bound and dense.consumers[0].gram_bytes > 968_000
    bound = 2 * dense.held_bytes + 20_000
    memory = reconstruction_memory(om.graph, coupling, plan, bound, samples=64)
    assert memory.consumers[0].form == "per-position" and memory.peak <= bound
    assert "(refitted one at a time)" in memory.line() and "activations of 64 samples" in memory.line()
    comp = reconstruct(om.graph, coupling, plan, _cal(), memory=memory)
    assert 0 < comp.gram_bytes <= memory.gram_bytes
    test = _cal(16, seed=1).inputs[0]
    np.testing.assert_allclose(_run(_pruned(om, coupling, plan, comp.values), test), _run(om, test), rtol=1e-4, atol=1e-4)


def test_activations_beyond_the_bound_use_fewer_samples_or_are_refused(flat):
    om, plan = flat
    coupling = build_groups(om.graph)
    full = reconstruction_memory(om.graph, coupling, plan, 10**9, samples=64)
    per_sample = full.held_bytes // 64
    fewer = reconstruction_memory(om.graph, coupling, plan, 2 * 40 * per_sample, samples=64)
    assert fewer.samples == 40 and fewer.peak <= fewer.bound
    with pytest.raises(BadInputError, match="compensation cannot fit"):
        reconstruction_memory(om.graph, coupling, plan, 3 * per_sample, samples=64)


def test_unknown_compensation_method_is_refused():
    with pytest.raises(BadInputError, match="method must be one of"):
        CompensateOptions(method="magic").check()


class SquareBN(nn.Module):
    """conv1 (2 -> 6) -> relu -> conv2 (6 -> 4) -> x * x -> BatchNorm -> pool -> fc: the BN reads a value pruning
    changes (the product) that no refitted consumer outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(self.bn(y * y).mean((2, 3)))


def _bn_input_moments(om, data: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of the BN's input, normalised by its running statistics (eval mode)."""
    (bn,) = [n for n in om.graph.nodes if n.op_type == "BatchNormalization"]
    x = torch.from_numpy(data.inputs[0])
    from graphprune.execution.interpreter import GraphInterpreter

    got = []
    interp = GraphInterpreter(om.graph).eval()
    with torch.no_grad():
        interp(x, taps={bn.inputs[0]: lambda t: got.append(t) or t})
    t = got[0].double()
    mean = np.asarray(om.graph.const(bn.inputs[3]), np.float64)
    var = np.asarray(om.graph.const(bn.inputs[4]), np.float64)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    z = (t - torch.from_numpy(mean)[None, :, None, None]) / torch.from_numpy(np.sqrt(var + eps))[None, :, None, None]
    return z.mean((0, 2, 3)).numpy(), z.var((0, 2, 3), unbiased=False).numpy()


@pytest.mark.parametrize("correct", [True, False])
def test_sequential_refit_corrects_the_batchnorm_no_refit_feeds(tmp_path, correct):
    """Dropping independent channels changes the product the BN reads; the refit moves the BN's running statistics by
    what pruning changed (its normalised input has the original's mean and variance on the calibration data), and
    only with the correction on."""
    torch.manual_seed(0)
    m = SquareBN()
    path = tmp_path / "sq.onnx"
    torch.onnx.export(m.eval(), (torch.zeros(2, *SHAPE),), str(path), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}}, training=torch.onnx.TrainingMode.PRESERVE,
                      do_constant_folding=False)
    om = load_onnx(path)
    coupling = build_groups(om.graph)
    plan = _plan(coupling, "conv1.weight[0]", (0, 2, 4))
    cal = _cal(128)
    comp = reconstruct(om.graph, coupling, plan, cal, batch_norm=correct)
    assert comp.batch_norms == int(correct)
    want = _bn_input_moments(om, cal)
    got = _bn_input_moments(_pruned(om, coupling, plan, comp.values), cal)
    close = all(np.allclose(g, w, rtol=1e-3, atol=1e-4) for g, w in zip(got, want))
    assert close == correct, (got, want)


def test_shared_original_activations_give_the_same_refit(tmp_path):
    """The limit's points share the original's reads: replaying them gives the very values a full sweep gives, and
    reads made on other batches are ignored rather than misused."""
    from graphprune.recovery.reconstruct import original_activation_bytes, original_activations

    torch.manual_seed(0)
    om = _export(SquareBN(), tmp_path / "sq.onnx")
    coupling = build_groups(om.graph)
    plan = _plan(coupling, "conv1.weight[0]", (0, 2, 4))
    cal = _cal(96)
    shared = original_activations(om.graph, cal, 32)
    assert shared.sizes == (32, 32, 32) and shared.nbytes == original_activation_bytes(om.graph, 96)
    want = reconstruct(om.graph, coupling, plan, cal, 32)
    for original in (shared, original_activations(om.graph, cal, 48)):  # the second: other batches, not used
        got = reconstruct(om.graph, coupling, plan, cal, 32, original=original)
        assert got.values.keys() == want.values.keys()
        for name, value in want.values.items():
            np.testing.assert_allclose(got.values[name], value, rtol=1e-6, atol=1e-7)


def test_consumers_of_a_norm_are_not_refitted_downstream(tmp_path):
    """After onnxruntime's optimizer the residual stream enters SkipLayerNormalization as input 0, so the changes of
    pruned layers reach the linear layers that read the norms; refitting those diverged (a rank-deficient input:
    LayerNorm's output is mean-free), so only the pruned layers' consumers are refitted, as on the plain export."""
    from test_transformers import _export, _ort_optimize

    from graphprune.planning.uniform import uniform_plan
    from graphprune.recovery.reconstruct import _refits

    path = _export("gpt2", tmp_path / "gpt2.onnx")
    refitted = []
    for src in (path, _ort_optimize(path, tmp_path / "gpt2.ort.onnx", "gpt2")):
        om = load_onnx(src)
        coupling = build_groups(om.graph)
        producers, nodes = om.graph.producers(), {n.name: n for n in om.graph.nodes}
        refits, _ = _refits(om.graph, coupling, uniform_plan(om.graph, coupling, 0.5))
        readers = [producers[nodes[r.target.edge.node].inputs[0]].op_type for r in refits]
        assert refits and not {"LayerNormalization", "SkipLayerNormalization"} & set(readers)
        refitted.append(sorted(r.target.edge.node for r in refits))
    assert refitted[0] == refitted[1]
