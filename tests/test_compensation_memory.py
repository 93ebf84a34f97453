"""Compensation within a memory bound: a Flatten -> Gemm consumer too large for a dense Gram is solved per
position or channel-shared (still exact on a planted channel dependence), skipped with the reason, or refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from graphprune.backends.onnx import apply_kept
from graphprune.cli import main
from graphprune.coupling.groups import build_groups
from graphprune.errors import BadInputError
from graphprune.execution.onnx_finetune import with_constants
from graphprune.execution.sessions import make_session
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx, prepare
from graphprune.ir.onnx import model_bytes
from graphprune.ir.plan import GroupPlan, Plan, kept_elements
from graphprune.pipeline.config import parse_pipeline
from graphprune.recovery.compensation import compensate, compensation_memory
from graphprune.recovery.gram_budget import Consumer, format_bytes, plan_memory

SHAPE = (2, 10, 10)


class FlatHead(nn.Module):
    """conv1 (2 -> 6) -> Flatten -> Linear (600 -> 3): the Gemm reads 6 channels x 100 positions (a 600^2 dense Gram)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.fc = nn.Linear(600, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv1(x), 1))


@pytest.fixture()
def planted(tmp_path):
    """Channel 5 of conv1 is 0.7 * channel 1 - 1.3 * channel 3 at every position; the plan drops it."""
    torch.manual_seed(0)
    m = FlatHead().eval()
    with torch.no_grad():
        m.conv1.weight[5] = 0.7 * m.conv1.weight[1] - 1.3 * m.conv1.weight[3]
        m.conv1.bias[5] = 0.7 * m.conv1.bias[1] - 1.3 * m.conv1.bias[3]
    path = tmp_path / "flat.onnx"
    torch.onnx.export(m, (torch.zeros(2, *SHAPE),), str(path), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}})
    om = load_onnx(path)
    coupling = build_groups(om.graph)
    (g,) = [g for g in coupling.groups if g.anchor == "conv1.weight[0]"]
    return path, om, coupling, Plan((GroupPlan(g.id, g.anchor, g.channels, (0, 1, 2, 3, 4)),))


def _run(om, x: np.ndarray) -> np.ndarray:
    return make_session(model_bytes(om.model)).run(None, {"input": x})[0]


@pytest.mark.parametrize("bound,form", [(10**6, "per-position"), (20 * 10**3, "shared")])
def test_oversized_gemm_is_solved_blockwise_within_the_bound_and_stays_exact(planted, bound, form):
    _, om, coupling, plan = planted
    dense = compensation_memory(om.graph, coupling, plan, 10**9)
    assert [c.form for c in dense.consumers] == ["dense"] and dense.gram_bytes > 10**6  # 600^2 doubles: over 1 MB
    memory = compensation_memory(om.graph, coupling, plan, bound)
    assert memory.bound == bound and [c.form for c in memory.consumers] == [form]
    assert memory.peak <= bound
    line = memory.line()
    assert line.startswith(f"compensation: 1 consumers, Gram matrices {format_bytes(memory.gram_bytes)}, "
                           f"{format_bytes(memory.peak)} at most") and f"(bound {format_bytes(bound)})" in line
    x = np.random.default_rng(0).standard_normal((64, *SHAPE)).astype(np.float32)
    comp = compensate(om.graph, coupling, plan, Calibration((x,), None, "cal"), batch_size=16, memory=memory)
    assert comp.edges == 1 and not comp.skipped and comp.memory is memory
    assert 0 < comp.gram_bytes <= memory.gram_bytes <= bound  # what was allocated is what was planned
    kept = kept_elements(plan, coupling, om.graph)
    pruned, plain = prepare(apply_kept(with_constants(om, comp.values), kept)), prepare(apply_kept(om, kept))
    test = np.random.default_rng(1).standard_normal((8, *SHAPE)).astype(np.float32)
    want = _run(om, test)
    np.testing.assert_allclose(_run(pruned, test), want, rtol=1e-4, atol=1e-4)
    assert np.abs(_run(plain, test) - want).max() > 1e-2


def test_a_consumer_that_does_not_fit_beside_the_others_is_skipped_with_the_reason():
    small, large = Consumer("conv2", 0, 8, 1, 4, 4), Consumer("conv3", 1, 300, 1, 150, 150)
    roomy = plan_memory([small, large], 10**8)
    assert [c.form for c in roomy.consumers] == ["dense", "dense"] and not roomy.skipped
    tight = plan_memory([small, large], 10**5)  # the large one needs 0.72 MB of Gram alone
    assert [c.form for c in tight.consumers] == ["dense", "skipped"] and tight.peak <= 10**5
    (reason,) = tight.skipped
    assert reason.startswith("conv3: compensation skipped for memory") and "100.0 kB" in reason
    assert "1 skipped" in tight.line()


def test_an_impossible_bound_is_refused_before_accumulating(planted):
    _, om, coupling, plan = planted
    with pytest.raises(BadInputError, match=r"cannot fit in 1\.0 kB"):
        compensation_memory(om.graph, coupling, plan, 1000)


def test_memory_bytes_is_checked_with_the_pipeline():
    def parse(value: object) -> None:
        passes = [{"name": "plan", "method": "uniform", "criterion": "l1", "ratio": 0.5}, {"name": "compensate", "memory_bytes": value}]
        parse_pipeline({"pipeline": {"name": "p"}, "pass": passes}, "p")

    parse(10**6)
    for bad in ("1G", -1, 1.5):
        with pytest.raises(BadInputError, match="memory_bytes"):
            parse(bad)


def _cli(path, tmp_path, *extra: str) -> int:
    np.savez(tmp_path / "cal.npz", input=np.random.default_rng(0).standard_normal((32, *SHAPE)).astype(np.float32))
    return main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5", "--method", "uniform",
                 "--data", str(tmp_path / "cal.npz"), "--no-profile", "--latency-runs", "0", *extra])


def test_prune_cli_prints_and_records_the_bound(planted, tmp_path, capsys):
    assert _cli(planted[0], tmp_path, "--compensate-memory", "1M") == 0
    out = capsys.readouterr().out
    assert "compensation: 1 consumers, Gram matrices" in out and "(bound 1.0 MB)" in out
    assert "solved per-position" in out
    figures = json.loads((tmp_path / "o.report.json").read_text())["figures"]
    assert figures["compensation_memory_bound"] == 10**6 and 0 < figures["compensation_memory_peak"] <= 10**6
    assert figures["compensated_edges"] == 1


def test_prune_cli_refuses_an_impossible_bound_with_one_line(planted, tmp_path, capsys):
    assert _cli(planted[0], tmp_path, "--compensate-memory", "1k") == 2
    err = capsys.readouterr().err
    assert "compensation cannot fit in 1.0 kB" in err and err.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists()
