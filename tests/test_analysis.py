"""Effective filter analysis: planted singularities are found exactly; labels and Fisher agree;
results survive a round trip; spectrum helpers on known matrices."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graphprune.analysis.effective import Analysis, AnalysisOptions, analyze
from graphprune.analysis.spectrum import eigenvalues, energy_rank, singularities
from graphprune.coupling.groups import build_groups
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx
from graphprune.planning.selection import drop_cost, greedy_drop_order

SHAPE = (1, 12, 12)


class Tiny(nn.Module):
    """conv(1->w) -> relu -> pool -> conv(w->16) -> relu -> GAP -> linear(16->10)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        h = torch.relu(self.conv2(h)).mean((2, 3))
        return self.fc(h)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g)
    teacher = Tiny(8)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(99 + p.numel())) * 0.8)
        y = teacher(x).argmax(1)
    return x, y


@pytest.fixture(scope="module")
def trained() -> tuple[Tiny, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    x, y = _data(2048, 0)
    model = Tiny(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _step in range(300):
        idx = torch.randint(0, len(x), (128,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.6, f"the test model did not train ({acc:.2f})"
    cal_x, cal_y = _data(768, 1)
    return model.eval(), cal_x.numpy(), cal_y.numpy()


def _plant(model: Tiny, zeros: int, dups: int, triples: int, seed: int = 0) -> Tiny:
    """Same function, more channels: zero filters, duplicated filters (consumer weights halved)
    and filters whose consumer weights make their gradient a sum of two others'."""
    rng = np.random.default_rng(seed)
    w1, b1 = model.conv1.weight.detach().clone(), model.conv1.bias.detach().clone()
    w2 = model.conv2.weight.detach().clone()
    base = w1.shape[0]
    new_w1, new_b1, cols = [w1], [b1], [w2]
    for _ in range(zeros):
        new_w1.append(torch.zeros_like(w1[:1]))
        new_b1.append(torch.zeros(1))
        cols.append(torch.randn_like(w2[:, :1]))
    sources = rng.permutation(base)[: dups + triples]
    for c in sources[:dups]:
        cols[0][:, c] /= 2
        new_w1.append(w1[c:c + 1])
        new_b1.append(b1[c:c + 1])
        cols.append(cols[0][:, c:c + 1].clone())
    for c in sources[dups:]:
        w = w2[:, c:c + 1].clone()
        r = torch.randn_like(w) * w.abs().mean()
        cols[0][:, c:c + 1] = w / 4 + r
        new_w1 += [w1[c:c + 1], w1[c:c + 1]]
        new_b1 += [b1[c:c + 1], b1[c:c + 1]]
        cols += [w / 4 - r, w / 2]
    out = Tiny(base + zeros + dups + 2 * triples)
    with torch.no_grad():
        out.conv1.weight.copy_(torch.cat(new_w1))
        out.conv1.bias.copy_(torch.cat(new_b1))
        out.conv2.weight.copy_(torch.cat(cols, dim=1))
        out.conv2.bias.copy_(model.conv2.bias)
        out.fc.load_state_dict(model.fc.state_dict())
    return out.eval()


def _analyze(model: Tiny, x: np.ndarray, y: np.ndarray | None, tmp_path, **options) -> Analysis:
    path = tmp_path / f"tiny{np.random.default_rng().integers(1 << 30)}.onnx"
    torch.onnx.export(model, (torch.from_numpy(x[:2]),), str(path), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}})
    om = load_onnx(path)
    coupling = build_groups(om.graph)
    return analyze(om.graph, coupling, Calibration((x,), y, "test"), AnalysisOptions(**options))


def _conv1_group(a: Analysis):
    (g,) = [g for g in a.groups if g.anchor.startswith("conv1.weight")]
    return g


def test_planting_keeps_the_function(trained):
    model, x, _ = trained
    planted = _plant(model, 2, 2, 2)
    with torch.no_grad():
        np.testing.assert_allclose(planted(torch.from_numpy(x)).numpy(), model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("zeros,dups,triples", [(2, 0, 0), (0, 3, 0), (0, 0, 2), (2, 2, 2), (1, 3, 1)])
def test_planted_singularities_are_counted_exactly(trained, tmp_path, zeros, dups, triples):
    model, x, y = trained
    base = _conv1_group(_analyze(model, x, y, tmp_path, loss="labels", eps=0.0))
    planted = _conv1_group(_analyze(_plant(model, zeros, dups, triples), x, y, tmp_path, loss="labels", eps=0.0))
    s0, s = base.singular, planted.singular
    assert (s.elimination - s0.elimination, s.overlap - s0.overlap, s.linear_dependence - s0.linear_dependence) == (zeros, dups, triples)
    assert planted.channels == base.channels + zeros + dups + 2 * triples
    deficit = zeros + dups + triples + s0.total
    assert planted.effective == planted.channels - deficit
    assert planted.redundancy == pytest.approx(deficit / planted.channels)


def test_trained_model_has_no_structural_singularities(trained, tmp_path):
    model, x, y = trained
    g = _conv1_group(_analyze(model, x, y, tmp_path, loss="labels", eps=0.0))
    assert g.singular.total == 0 and g.effective == g.channels


def test_labels_and_fisher_ranks_agree(trained, tmp_path):
    model, x, y = trained
    labelled = _analyze(model, x, y, tmp_path, loss="labels", eps=1e-2)
    fisher = _analyze(model, x, None, tmp_path, loss="fisher", eps=1e-2)
    for a, b in zip(labelled.groups, fisher.groups):
        assert abs(a.effective - b.effective) <= max(1, 0.1 * a.effective), (a.anchor, a.effective, b.effective)


def test_network_limit_counts_effective_channels(trained, tmp_path):
    model, x, y = trained
    a = _analyze(_plant(model, 4, 0, 0), x, y, tmp_path, loss="labels", eps=0.0)
    assert a.limit.at_limit.macs < a.limit.original.macs
    assert a.limit.macs_reduction > 1.0 and a.limit.params_reduction > 1.0
    g1 = _conv1_group(a)
    (g2,) = [g for g in a.groups if g.anchor.startswith("conv2.weight")]
    assert g1.effective == g1.channels - 4

    def macs(c1: int, c2: int) -> int:  # conv1 on 12x12, conv2 on 6x6, then the linear layer
        return c1 * 9 * 144 + c2 * c1 * 9 * 36 + 10 * c2

    assert a.limit.original.macs == macs(12, 16)
    assert a.limit.at_limit.macs == macs(g1.effective, max(1, g2.effective))


def test_save_and_load_round_trip(trained, tmp_path):
    model, x, y = trained
    a = _analyze(model, x[:256], y[:256], tmp_path, loss="labels")
    npz = a.save(tmp_path / "a.json")
    assert npz.exists()
    b = Analysis.load(tmp_path / "a.json")
    assert b.groups == a.groups and b.limit == a.limit and b.options == a.options
    for gid, gf in a.fisher.items():
        np.testing.assert_array_equal(b.fisher[gid].f, gf.f)


def test_few_samples_warn(trained, tmp_path):
    model, x, y = trained
    a = _analyze(model, x[:20], y[:20], tmp_path, loss="labels")
    assert all(g.warning and "samples" in g.warning for g in a.groups if g.channels * 4 > 20)


def test_energy_rank_and_singularities_on_known_matrices():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((400, 6)) * np.array([10, 5, 1, 0.5, 0.1, 0.01])
    g = np.c_[g, np.zeros(400), 3 * g[:, 0], g[:, 1] - g[:, 2]]
    f = g.T @ g / 400
    s = singularities(f)
    assert (s.elimination, s.overlap, s.linear_dependence) == (1, 1, 1)
    eig = eigenvalues(f)
    assert energy_rank(eig, 0.0) >= 6 and energy_rank(eig, 0.5) == 1
    assert energy_rank(np.zeros(4), 0.1) == 0
    assert energy_rank(eig, 1e-2, floor=eig[1] * 1.0001) == 1


def test_greedy_removes_redundant_channels_first():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((300, 4))
    g = np.c_[g, np.zeros(300)]
    f = g.T @ g / 300
    order = greedy_drop_order(f)
    assert order.order[0] == 4 and order.cost[1] == 0.0
    for k in range(6):
        assert order.cost[k] == pytest.approx(drop_cost(f, order.order[:k]))


def test_torch_module_analysis_names_parameters(trained):
    from graphprune.analysis.module import analyze_module

    model, x, y = trained
    planted = _plant(model, 1, 1, 1)
    a = analyze_module(planted, [torch.from_numpy(x[:2])], Calibration((x,), y, "test"), AnalysisOptions(loss="labels", eps=0.0))
    g = _conv1_group(a)
    assert g.anchor == "conv1.weight[0]" and g.channels == 12
    assert (g.singular.elimination, g.singular.overlap, g.singular.linear_dependence) == (1, 1, 1)


def test_network_budget_sets_the_ranks(trained, tmp_path):
    model, x, y = trained
    planted = _plant(model, 2, 0, 0)
    zero = _conv1_group(_analyze(planted, x, y, tmp_path, loss="labels", budget=0.0))
    assert zero.effective == zero.channels - 2  # only the free (dead) channels go at a zero budget
    small, large = (_analyze(planted, x, y, tmp_path, loss="labels", budget=b) for b in (0.01, 0.2))
    assert sum(g.effective for g in large.groups) <= sum(g.effective for g in small.groups)
    for a in (small, large):
        assert sum(g.predicted_loss for g in a.groups) <= a.options.budget + 1e-12
    assert large.limit.macs_reduction >= small.limit.macs_reduction > 1.0
