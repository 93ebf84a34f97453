"""nn.MultiheadAttention heads: the stand-in computes the same thing, heads prune exactly, in torch and ONNX."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_checks import assert_export_matches, step_changes

from graphprune.backends.torch_module import apply_plan, load_pruned, prune_module, save_pruned, verify_module
from graphprune.coupling.groups import build_groups
from graphprune.frontends.torch.attention import HeadPrunableAttention, swap_attention
from graphprune.frontends.torch.trace import load_module
from graphprune.planning.uniform import uniform_plan

HEADS, DIM = 4, 16


def _cases() -> list[dict]:
    n, length, source = 3, 5, 7
    kpm = torch.rand(n, source, generator=torch.Generator().manual_seed(0)) > 0.7
    kpm[:, 0] = False
    mask3 = torch.rand(n * HEADS, length, source, generator=torch.Generator().manual_seed(1)) > 0.8
    mask3[..., 0] = False
    return [{}, {"need_weights": False}, {"key_padding_mask": kpm}, {"attn_mask": torch.randn(length, source)},
            {"attn_mask": mask3, "average_attn_weights": False},
            {"attn_mask": torch.randn(length, source), "key_padding_mask": kpm.float() * -3, "need_weights": False}]


@pytest.mark.parametrize("batch_first,kdim,bias", list(itertools.product([True, False], [None, 12], [True, False])))
def test_stand_in_computes_what_multihead_attention_does(batch_first, kdim, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias).eval()
    stand_in = HeadPrunableAttention.from_module(mha)
    n, length, source, kd = 3, 5, 7, kdim or DIM
    q = torch.randn(n, length, DIM) if batch_first else torch.randn(length, n, DIM)
    k = torch.randn(n, source, kd) if batch_first else torch.randn(source, n, kd)
    v = torch.randn_like(k)
    calls = [((q, k, v), kw) for kw in _cases()]
    calls.append(((q[0], k[0], v[0]) if batch_first else (q[:, 0], k[:, 0], v[:, 0]), {}))  # unbatched
    for args, kw in calls:
        want, want_w = mha(*args, **kw)
        got, got_w = stand_in(*args, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (want_w is None) == (got_w is None)
        if want_w is not None:
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="is_causal"):
        stand_in(q, k, v, is_causal=True)


class _Encoder(nn.Module):
    """Self-attention (batch first) then cross-attention (sequence first, other key size) on a memory."""

    def __init__(self, use_weights: bool = False) -> None:
        super().__init__()
        self.inp, self.mem = nn.Linear(8, DIM), nn.Linear(8, 12)
        self.self_att = nn.MultiheadAttention(DIM, HEADS, batch_first=True, dropout=0.1)
        self.cross = nn.MultiheadAttention(DIM, 2, kdim=12, vdim=12)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 3)
        self.use_weights = use_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, mem = self.inp(x), self.mem(x)
        y, w = self.self_att(h, h, h, need_weights=self.use_weights)
        h = self.norm(h + y)
        z, _ = self.cross(h.transpose(0, 1), mem.transpose(0, 1), mem.transpose(0, 1))
        out = self.head(h + z.transpose(0, 1)).mean(1)
        return out + w.sum((1, 2)).unsqueeze(1) if self.use_weights else out


def _x(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 6, 8)).astype(np.float32))


def _group_of_row(coupling, tensor: str, row: int = 0):
    """The group (frozen or not) holding ``row`` of a weight's output axis."""
    for g in coupling.groups:
        for m in g.members:
            if m.tensor == tensor and m.axis == 0 and row in m.indices:
                return g
    raise AssertionError(f"no group holds {tensor}[{row}]")


def _head_groups(coupling) -> dict[str, object]:
    return {"self_att": _group_of_row(coupling, "self_att.in_proj_weight"),
            "cross": _group_of_row(coupling, "cross.q_proj_weight")}


def test_heads_are_groups_of_their_own_and_the_model_is_left_as_it_was():
    module = _Encoder()
    tm = load_module(module, [_x(2)])
    assert type(module.self_att) is nn.MultiheadAttention  # swapped only while tracing
    heads = _head_groups(build_groups(tm.graph))
    assert heads["self_att"].channels == HEADS and heads["self_att"].prunable
    assert heads["cross"].channels == 2 and heads["cross"].prunable
    rows = {m.tensor: m.indices.shape[1] for m in heads["self_att"].members if m.kind == "param"}
    assert rows["self_att.in_proj_weight"] == 3 * DIM // HEADS  # q, k and v rows of one head
    assert rows["self_att.out_proj.weight"] == DIM // HEADS


def test_pruned_heads_are_exact_and_the_module_trains_exports_and_reloads(tmp_path):
    module = _Encoder()
    tm = load_module(module, [_x(2)])
    coupling = build_groups(tm.graph)
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    assert isinstance(pruned.self_att, nn.MultiheadAttention)
    assert (pruned.self_att.num_heads, pruned.cross.num_heads) == (HEADS // 2, 1)
    assert pruned.self_att.in_proj_weight.shape == (3 * DIM // 2, DIM)
    assert pruned.cross.q_proj_weight.shape == (DIM // 2, DIM) and pruned.cross.k_proj_weight.shape[0] == DIM // 2
    assert pruned.cross.kdim == pruned.cross.k_proj_weight.shape[1] == pruned.mem.out_features  # the memory is pruned too
    assert verify_module(tm, coupling, plan, pruned, [_x()]) < 1e-5
    assert all(step_changes(pruned, _x(4), lr=0.1))  # train mode: dropout on the attention weights
    assert_export_matches(pruned, _x(2), _x(5), tmp_path / "pruned.onnx")
    save_pruned(tmp_path / "small", plan, pruned)
    rebuilt = load_pruned(tmp_path / "small", _Encoder(), [_x(2)])
    with torch.no_grad():
        np.testing.assert_array_equal(rebuilt.eval()(_x()).numpy(), pruned(_x()).numpy())
    assert sum(p.numel() for p in apply_plan(_Encoder(), plan, [_x(2)]).parameters()) == sum(p.numel() for p in pruned.parameters())


def test_transformer_encoder_layers_prune_their_heads():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(DIM, HEADS, dim_feedforward=32, batch_first=True)
    module = nn.Sequential(nn.Linear(8, DIM), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(DIM, 3))
    tm = load_module(module, [_x(2)])
    coupling = build_groups(tm.graph)
    heads = [g for g in coupling.groups if any(m.tensor.endswith("in_proj_weight") and m.axis == 0 for m in g.members)]
    assert len(heads) == 2 and all(g.prunable and g.channels == HEADS for g in heads)
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    assert [blk.self_attn.num_heads for blk in pruned[1].layers] == [HEADS // 2] * 2
    assert verify_module(tm, coupling, plan, pruned, [_x()]) < 1e-4  # the native fused path is off


def test_attention_weights_in_use_freeze_the_heads_and_value_channels_go_instead():
    """Averaged attention weights change when heads go: a model that reads them keeps its heads, and the
    value head size (the same positions in every head) is what is pruned."""
    module = _Encoder(use_weights=True)
    tm = load_module(module, [_x(2)])
    coupling = build_groups(tm.graph)
    heads = _head_groups(coupling)
    assert not heads["self_att"].prunable and any("no prunable factor" in r for r in heads["self_att"].frozen)
    assert heads["cross"].prunable
    values = _group_of_row(coupling, "self_att.in_proj_weight", 2 * DIM)
    assert values.prunable and values.channels == DIM // HEADS
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    assert (pruned.self_att.num_heads, pruned.self_att.head_dim, pruned.self_att.v_head_dim) == (HEADS, 4, 2)
    assert verify_module(tm, coupling, plan, pruned, [_x()]) < 1e-5


class _GroupedQuery(nn.Module):
    def __init__(self, kv_heads: int, scale: float | None = None) -> None:
        super().__init__()
        self.q, self.kv = nn.Linear(8, 16), nn.Linear(8, 4 * kv_heads)
        self.out = nn.Linear(16, 3)
        self.kv_heads, self.scale = kv_heads, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q = self.q(x).reshape(n, length, 4, -1).transpose(1, 2)
        k = self.kv(x).reshape(n, length, self.kv_heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, k, scale=self.scale, enable_gqa=self.kv_heads != 4)
        return self.out(y.transpose(1, 2).reshape(n, length, -1))


def test_grouped_query_heads_freeze_and_an_explicit_scale_frees_the_head_size():
    gqa = build_groups(load_module(_GroupedQuery(2), [_x(2)]).graph)
    q_rows = next(g for g in gqa.groups if any(m.tensor == "q.weight" and m.axis == 0 for m in g.members))
    assert not q_rows.prunable and any("grouped-query" in r for r in q_rows.frozen)
    tm = load_module(_GroupedQuery(4, scale=0.5), [_x(2)])
    coupling = build_groups(tm.graph)
    q_rows = next(g for g in coupling.groups if any(m.tensor == "q.weight" and m.axis == 0 for m in g.members))
    assert q_rows.prunable
    plan = uniform_plan(tm.graph, coupling, 0.5)
    verify_module(tm, coupling, plan, prune_module(tm, coupling, plan), [_x()])


def test_onnx_attention_op_prunes_heads_exactly(tmp_path):
    """The dynamo exporter at opset 23 writes one Attention op per layer: the ONNX path prunes its heads."""
    from graphprune.backends.onnx import apply_plan as apply_onnx_plan
    from graphprune.execution.sessions import sample_inputs
    from graphprune.execution.validate import validate_pruned
    from graphprune.frontends.onnx import load_onnx
    from graphprune.io import save_onnx
    from graphprune.ir.plan import kept_elements

    module = _Encoder().eval()
    swap_attention(module)
    path = tmp_path / "enc.onnx"
    torch.onnx.export(module, (_x(2),), str(path), dynamo=True, opset_version=23, input_names=["input"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), verbose=False)
    om = load_onnx(path)
    assert sum(n.op_type == "Attention" for n in om.graph.nodes) == 2
    coupling = build_groups(om.graph)
    # Both layers' output reshapes share one shape constant, so their heads pair up (2 self + 1 cross).
    heads = _group_of_row(coupling, "self_att.in_proj_weight")
    assert heads.prunable and heads.channels == 2
    plan = uniform_plan(om.graph, coupling, 0.5)
    small = apply_onnx_plan(om, coupling, plan)
    assert small.graph.initializers["self_att.in_proj_weight"].const_value.shape[0] == 3 * DIM // 2
    save_onnx(small, tmp_path / "small.onnx")
    report = validate_pruned(om, tmp_path / "small.onnx", sample_inputs(om.graph), kept_elements(plan, coupling, om.graph))
    assert report.exact


@torch.library.custom_op("graphprune_test::halve", mutates_args=())
def _halve(x: torch.Tensor) -> torch.Tensor:
    """No fake kernel: torch.export refuses the module and the torch.fx fallback traces it."""
    return x * 0.5


class _EncoderWithCustomOp(_Encoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.ops.graphprune_test.halve(x))


def test_heads_prune_through_the_fx_fallback():
    tm = load_module(_EncoderWithCustomOp(), [_x(2)])
    assert tm.program is None
    coupling = build_groups(tm.graph)
    assert _head_groups(coupling)["self_att"].prunable
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    assert pruned.self_att.num_heads == HEADS // 2
    assert verify_module(tm, coupling, plan, pruned, [_x()]) < 1e-5


def test_stand_in_exported_by_torchscript_prunes_heads_on_the_onnx_path(tmp_path, capsys):
    """swap_attention before torch.onnx.export: per-head reshapes the ONNX path can prune (exact)."""
    from graphprune.cli import main
    from graphprune.frontends.onnx import load_onnx

    module = _Encoder().eval()
    swap_attention(module)
    src = tmp_path / "enc.onnx"
    torch.onnx.export(module, (_x(2),), str(src), dynamo=False, opset_version=17, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})
    heads = _group_of_row(build_groups(load_onnx(src).graph), "self_att.in_proj_weight")
    assert heads.prunable and heads.channels == HEADS
    assert main(["prune", str(src), "-o", str(tmp_path / "small.onnx"), "--ratio", "0.5", "--verify"]) == 0
    assert "exact" in capsys.readouterr().out
