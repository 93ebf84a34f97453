"""The hidden pass: stream walk, full-width rotation equals the model, sliced error bounded, freezes, CLI bad input."""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from graphprune.backends.onnx_rotation import rotate_onnx, slice_hidden, stream_moments, unshared, with_sums
from graphprune.cli import main
from graphprune.coupling.stream import find_stream
from graphprune.errors import BadInputError
from graphprune.execution.exactness import compare_outputs
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import OnnxModel, load_onnx
from graphprune.ir.onnx import model_bytes, model_session
from graphprune.models.transformer import ViT
from graphprune.pipeline.config import parse_pipeline, with_hidden
from graphprune.recovery.rotation import HiddenOptions, energy_rank, global_moment, kept_width, pca


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Norm scales and shifts away from 1 / 0, so folding them is tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model.eval()


def _export(model: nn.Module, path: Path, shape: tuple[int, ...], opset: int = 17, dynamo: bool = False) -> OnnxModel:
    x = torch.randn(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), str(path), opset_version=opset, input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), dynamo=True, verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), opset_version=opset, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return load_onnx(path)


def _data(shape: tuple[int, ...], n: int = 96, seed: int = 0) -> Calibration:
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    return Calibration((x,), None, "random")


def _run(om: OnnxModel, data: Calibration) -> np.ndarray:
    with model_session(om.model) as session:
        return session.run(None, {session.get_inputs()[0].name: data.inputs[0]})[0]


class RMSBlock(nn.Module):
    """Llama-style block: RMSNorm, attention, RMSNorm, SwiGLU (no biases)."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.o = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.gate, self.up, self.down = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        h = self.n2(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


class RMSNet(nn.Module):
    def __init__(self, features: int = 6, dim: int = 16, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.blocks = nn.Sequential(*(RMSBlock(dim, 2, 24) for _ in range(depth)))
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))))


class PostLN(nn.Module):
    """BERT-style: an embedding norm, then the norm sits on the residual stream after each Add."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed, self.f, self.n0, self.n = nn.Linear(6, dim), nn.Linear(dim, dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n0(self.embed(x))
        h = self.n(h + self.f(h))
        return self.head(h.mean(1))


class NoBiasReader(nn.Module):
    """A LayerNorm shift with a bias-free reader: the rewrite must add the shift's bias."""

    def __init__(self, dim: int = 12):
        super().__init__()
        self.embed, self.n, self.f = nn.Linear(5, dim), nn.LayerNorm(dim), nn.Linear(dim, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self.n(self.embed(x)))


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    torch.manual_seed(0)
    return _export(_randomise_norms(ViT(dim=16, depth=2, heads=2, mlp=32)), tmp_path_factory.mktemp("vit") / "vit.onnx", (1, 28, 28))


def _full_basis(om: OnnxModel, data: Calibration) -> np.ndarray:
    stream = find_stream(om.graph)
    moments = stream_moments(om, [n.input for n in stream.norms], data, 32, stream.centred)
    return pca(global_moment(stream, moments))[1]


def test_vit_stream_is_found(vit: OnnxModel) -> None:
    stream = find_stream(vit.graph)
    assert stream.frozen == ""
    assert stream.width == 16 and len(stream.norms) == 5 and stream.centred
    # q, k, v and fc1 of each block plus the head read the stream; proj, fc2 (weights and biases), embed and pos write it
    assert len(stream.readers) == 2 * 4 + 1
    assert {"pos", "embed.weight", "embed.bias"} <= {s.tensor for s in stream.writers}


def test_full_rotation_equals_the_model(vit: OnnxModel) -> None:
    data = _data((1, 28, 28))
    basis = _full_basis(vit, data)
    assert not np.allclose(np.abs(basis), np.eye(16), atol=1e-3)  # a real rotation, not the identity
    rotated = rotate_onnx(vit, find_stream(vit.graph), basis)
    assert "LayerNormalization" not in {n.op_type for n in rotated.model.graph}
    expected, got = _run(vit, data), _run(rotated, data)
    assert compare_outputs([expected], [got], rtol=1e-4, atol=1e-5) < 1e-4


def test_layernorm_stream_is_centred(vit: OnnxModel) -> None:
    """With LayerNorms the stream is measured centred: the all-ones direction holds no energy and comes last."""
    data = _data((1, 28, 28))
    stream = find_stream(vit.graph)
    vals, vecs = pca(global_moment(stream, stream_moments(vit, [n.input for n in stream.norms], data, 32, stream.centred)))
    assert vals[-1] < 1e-9 * vals[0]
    assert abs(vecs[:, -1] @ np.full(16, 0.25)) == pytest.approx(1.0, abs=1e-6)


def test_wrong_basis_is_caught(vit: OnnxModel) -> None:
    """The equality check can fail: a basis that is not orthogonal changes the outputs."""
    data = _data((1, 28, 28))
    basis = _full_basis(vit, data) * 1.5
    rotated = rotate_onnx(vit, find_stream(vit.graph), basis)
    assert np.max(np.abs(_run(vit, data) - _run(rotated, data))) > 1e-2


def test_sliced_error_shrinks_with_kept_width(vit: OnnxModel) -> None:
    data = _data((1, 28, 28))
    reports = {}
    for keep in (0.25, 0.75, 1.0):
        sliced, rep = slice_hidden(vit, data, None, HiddenOptions(keep=keep, samples=64, eval_samples=64))
        reports[keep] = rep
        width = round(16 * keep)
        assert rep.kept == width and rep.full_rotation_error is not None and rep.full_rotation_error < 1e-4
        weights = {v.name: v.const_value.numpy().shape for v in sliced.model.graph.initializers.values() if v.const_value is not None}
        assert weights["pos"] == (1, 16, width)
        assert _run(sliced, data).shape == (96, 10)
    assert reports[1.0].max_abs_error < 1e-4 and reports[1.0].discarded_energy == pytest.approx(0.0, abs=1e-12)
    assert reports[0.25].discarded_energy > reports[0.75].discarded_energy > 0.0
    assert reports[0.25].relative_error > reports[0.75].relative_error > reports[1.0].relative_error
    assert all(p.kept_energy <= 1.0 + 1e-9 for p in reports[0.75].points) and len(reports[0.75].points) == 5


def test_dynamo_export_rotates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    om = _export(_randomise_norms(ViT(dim=16, depth=1, heads=2, mlp=32)), tmp_path / "vit.onnx", (1, 28, 28), opset=18, dynamo=True)
    # the dynamo exporter writes the patch Reshape's target [-1, 16, 16] as a constant: its width entry is updated
    assert [s.axis for s in find_stream(om.graph).reshapes] == [1]
    data = _data((1, 28, 28), n=32)
    _, rep = slice_hidden(om, data, None, HiddenOptions(keep=0.5, samples=32, eval_samples=32))
    assert rep.frozen == "" and rep.kept == 8 and rep.full_rotation_error < 1e-4


def test_rmsnorm_swiglu_block(tmp_path: Path) -> None:
    torch.manual_seed(0)
    om = _export(_randomise_norms(RMSNet()), tmp_path / "rms.onnx", (7, 6), opset=23, dynamo=True)
    assert "RMSNormalization" in {n.op_type for n in om.model.graph}
    stream = find_stream(om.graph)
    assert stream.frozen == "" and not stream.centred and len(stream.norms) == 5
    data = _data((7, 6))
    sliced, rep = slice_hidden(om, data, None, HiddenOptions(keep=0.75, samples=64, eval_samples=64))
    assert rep.full_rotation_error < 1e-4 and rep.kept == 12
    assert rep.relative_error is not None and 0.0 < rep.relative_error < 1.0
    assert {n.op_type for n in sliced.model.graph} >= {"RMSNormalization"}
    assert _run(sliced, data).shape == (96, 7, 5)


_LOW_OPSET = [
    pytest.param(lambda: ViT(dim=16, depth=2, heads=2, mlp=32), (1, 28, 28), (11, False), (17, False), "LayerNormalization", id="vit-legacy-11"),
    pytest.param(RMSNet, (7, 6), (18, True), (23, True), "RMSNormalization", id="rms-dynamo-18"),
]


@pytest.mark.parametrize(("build", "shape", "low", "high", "norm_op"), _LOW_OPSET)
def test_norms_written_as_arithmetic_rotate_like_the_norm_ops(tmp_path: Path, build, shape, low, high, norm_op) -> None:
    """Below opset 17 (LayerNorm) / 23 (RMSNorm) the exporters write each norm as Pow/ReduceMean/Sqrt...: the hidden
    pass fuses them and slices with the error of the same model exported with norm ops; its output is a valid model."""
    torch.manual_seed(0)
    model = _randomise_norms(build())
    low_om = _export(model, tmp_path / "low.onnx", shape, opset=low[0], dynamo=low[1])
    high_om = _export(model, tmp_path / "high.onnx", shape, opset=high[0], dynamo=high[1])
    assert norm_op not in {n.op_type for n in low_om.model.graph} and norm_op in {n.op_type for n in high_om.model.graph}
    data = _data(shape)
    options = HiddenOptions(keep=0.75, samples=64, eval_samples=64)
    lines: list[str] = []
    sliced, rep = slice_hidden(low_om, data, None, options, lines.append)
    ref, ref_rep = slice_hidden(high_om, data, None, options)
    assert any(line.startswith(f"fused {ref_rep.norms} norms written as arithmetic") for line in lines)
    assert rep.frozen == "" and rep.norms == ref_rep.norms and rep.kept == ref_rep.kept == 12
    assert rep.full_rotation_error < 1e-4
    assert rep.discarded_energy == pytest.approx(ref_rep.discarded_energy, rel=1e-5)
    assert rep.relative_error == pytest.approx(ref_rep.relative_error, rel=1e-3)
    assert np.allclose(_run(sliced, data), _run(ref, data), atol=1e-4 * float(np.abs(_run(ref, data)).max()))
    proto = onnx.load_from_string(model_bytes(sliced.model))
    onnx.checker.check_model(proto, full_check=True)  # no norm op the opset lacks is left behind
    assert proto.opset_import[0].version == low[0]


def _rms_graph(extra_use: bool) -> onnx.ModelProto:
    """x / sqrt(mean(x^2) + eps) * g, with the root also read by another output when ``extra_use``."""
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["m"], axes=[-1]),
             helper.make_node("Add", ["m", "eps"], ["v"]), helper.make_node("Sqrt", ["v"], ["r"]),
             helper.make_node("Div", ["x", "r"], ["n"]), helper.make_node("Mul", ["n", "g"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])]
    if extra_use:
        outputs.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [2, 1]))
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.array([1.0, 2.0, 3.0, 4.0], np.float32), "g")]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("extra_use", [False, True])
def test_a_norm_is_fused_only_when_its_arithmetic_is_read_nowhere_else(extra_use: bool) -> None:
    from graphprune.frontends.canonical import fuse_decomposed_norms

    model = ir.serde.deserialize_model(_rms_graph(extra_use))
    fused = fuse_decomposed_norms(model)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    with model_session(ir.serde.deserialize_model(_rms_graph(extra_use))) as s0, model_session(model) as s1:
        want, got = s0.run(None, {"x": x}), s1.run(None, {"x": x})
    ops = [n.op_type for n in model.graph]
    if extra_use:
        assert fused == [] and "SimplifiedLayerNormalization" not in ops
    else:
        assert len(fused) == 1 and ops == ["SimplifiedLayerNormalization"]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_bias_free_reader_gets_the_shift(tmp_path: Path) -> None:
    torch.manual_seed(0)
    om = _export(_randomise_norms(NoBiasReader()), tmp_path / "nb.onnx", (4, 5))
    data = _data((4, 5))
    stream = find_stream(om.graph)
    assert [r.bias for r in stream.readers] == [""]
    rotated = rotate_onnx(om, stream, _full_basis(om, data))
    assert compare_outputs([_run(om, data)], [_run(rotated, data)], rtol=1e-4, atol=1e-5) < 1e-4


def test_shared_constants_are_copied(tmp_path: Path) -> None:
    from onnx import TensorProto

    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    om = load_onnx(path)
    assert len(om.model.graph.initializers) == 2 and om.graph.copies == {"w_use1": "w"}, "the loader gives each use its own weight"
    assert unshared(om) is om


def test_post_ln_freezes_with_the_reason(tmp_path: Path) -> None:
    om = _export(PostLN(), tmp_path / "post.onnx", (5, 6))
    stream = find_stream(om.graph)
    assert "post-LN" in stream.frozen
    same, rep = slice_hidden(om, _data((5, 6)), None, HiddenOptions(keep=0.5))
    assert same is om and rep.frozen == stream.frozen and rep.lines()[0].startswith("hidden stream frozen")


def test_cnn_has_no_stream(exported) -> None:
    with pytest.raises(BadInputError, match="no LayerNormalization"):
        find_stream(load_onnx(exported("vgg")).graph)


def test_cli_bad_input(exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = tmp_path / "d.npz"
    np.savez(npz, input=np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32))
    out = tmp_path / "out.onnx"
    assert main(["prune", str(exported("vgg")), "-o", str(out), "--hidden", "0.5", "--data", str(npz), "--latency-runs", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no LayerNormalization" in err and len(err.splitlines()) == 1 and not out.exists()
    assert main(["prune", str(exported("vgg")), "-o", str(out), "--hidden", "0.5"]) == 2
    assert "need calibration data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(exported("vgg")), "-o", str(out), "--hidden", "1.5"])
    assert exc.value.code == 2


def test_cli_hidden_writes_the_sliced_model(vit: OnnxModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "vit.onnx"
    onnx.save(onnx.load(str(vit.path)), str(src))
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, input=rng.standard_normal((64, 1, 28, 28)).astype(np.float32), labels=rng.integers(0, 10, 64))
    out = tmp_path / "out.onnx"
    assert main(["prune", str(src), "-o", str(out), "--hidden", "0.5", "--data", str(npz), "--eval-data", str(npz),
                 "--latency-runs", "0"]) == 0
    report = json.loads((tmp_path / "out.report.json").read_text())
    hidden = report["figures"]["hidden"]
    assert hidden["kept"] == 8 and hidden["width"] == 16 and hidden["accuracy_before"] is not None
    assert report["after"]["params"] < report["before"]["params"]
    assert "hidden size 16 -> 8" in capsys.readouterr().out


def test_pipeline_order_and_toml() -> None:
    steps = [{"name": "hidden", "keep": 0.5}, {"name": "validate"}]
    assert parse_pipeline({"pass": steps}).names == ("hidden", "validate")
    with pytest.raises(BadInputError, match="must come before"):
        parse_pipeline({"pass": [{"name": "hidden", "keep": 0.5}, {"name": "plan", "method": "uniform", "criterion": "l1", "ratio": 0.5}]})
    with pytest.raises(BadInputError, match="hidden keep"):
        parse_pipeline({"pass": [{"name": "hidden", "keep": 1.5}]})
    placed = with_hidden({"pass": [{"name": "plan", "ratio": 0.5}, {"name": "rewrite"}, {"name": "validate"}]}, {"name": "hidden", "energy": 0.99})
    assert [e["name"] for e in placed["pass"]] == ["plan", "rewrite", "hidden", "validate"]


def test_energy_rank_and_width() -> None:
    vals = np.array([5.0, 3.0, 1.0, 0.5, 0.5])
    assert energy_rank(vals, 0.5) == 1 and energy_rank(vals, 0.8) == 2 and energy_rank(vals, 1.0) == 5
    assert kept_width(5, vals, HiddenOptions(energy=0.8)) == 2
    assert kept_width(64, vals, HiddenOptions(keep=0.3, round_to=8)) == 24


class GPTBlock(nn.Module):
    """GPT-2 style: pre-LN, fused QKV split in three, causal attention, GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(torch.nn.functional.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token and position embeddings, two blocks, final norm, head tied to the token embedding."""

    def __init__(self, vocab: int = 40, dim: int = 16, length: int = 8):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(length, dim)
        self.blocks = nn.Sequential(GPTBlock(dim, 2), GPTBlock(dim, 2))
        self.ln = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1])
        h = self.ln(self.blocks(self.wte(ids) + self.wpe(pos)))
        return h @ self.wte.weight.T


def test_gpt_style_causal_lm_with_tied_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomise_norms(TinyGPT())
    path = tmp_path / "gpt.onnx"
    ids = torch.randint(0, 40, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids,), str(path), opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    om = load_onnx(path)
    data = Calibration((np.random.default_rng(0).integers(0, 40, (64, 8)).astype(np.int64),), None, "tokens")
    sliced, rep = slice_hidden(om, data, None, HiddenOptions(keep=0.75, samples=64, eval_samples=64))
    assert rep.frozen == "" and rep.kept == 12 and rep.full_rotation_error < 1e-4
    assert rep.agreement is None  # the output is (batch, tokens, vocab): no top-1 over a class axis
    assert _run(sliced, data).shape == (64, 8, 40) and 0.0 < rep.relative_error < 1.0


def _ort_pair(tmp_path: Path, name: str) -> tuple[Path, Path, Calibration]:
    """A reference model with norms away from 1 / 0, its legacy export and that export after onnxruntime's optimizer."""
    from test_transformers import _ort_optimize

    from graphprune import models

    torch.manual_seed(0)
    model = _randomise_norms(models.build(name))
    src = tmp_path / f"{name}.onnx"
    rng = np.random.default_rng(0)
    if name == "vit":
        models.export_onnx(model, src)
        data = Calibration((rng.standard_normal((64, 1, 28, 28)).astype(np.float32),), None, "random")
    else:
        models.export_tokens(model, src)
        data = Calibration((rng.integers(0, 64, (64, 8)).astype(np.int64),), None, "tokens")
    return src, _ort_optimize(src, tmp_path / f"{name}.ort.onnx", "gpt2" if name == "llama" else name), data


@pytest.mark.parametrize("name", ["vit", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_ort_optimized_pre_ln_model_rotates_like_its_export_and_keeps_the_fused_norms(tmp_path: Path, name: str) -> None:
    """SkipLayerNormalization (residual Add + LayerNorm, the bias of the writer before it folded in) is a stream point:
    the ORT-optimized model slices with the error of the plain export, and stays one fused norm per norm."""
    from test_fusions import ALL, optimized_ops

    src, fused, data = _ort_pair(tmp_path, name)
    ops = [n.op_type for n in onnx.load(str(fused)).graph.node]
    assert ops.count("SkipLayerNormalization") == 4 and ops.count("LayerNormalization") == 1
    options = HiddenOptions(keep=0.75, samples=64, eval_samples=64)
    plain, plain_rep = slice_hidden(load_onnx(src), data, None, options)
    om = load_onnx(fused)
    sliced, rep = slice_hidden(om, data, None, options)
    assert rep.frozen == "" and rep.norms == 5 and rep.kept == 24 and rep.full_rotation_error < 1e-4
    assert 0.0 < rep.relative_error < 1.0, "sliced: not exact, bounded"
    assert rep.relative_error == pytest.approx(plain_rep.relative_error, rel=1e-3)
    assert rep.discarded_energy == pytest.approx(plain_rep.discarded_energy, rel=1e-6)
    assert np.allclose(_run(sliced, data), _run(plain, data), atol=1e-4 * float(np.abs(_run(plain, data)).max()))
    new_ops = [n.op_type for n in sliced.model.graph]
    assert new_ops.count("SkipSimplifiedLayerNormalization") == 4 and "SkipLayerNormalization" not in new_ops
    out = tmp_path / "sliced.onnx"
    out.write_bytes(model_bytes(sliced.model))
    before, after = optimized_ops(fused, tmp_path / "a.opt.onnx", ALL), optimized_ops(out, tmp_path / "b.opt.onnx", ALL)
    renamed = {"com.microsoft:SkipLayerNormalization": "com.microsoft:SkipSimplifiedLayerNormalization",
               ":LayerNormalization": ":SimplifiedLayerNormalization"}
    expected = Counter({renamed.get(k, k): v for k, v in before.items()})
    if name == "gpt2":
        expected[":Add"] += 1  # the tied LM head has no bias: the last norm's shift needs one Add
    assert after == expected, "onnxruntime runs as many ops as before, each norm one fused op"


def test_ort_optimized_post_ln_model_freezes_with_the_reason(tmp_path: Path) -> None:
    _, fused, data = _ort_pair(tmp_path, "bert")
    om = load_onnx(fused)
    same, rep = slice_hidden(om, data, None, HiddenOptions(keep=0.75, samples=16, eval_samples=16))
    assert "post-LN" in rep.frozen and rep.kept == 0 and same.model.graph.num_nodes() == om.model.graph.num_nodes()


def test_fused_norm_without_its_sum_output_gets_one(tmp_path: Path) -> None:
    _, fused, _ = _ort_pair(tmp_path, "vit")
    om = load_onnx(fused)
    last = [n for n in om.model.graph if n.op_type == "SkipLayerNormalization"][-1]
    assert len(last.outputs) < 4, "the optimizer leaves the last fused norm without its sum"
    stream = find_stream(om.graph)
    assert "does not output its sum" in stream.frozen
    summed = with_sums(om)
    assert find_stream(summed.graph).frozen == "" and om.model.graph.node(last.name).outputs == last.outputs
    assert with_sums(summed) is summed


def test_the_walks_copy_is_prepared_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An optimized model whose last fused norm lacks its sum output, with a constant shared by two norms: one copy
    takes both changes and shape inference runs once (it ran once per change)."""
    import graphprune.backends.onnx_rotation as rotation

    _, fused, _ = _ort_pair(tmp_path, "vit")
    om = load_onnx(fused)
    first, second = [n for n in om.model.graph if n.op_type == "SkipLayerNormalization"][:2]
    second.replace_input_with(2, first.inputs[2])  # both read one gamma
    om = rotation.prepare(om.model, om.path)
    assert unshared(om) is not om and with_sums(om) is not om
    calls: list[int] = []
    real = rotation.prepare
    monkeypatch.setattr(rotation, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    prepped, fused_count = rotation.rotatable(om)
    assert len(calls) == 1 and fused_count == 0 and find_stream(prepped.graph).frozen == ""
    assert rotation.rotatable(prepped)[0] is prepped


def test_ort_optimized_llama_style_model_rotates_its_rms_stream(tmp_path: Path) -> None:
    """SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization (RMS: writers are not centred) are stream points."""
    _, fused, data = _ort_pair(tmp_path, "llama")
    om = load_onnx(fused)
    stream = find_stream(with_sums(unshared(om)).graph)
    assert stream.frozen == "" and not stream.centred and len(stream.norms) == 5
    sliced, rep = slice_hidden(om, data, None, HiddenOptions(keep=0.75, samples=64, eval_samples=64))
    assert rep.kept == 24 and rep.full_rotation_error < 1e-4 and 0.0 < rep.relative_error < 1.0
    assert 0.0 < rep.discarded_energy < 0.25
    assert _run(sliced, data).shape == _run(om, data).shape
