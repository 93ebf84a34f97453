"""Channel gates: zero gates are the pruned model; per-sample gradients are exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from graphprune import models
from graphprune.analysis.gates import gate_taps, keep_gates, plan_gates
from graphprune.backends.onnx import apply_kept
from graphprune.coupling.groups import build_groups
from graphprune.execution.interpreter import GraphInterpreter
from graphprune.execution.sessions import make_session
from graphprune.frontends.onnx import load_onnx
from graphprune.io import save_onnx
from graphprune.ir.plan import GroupPlan, Plan, kept_elements


@pytest.mark.parametrize("name", models.SMALL_MODELS)
def test_zero_gates_equal_the_pruned_model(exported, tmp_path, name):
    """Gate every group's dropped channels to 0 on its exit edges: outputs equal the rewritten model's."""
    om = load_onnx(exported(name, 17, "keep"))
    coupling = build_groups(om.graph)
    gates_plan = plan_gates(coupling, om.graph)
    rng = np.random.default_rng(1)
    groups, keeps = [], {}
    x = rng.standard_normal((3, *models.INPUT_SHAPE)).astype(np.float32)
    for gid in gates_plan.edges:
        g = coupling.by_id(gid)
        keep = np.sort(rng.permutation(g.channels)[: max(1, g.channels // 2)])
        groups.append(GroupPlan(gid, g.anchor, g.channels, tuple(int(i) for i in keep)))
        keeps[gid] = keep
    gates = keep_gates(keeps, {gid: coupling.by_id(gid).channels for gid in keeps}, len(x))
    assert gates, "every reference model has gateable groups"
    kept = kept_elements(Plan(tuple(groups)), coupling, om.graph)
    path = tmp_path / "pruned.onnx"
    save_onnx(apply_kept(om, kept), path)
    session = make_session(str(path))
    want = session.run(None, {session.get_inputs()[0].name: x})[0]
    interp = GraphInterpreter(om.graph).eval()
    with torch.no_grad():
        got = interp(torch.from_numpy(x), edge_taps=gate_taps(gates_plan, gates))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_per_sample_gate_gradients_equal_one_sample_at_a_time(exported):
    om = load_onnx(exported("seresnet", 17, "keep"))
    coupling = build_groups(om.graph)
    plan = plan_gates(coupling, om.graph)
    interp = GraphInterpreter(om.graph).eval()
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((4, *models.INPUT_SHAPE)).astype(np.float32))
    sizes = {g: e[0].index.shape[0] for g, e in plan.edges.items()}

    def grads(batch: torch.Tensor) -> list[torch.Tensor]:
        gates = {g: torch.ones(len(batch), c, requires_grad=True) for g, c in sizes.items()}
        out = interp(batch, edge_taps=gate_taps(plan, gates))[0]
        return list(torch.autograd.grad((out**2).sum(), list(gates.values())))

    together = grads(x)
    for i in range(len(x)):
        alone = grads(x[i:i + 1])
        for a, b in zip(alone, together):
            np.testing.assert_allclose(a[0].numpy(), b[i].numpy(), rtol=1e-4, atol=1e-7)
