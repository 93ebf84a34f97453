"""torch in, torch out: the same groups as ONNX, exact pruned modules of their own class, parity with ONNX."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch_checks import assert_export_matches, step_changes

from graphprune import models
from graphprune.backends.onnx import apply_plan as apply_onnx_plan
from graphprune.backends.torch_module import apply_plan, load_pruned, prune_module, save_pruned, verify_module
from graphprune.coupling.groups import build_groups
from graphprune.errors import BadInputError, ValidationError
from graphprune.execution.sessions import make_session
from graphprune.frontends.onnx import load_onnx
from graphprune.frontends.torch.trace import load_exported_program, load_module
from graphprune.io import save_onnx
from graphprune.ir.plan import translate_plan
from graphprune.planning.uniform import uniform_plan


def _x(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, *models.INPUT_SHAPE)).astype(np.float32))


def _signature(coupling):
    return sorted((g.channels, g.prunable) for g in coupling.groups)


HEADS_DIFFER = ("vit",)
"""Attention models: the ONNX path prunes whole heads (the head count is a constant it rewrites), the torch path the
size of every head (there the head count is a Python int in the forward)."""


@pytest.mark.parametrize("name", [n for n in models.SMALL_MODELS if n not in HEADS_DIFFER])
def test_same_groups_as_onnx(exported, name):
    tm = load_module(models.build(name), [_x(2)])
    onnx_groups = build_groups(load_onnx(exported(name, 17, "keep")).graph)
    assert _signature(build_groups(tm.graph)) == _signature(onnx_groups)


def test_vit_heads_prune_whole_on_both_paths(exported):
    """The reference ViT reshapes into ``self.heads`` heads: the torch path names that attribute and the module
    backend sets it, so whole heads prune there as on the ONNX export (before, the torch path pruned the size of
    every head)."""
    tm = load_module(models.build("vit"), [_x(2)])
    torch_sig = _signature(build_groups(tm.graph))
    onnx_sig = _signature(build_groups(load_onnx(exported("vit", 17, "keep")).graph))
    attn = models.build("vit").blocks[0].att
    assert (attn.heads, True) in torch_sig and (attn.head_dim, True) not in torch_sig
    assert torch_sig == onnx_sig
    coupling = build_groups(tm.graph)
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    assert pruned.blocks[0].att.heads == attn.heads // 2
    assert verify_module(tm, coupling, plan, pruned, [_x(3)]) < 1e-4


class InferredHeads(nn.Module):
    """The head count in the split as Hugging Face gives it (``heads="inferred"``: -1, ``view(*s, -1, head_dim)``,
    merged back with ``reshape(*s, -1)``), as a head-count attribute (``"attribute"``: ``view(*s, self.heads, -1)``)
    or as a number the module holds under no such name (``"number"``)."""

    def __init__(self, dim: int = 32, heads: int = 4, given: str = "inferred"):
        super().__init__()
        self.head_dim, self.given, self.split_into = dim // heads, given, heads
        if given != "number":
            self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, 48), nn.Linear(48, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = self.heads if self.given == "attribute" else self.split_into
        split = (*x.shape[:-1], -1, self.head_dim) if self.given == "inferred" else (*x.shape[:-1], count, -1)
        q, k, v = (p(x).view(split).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o(att.transpose(1, 2).reshape(*x.shape[:-1], -1))
        return x + self.down(torch.relu(self.up(self.norm(x))))


@pytest.mark.parametrize("given", ["inferred", "attribute", "number"])
def test_heads_given_as_minus_one_or_an_attribute_prune_whole_on_the_torch_path(tmp_path, given):
    """-1 heads, or ``self.heads``: whole heads prune, as on the ONNX export (the attribute set with the plan). A
    head count under another name before an attention op: the query and key heads freeze with the reason (pruning
    them would leave the forward reshaping into the old count; it was inexact), the value head size still prunes."""
    torch.manual_seed(0)
    number = given == "number"
    module, x = InferredHeads(given=given).eval(), torch.randn(2, 5, 32)
    tm = load_module(module, [x])
    coupling = build_groups(tm.graph)
    assert sorted(g.channels for g in coupling.prunable) == ([8, 48] if number else [4, 48])
    if number:
        assert any("Python int in the traced forward" in r for g in coupling.groups for r in g.frozen)
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    assert verify_module(tm, coupling, plan, pruned, [x]) < 1e-4
    assert (pruned.q.out_features, pruned.v.out_features) == ((32, 16) if number else (16, 16))
    assert pruned.up.out_features == 24 and type(pruned) is InferredHeads
    assert getattr(pruned, "heads", None) == {"inferred": 4, "attribute": 2, "number": None}[given]
    if not number:  # the ONNX export prunes the same heads
        path = tmp_path / "heads.onnx"
        torch.onnx.export(module, (x,), str(path), input_names=["input"], dynamo=False, opset_version=17)
        assert sorted(g.channels for g in build_groups(load_onnx(path).graph).prunable) == [4, 48]


class MaskedEagerAttention(nn.Module):
    """Hugging Face's eager attention as torch.export traces it (BERT, ViT): a class token expanded to the batch, a
    key mask built by comparison, expanded to (batch, 1, query, key) with the batch read at run time and made an
    additive bias with ``where``, the softmax in float32 cast back with ``.to``."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.head_dim = dim // heads
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, 48), nn.Linear(48, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        n = x.shape[1]
        keep = (torch.arange(n) >= 1)[None, None, None, :]  # the class token attends nowhere as a key
        bias = torch.where(keep.expand(x.shape[0], -1, n, -1), torch.zeros(()), torch.finfo(x.dtype).min)
        q, k, v = (p(x).view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + bias
        att = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
        x = x + self.o(att.transpose(1, 2).reshape(*x.shape[:-1], -1))
        return x + self.down(torch.relu(self.up(self.norm(x))))


def test_eager_attention_with_a_run_time_mask_prunes_whole_heads_on_the_torch_path():
    """expand with run-time sizes, where with a scalar branch, comparisons, unsqueeze and .to are table ops: the
    graph runs in the interpreter (gradient analysis, fine-tuning), whole heads prune exactly from the module and
    from the program. Before, expand had no torch implementation and the .to / comparison ops froze the heads."""
    from graphprune.backends.exported_program import prune_program, verify_program
    from graphprune.execution.interpreter import unsupported_ops

    torch.manual_seed(0)
    module, x = MaskedEagerAttention().eval(), torch.randn(2, 5, 32)
    tm = load_module(module, [x])
    assert unsupported_ops(tm.graph) == []
    assert {n.op_type for n in tm.graph.nodes if n.domain == "aten"} == {"aten.zeros.default"}  # arange is a Range now
    coupling = build_groups(tm.graph)
    assert sorted(g.channels for g in coupling.prunable) == [4, 48]
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    assert verify_module(tm, coupling, plan, pruned, [torch.randn(3, 5, 32)]) < 1e-4
    assert (pruned.q.out_features, pruned.v.out_features, pruned.up.out_features) == (16, 16, 24)
    verify_program(tm, coupling, plan, prune_program(tm, coupling, plan))


@pytest.mark.parametrize("name", models.SMALL_MODELS)
def test_pruned_module_is_exact_trains_and_exports(exported, tmp_path, name):
    module = models.build(name)
    tm = load_module(module, [_x(2)])
    coupling = build_groups(tm.graph)
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    assert type(pruned) is type(module)
    assert verify_module(tm, coupling, plan, pruned, [_x()]) < 1e-4
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in module.parameters())
    # trains: one optimizer step in train mode changes the weights
    assert any(step_changes(pruned, _x(4), lr=0.1))
    # exports to ONNX again, and the export matches the module
    path = tmp_path / "pruned.onnx"
    models.export_onnx(pruned, path, bn="keep")
    session = make_session(str(path))
    with torch.no_grad():
        want = pruned(_x()).numpy()
    np.testing.assert_allclose(session.run(None, {"input": _x().numpy()})[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet20", "densenet", "mobilenetv2", "shufflenetv2"])  # vit: HEADS_DIFFER
def test_same_plan_same_outputs_as_the_onnx_path(exported, tmp_path, name):
    module = models.build(name)
    om = load_onnx(exported(name, 17, "keep"))
    onnx_coupling = build_groups(om.graph)
    onnx_plan = uniform_plan(om.graph, onnx_coupling, 0.4, criterion="random", seed=3)
    tm = load_module(module, [_x(2)])
    torch_coupling = build_groups(tm.graph)
    plan = translate_plan(onnx_plan, onnx_coupling, torch_coupling)
    assert len(plan.groups) == len(onnx_plan.groups)
    pruned = prune_module(tm, torch_coupling, plan)
    path = tmp_path / "onnx_path.onnx"
    save_onnx(apply_onnx_plan(om, onnx_coupling, onnx_plan), path)
    x = _x(5, 1)
    with torch.no_grad():
        want = pruned(x).numpy()
    session = make_session(str(path))
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], want, rtol=1e-4, atol=1e-5)


def test_save_and_rebuild_from_class_and_state_dict(tmp_path):
    module = models.build("resnet20")
    tm = load_module(module, [_x(2)])
    coupling = build_groups(tm.graph)
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(0.01)  # as if fine-tuned
    save_pruned(tmp_path / "small", plan, pruned)
    rebuilt = load_pruned(tmp_path / "small", models.build("resnet20"), [_x(2)])
    with torch.no_grad():
        np.testing.assert_array_equal(rebuilt(_x()).numpy(), pruned(_x()).numpy())
    assert (tmp_path / "small.plan.json").exists() and (tmp_path / "small.pt").exists()
    # the same API straight from a plan, and from the package's top level through a saved plan
    assert sum(p.numel() for p in apply_plan(models.build("resnet20"), plan, [_x(2)]).parameters()) == sum(p.numel() for p in pruned.parameters())
    import graphprune

    graphprune.save_plan(tmp_path / "plan.json", plan)
    again = graphprune.apply_plan(models.build("resnet20"), graphprune.load_plan(tmp_path / "plan.json"), [_x(2)])
    assert [p.shape for p in again.parameters()] == [p.shape for p in pruned.parameters()]


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow
            return y
        return -y


def test_untraceable_model_gives_a_clear_error():
    with pytest.raises(BadInputError) as info:
        load_module(_DataDependent(), [_x(2)])
    msg = str(info.value)
    assert "cannot trace _DataDependent" in msg and "prune the ONNX file instead" in msg


class _WithUnknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)
        self.c = nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.special.i0e(self.b(torch.relu(self.a(x)))))


def test_unknown_functions_freeze_their_channels():
    tm = load_module(_WithUnknown(), [_x(2)])
    coupling = build_groups(tm.graph)
    by_anchor = {g.anchor: g for g in coupling.groups}
    assert by_anchor["a.weight[0]"].prunable
    frozen = by_anchor["b.weight[0]"]
    assert not frozen.prunable and any("i0e" in r for r in frozen.frozen)


def test_saved_exported_program_loads(tmp_path):
    module = models.build("vgg")
    program = torch.export.export(module, (_x(2),))
    path = tmp_path / "vgg.pt2"
    torch.export.save(program, str(path))
    tm = load_exported_program(path)
    assert _signature(build_groups(tm.graph)) == _signature(build_groups(load_module(module, [_x(2)]).graph))
    with pytest.raises(BadInputError):
        load_exported_program(tmp_path / "missing.pt2")


def test_cli_reads_pt2(tmp_path, capsys):
    from graphprune.cli import main

    module = models.build("resnet20")
    path = tmp_path / "resnet20.pt2"
    torch.export.save(torch.export.export(module, (_x(2),)), str(path))
    assert main(["groups", str(path)]) == 0
    assert "13 groups: 12 prunable, 1 frozen" in capsys.readouterr().out
    data = tmp_path / "cal.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((64, *models.INPUT_SHAPE)).astype(np.float32))
    assert main(["analyze", str(path), "--data", str(data), "-o", str(tmp_path / "a.json")]) == 0
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a program")
    assert main(["groups", str(bad)]) == 2


class _InPlace(nn.Module):
    """``relu_`` mutates ``y``, which the residual reads afterwards: the graph must see the mutated value."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) - 0.1
        z = torch.relu_(y)  # y and z are now the same tensor
        return self.head((self.b(z) + y).mean((2, 3)))


def test_in_place_ops_alias_their_input():
    from graphprune.execution.interpreter import GraphInterpreter

    module = _InPlace().eval()
    x = _x(4)
    tm = load_module(module, [x])
    assert any(n.op_type == "Relu" for n in tm.graph.nodes)
    with torch.no_grad():
        got = GraphInterpreter(tm.graph).eval()(x)[0]
        np.testing.assert_allclose(got.numpy(), module(x).numpy(), rtol=1e-5, atol=1e-5)


@torch.library.custom_op("graphprune_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    """A custom op with no fake (meta) kernel: torch.export cannot trace through it."""
    return x * 2.0


class _WithCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.ops.graphprune_test.double(self.a(x)))))


def test_fx_fallback_traces_what_export_refuses():
    from graphprune.backends.torch_module import prune_module, verify_module
    from graphprune.planning.uniform import uniform_plan

    module = _WithCustomOp().eval()
    with pytest.raises(RuntimeError, match="fake"):
        torch.export.export(module, (_x(2),))
    tm = load_module(module, [_x(2)])
    assert tm.program is None  # traced by the torch.fx fallback
    coupling = build_groups(tm.graph)
    by_anchor = {g.anchor: g for g in coupling.groups}
    assert not by_anchor["a.weight[0]"].prunable and any("graphprune_test.double" in r for r in by_anchor["a.weight[0]"].frozen)
    assert by_anchor["b.weight[0]"].prunable
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    assert pruned.b.out_channels == 3 and pruned.c.in_channels == 3
    verify_module(tm, coupling, plan, pruned, [_x(2)])


class _HardCodedCount(nn.Module):
    """A forward that writes its channel count as a literal: the pruned module cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.fc(h.reshape(h.shape[0], 8, -1).mean(-1))


def test_a_pruned_forward_that_fails_to_run_is_a_validation_error():
    module = _HardCodedCount().eval()
    x = _x(2)
    tm = load_module(module, [x])
    coupling = build_groups(tm.graph)
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    with pytest.raises(ValidationError, match=r"fails to run .*hard-code channel counts"):
        verify_module(tm, coupling, plan, pruned, [x])


def _saved_program(tmp_path, name: str):
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(models.build(name), (_x(2),), dynamic_shapes=({0: batch},))
    path = tmp_path / f"{name}.pt2"
    torch.export.save(program, str(path))
    return path


@pytest.mark.parametrize("name", models.SMALL_MODELS)
def test_saved_program_prunes_exactly(tmp_path, name):
    """A .pt2 with no module class: sliced, sizes patched, exported again, exact, dynamic batch kept."""
    from graphprune.backends.exported_program import prune_program, verify_program
    from graphprune.planning.uniform import uniform_plan

    tm = load_exported_program(_saved_program(tmp_path, name))
    coupling = build_groups(tm.graph)
    plan = uniform_plan(tm.graph, coupling, 0.5, "l2")
    pruned = prune_program(tm, coupling, plan)
    verify_program(tm, coupling, plan, pruned)
    before = sum(v.numel() for v in tm.program.state_dict.values())
    assert sum(v.numel() for v in pruned.state_dict.values()) < before
    with torch.no_grad():
        assert pruned.module()(_x(5)).shape == (5, 10)


def test_cli_prunes_pt2_to_pt2_and_onnx(tmp_path, capsys):
    from graphprune.cli import main
    from graphprune.execution.sessions import make_session

    src = _saved_program(tmp_path, "mobilenetv2")
    assert main(["prune", str(src), "-o", str(tmp_path / "small.pt2"), "--ratio", "0.5"]) == 0
    small = torch.export.load(str(tmp_path / "small.pt2"))
    assert main(["prune", str(src), "-o", str(tmp_path / "small.onnx"), "--ratio", "0.5"]) == 0
    assert "exact" in capsys.readouterr().out
    x = _x(3)
    session = make_session(str(tmp_path / "small.onnx"))
    with torch.no_grad():
        want = small.module()(x).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], want, rtol=1e-4, atol=1e-5)
    assert main(["prune", str(src), "-o", str(tmp_path / "x.txt")]) == 2
    assert not (tmp_path / "x.pt2").exists() and not (tmp_path / "x.txt").exists()


def test_cli_prunes_pt2_hierarchically_from_an_analysis(tmp_path, capsys):
    """--data on a .pt2: the effective filter analysis on the program's graph, the hierarchical plan, exact rewrite."""
    from graphprune.cli import main

    src = _saved_program(tmp_path, "vgg")
    name = load_exported_program(src).graph.inputs[0]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", **{name: rng.standard_normal((96, *models.INPUT_SHAPE)).astype(np.float32)})
    data = ["--data", str(tmp_path / "cal.npz"), "--samples", "96"]
    assert main(["prune", str(src), "-o", str(tmp_path / "small.pt2"), *data, "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "estimated maximum" in out and "exact" in out
    small = torch.export.load(str(tmp_path / "small.pt2"))
    assert sum(v.numel() for v in small.state_dict.values()) < sum(v.numel() for v in torch.export.load(str(src)).state_dict.values())
    assert main(["prune", str(src), "-o", str(tmp_path / "tiny.pt2"), *data, "--macs", "0.01"]) == 4
    assert "beyond the estimated maximum" in capsys.readouterr().err and not (tmp_path / "tiny.pt2").exists()
    assert main(["prune", str(src), "-o", str(tmp_path / "u.pt2"), "--method", "uniform", "--criterion", "l2", "--macs", "0.5"]) == 0


class _Layers(nn.Module):
    """Conv1d, GroupNorm, ConvTranspose2d (plain and depthwise) and BatchNorm: the layers the issue lists."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gn, self.c2 = nn.Conv1d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Conv1d(16, 8, 1)
        self.up, self.bn = nn.ConvTranspose2d(8, 12, 2, stride=2), nn.BatchNorm2d(12)
        self.dw = nn.ConvTranspose2d(12, 12, 3, padding=1, groups=12)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(torch.relu(self.gn(self.c1(x))))
        y = y.reshape(y.shape[0], -1, 4, 4)
        return self.head(self.dw(torch.relu(self.bn(self.up(y)))))


def _seq(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, 16)).astype(np.float32))


def test_conv1d_group_norm_and_conv_transpose_prune_in_torch(tmp_path):
    torch.manual_seed(0)
    module = _Layers().eval()
    with torch.no_grad():
        module.bn.running_mean.uniform_(-1, 1)
    tm = load_module(module, [_seq(2)])
    coupling = build_groups(tm.graph)
    by_anchor = {g.anchor: g for g in coupling.groups}
    assert by_anchor["c1.weight[0]"].channels == 4  # GroupNorm: whole groups of 4 channels
    assert by_anchor["c1.weight[0]"].prunable and by_anchor["up.weight[1]"].prunable
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    assert (pruned.gn.num_groups, pruned.gn.num_channels, pruned.c1.out_channels) == (2, 8, 8)
    assert (pruned.up.in_channels, pruned.up.out_channels, pruned.dw.groups, pruned.bn.num_features) == (4, 6, 6, 6)
    assert verify_module(tm, coupling, plan, pruned, [_seq()]) < 1e-5
    assert any(step_changes(pruned, _seq(4), lr=0.01, loss=torch.mean))
    assert_export_matches(pruned, _seq(2), _seq(5), tmp_path / "layers.onnx")


def test_conv1d_group_norm_and_conv_transpose_prune_as_pt2_and_onnx(tmp_path):
    from graphprune.backends.exported_program import prune_program, verify_program
    from graphprune.execution.sessions import sample_inputs
    from graphprune.execution.validate import validate_pruned
    from graphprune.io import save_onnx
    from graphprune.ir.plan import kept_elements

    module = _Layers().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(module, (_seq(2),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "layers.pt2"))
    tm = load_exported_program(tmp_path / "layers.pt2")
    coupling = build_groups(tm.graph)
    plan = uniform_plan(tm.graph, coupling, 0.5)
    verify_program(tm, coupling, plan, prune_program(tm, coupling, plan))
    # the dynamo exporter writes GroupNormalization (opset 21: per-channel scale): the ONNX path prunes whole groups
    path = tmp_path / "layers.onnx"
    torch.onnx.export(module, (_seq(2),), str(path), dynamo=True, opset_version=21, input_names=["input"],
                      dynamic_shapes=({0: batch},), verbose=False)
    om = load_onnx(path)
    assert any(n.op_type == "GroupNormalization" for n in om.graph.nodes)
    coupling = build_groups(om.graph)
    plan = uniform_plan(om.graph, coupling, 0.5)
    save_onnx(apply_onnx_plan(om, coupling, plan), tmp_path / "small.onnx")
    report = validate_pruned(om, tmp_path / "small.onnx", sample_inputs(om.graph), kept_elements(plan, coupling, om.graph))
    assert report.exact
    small = load_onnx(tmp_path / "small.onnx")
    assert next(n for n in small.graph.nodes if n.op_type == "GroupNormalization").attrs["num_groups"] == 2


class _DeadView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        _ = h.view(h.shape[0], 16, 28, 28).sum()  # dead, and it hard-codes the channel count
        return self.b(h)


def test_dead_ops_neither_freeze_channels_nor_break_a_pruned_program(tmp_path):
    from graphprune.backends.exported_program import prune_program, verify_program

    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(_DeadView().eval(), (_x(2),), dynamic_shapes=({0: batch},))
    assert any("view" in str(n.target) for n in program.graph.nodes)  # torch.export keeps the dead view
    torch.export.save(program, str(tmp_path / "dead.pt2"))
    tm = load_exported_program(tmp_path / "dead.pt2")
    coupling = build_groups(tm.graph)
    assert {g.anchor: g for g in coupling.groups}["a.weight[0]"].prunable
    plan = uniform_plan(tm.graph, coupling, 0.5)
    verify_program(tm, coupling, plan, prune_program(tm, coupling, plan))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_token_embeddings_and_silu_are_in_the_op_table_and_feed_forward_groups_are_found(name):
    """aten.embedding is a table lookup (its columns follow the output's last axis, frozen here by the norms) and
    aten.silu an element-wise op: the Llama-style SwiGLU and GPT-2-style feed-forward channels are groups."""
    from graphprune import models
    from graphprune.coupling.groups import build_groups
    from graphprune.frontends.torch.trace import load_module

    torch.manual_seed(0)
    tm = load_module(models.build(name).eval(), [torch.randint(0, 64, (2, 8))])
    coupling = build_groups(tm.graph)
    reasons = [r for g in coupling.groups for r in g.frozen]
    assert not any("aten.embedding" in r or "aten.silu" in r for r in reasons)
    assert len([g for g in coupling.prunable if g.channels == 64]) == 2


def test_llama_style_key_value_groups_prune_whole_on_the_torch_path():
    """Rotary slices (aten.slice), its cos / sin tables and repeat_kv's expand are table ops: each layer's key/value
    groups prune whole, with their query heads, exactly from the module and from the program (they froze before:
    "merged or split axis with no prunable factor (unsupported op aten.slice.Tensor...)")."""
    from graphprune import models
    from graphprune.backends.exported_program import prune_program, verify_program
    from graphprune.coupling.groups import build_groups
    from graphprune.frontends.torch.trace import load_module
    from graphprune.planning.uniform import uniform_plan

    torch.manual_seed(0)
    module = models.build("llama").eval()
    tm = load_module(module, [torch.randint(0, 64, (2, 8))])
    coupling = build_groups(tm.graph)
    assert sorted(g.channels for g in coupling.prunable) == [2, 2, 64, 64]  # kv groups, SwiGLU, per layer
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    assert verify_module(tm, coupling, plan, pruned, [torch.randint(0, 64, (3, 8))]) < 1e-5
    layer = pruned.layers[0]
    assert (layer.q_proj.out_features, layer.k_proj.out_features, layer.v_proj.out_features) == (16, 8, 8)
    verify_program(tm, coupling, plan, prune_program(tm, coupling, plan))


class _Conv1D(nn.Module):
    """Hugging Face GPT-2's ``Conv1D`` as it is written: ``addmm`` on an ``[in, out]`` weight, sizes from ``nf``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class _Conv1DBlock(nn.Module):
    """GPT-2's block as Hugging Face writes it: fused QKV split by ``self.split_size``, heads by ``view(..., -1, d)``,
    position ids from ``arange(...) + offset``."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.head_dim, self.split_size = dim // heads, dim
        self.wpe = nn.Embedding(16, dim)
        self.c_attn, self.c_proj = _Conv1D(3 * dim, dim), _Conv1D(dim, dim)
        self.c_fc, self.mlp_proj = _Conv1D(4 * dim, dim), _Conv1D(dim, 4 * dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.wpe(torch.arange(x.shape[1]) + 1)
        q, k, v = self.c_attn(self.ln1(x)).split(self.split_size, dim=2)
        o = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), is_causal=True)
        x = x + self.c_proj(o.transpose(1, 2).reshape(*x.shape[:-1], -1))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln2(x)), approximate="tanh"))


def test_hugging_face_style_conv1d_attention_prunes_whole_heads_on_the_torch_path():
    """``aten.addmm`` is a table op, the call's ``split_size`` and each Conv1D's ``nf`` follow the plan (module
    attributes of the module that made the call), and an integer ``arange + 1`` stays an integer."""
    from graphprune.backends.exported_program import prune_program, verify_program

    torch.manual_seed(0)
    module = _Conv1DBlock().eval()
    x = torch.randn(2, 5, 32)
    tm = load_module(module, [x])
    coupling = build_groups(tm.graph)
    assert sorted(g.channels for g in coupling.prunable) == [4, 128]  # heads, feed-forward
    plan = uniform_plan(tm.graph, coupling, 0.5)
    pruned = prune_module(tm, coupling, plan)
    assert (pruned.split_size, pruned.c_attn.nf, tuple(pruned.c_attn.weight.shape)) == (16, 48, (32, 48))
    assert verify_module(tm, coupling, plan, pruned, [torch.randn(3, 5, 32)]) < 1e-5
    verify_program(tm, coupling, plan, prune_program(tm, coupling, plan))


def test_gpt2_style_feed_forward_prunes_exactly_on_the_torch_path():
    import dataclasses

    from graphprune import models
    from graphprune.backends.torch_module import prune_module, verify_module
    from graphprune.coupling.groups import build_groups
    from graphprune.frontends.torch.trace import load_module
    from graphprune.planning.uniform import uniform_plan

    torch.manual_seed(0)
    module = models.build("gpt2").eval()
    tm = load_module(module, [torch.randint(0, 64, (2, 8))])
    coupling = build_groups(tm.graph)
    ffn = {g.id for g in coupling.prunable if g.channels == 64}
    plan = uniform_plan(tm.graph, coupling, 0.5)
    plan = dataclasses.replace(plan, groups=tuple(g for g in plan.groups if g.group in ffn))
    pruned = prune_module(tm, coupling, plan)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in module.parameters())
    assert verify_module(tm, coupling, plan, pruned, [torch.randint(0, 64, (3, 8))]) < 1e-5


class _MobileAndYoloOps(nn.Module):
    """MobileNetV3's hardswish / hardsigmoid squeeze-excite, YOLO's leaky ReLU, padding and nearest upsampling,
    Mish / ELU / Softplus / clamp, a bilinear upsample and a log-softmax head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(32, 8, 1)
        self.se1, self.se2, self.fc = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(self.c1(x))
        y = y * F.hardsigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        z = F.leaky_relu(self.c2(F.pad(y, (1, 1, 1, 1))), 0.1)[:, :, 1:-1, 1:-1]
        z = F.mish(z) + F.elu(z) + F.softplus(z).clamp(0.0, 6.0) + z.clamp(min=-1.0)
        u = F.interpolate(F.max_pool2d(z, 2), scale_factor=2, mode="nearest")
        v = F.interpolate(F.avg_pool2d(y, 2), scale_factor=2, mode="bilinear", align_corners=False)
        return F.log_softmax(self.fc(self.c3(torch.cat([u, v], 1)).mean((2, 3))), -1)


def test_common_activation_padding_and_upsampling_calls_convert_and_prune_exactly() -> None:
    """None of these calls is left an aten op (which would freeze its channels): the interpreter reproduces the module,
    every conv's channels prune, exactly from the module and from the program."""
    from graphprune.backends.exported_program import prune_program, verify_program
    from graphprune.execution.interpreter import GraphInterpreter

    torch.manual_seed(0)
    module, x = _MobileAndYoloOps().eval(), torch.randn(2, 3, 16, 16)
    tm = load_module(module, [x])
    ops = {n.op_type for n in tm.graph.nodes}
    assert not [o for o in ops if o.startswith("aten.")]
    assert {"HardSwish", "HardSigmoid", "LeakyRelu", "Pad", "Resize", "Mish", "Elu", "Softplus", "Clip", "LogSoftmax"} <= ops
    with torch.no_grad():
        torch.testing.assert_close(GraphInterpreter(tm.graph).eval()(x)[0], module(x))
    coupling = build_groups(tm.graph)
    assert sorted(g.channels for g in coupling.prunable) == [4, 8, 16, 16]
    plan = uniform_plan(tm.graph, coupling, 0.5)
    assert verify_module(tm, coupling, plan, prune_module(tm, coupling, plan), [x]) < 1e-5
    assert verify_program(tm, coupling, plan, prune_program(tm, coupling, plan)) < 1e-5


class _TimmAttention(nn.Module):
    """timm's ViT attention: one qkv Linear reshaped to (B, N, 3, heads, head_dim), permuted, ``unbind(0)``."""

    def __init__(self, dim: int = 32, num_heads: int = 4, merge_from_input: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.merge_from_input = num_heads, dim // num_heads, merge_from_input
        self.scale = self.head_dim ** -0.5  # fixed at init, as timm does (a forward recomputing it is caught)
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, c if self.merge_from_input else -1))


class _TimmBlock(nn.Module):
    def __init__(self, merge_from_input: bool) -> None:
        super().__init__()
        self.norm, self.attn, self.head = nn.LayerNorm(32), _TimmAttention(merge_from_input=merge_from_input), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return self.head(torch.stack([x.mean(1), x.amax(1)], 1).sum(1))


@pytest.mark.parametrize("merge_from_input", [False, True])
def test_timm_style_attention_with_unbind_prunes_its_head_size(merge_from_input: bool) -> None:
    """``unbind``, ``stack`` and ``amax`` convert; the head size prunes (heads inside (3, heads, size) stay), exactly
    in the program (the traced literals are patched). The module's forward reshapes with its ``head_dim`` (and timm
    merges with ``c`` read from the input), which the module backend does not rewrite: the pruned module is refused
    with the reason, never returned wrong."""
    from graphprune.backends.exported_program import prune_program, verify_program

    torch.manual_seed(0)
    module, x = _TimmBlock(merge_from_input).eval(), torch.randn(2, 5, 32)
    tm = load_module(module, [x])
    assert not [n.op_type for n in tm.graph.nodes if n.op_type.startswith("aten.")]
    coupling = build_groups(tm.graph)
    assert [g.channels for g in coupling.prunable] == [8]
    plan = uniform_plan(tm.graph, coupling, 0.5)
    assert verify_program(tm, coupling, plan, prune_program(tm, coupling, plan)) < 1e-5
    with pytest.raises(ValidationError, match="hard-code channel counts"):
        verify_module(tm, coupling, plan, prune_module(tm, coupling, plan), [x])
