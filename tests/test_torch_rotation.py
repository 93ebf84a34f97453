"""The hidden pass on nn.Modules: the same rotation as on the ONNX export, tied weights, freezes, the pipeline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_rotation import _randomise_norms, _run
from torch import nn

from graphprune import models
from graphprune.backends.onnx_rotation import slice_hidden
from graphprune.backends.torch_model import module_model, program_model
from graphprune.backends.torch_rotation import UnitRMSNorm, slice_hidden_module, untie_parameters
from graphprune.errors import BadInputError, ValidationError
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx
from graphprune.recovery.rotation import HiddenOptions

OPTIONS = HiddenOptions(keep=0.75, samples=64, eval_samples=64)


def _images(n: int = 64) -> Calibration:
    return Calibration((np.random.default_rng(0).standard_normal((n, 1, 28, 28)).astype(np.float32),), None, "random")


def _tokens(n: int = 64) -> Calibration:
    return Calibration((np.random.default_rng(0).integers(0, 64, (n, 8)).astype(np.int64),), None, "tokens")


def _outputs(module: nn.Module, data: Calibration) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(data.inputs[0])).numpy()


def test_module_rotation_matches_the_onnx_rotation(tmp_path: Path) -> None:
    """The ViT sliced as a module and as its ONNX export: the same stream, spectrum and kept width, and the same
    outputs (both apply one global PCA basis of the same moments)."""
    torch.manual_seed(0)
    module = _randomise_norms(models.build("vit"))
    data = _images()
    model = module_model(module, [torch.from_numpy(data.inputs[0][:2])])
    sliced, report = slice_hidden_module(model, data, None, OPTIONS)
    models.export_onnx(module, tmp_path / "vit.onnx")
    onnx_sliced, onnx_report = slice_hidden(load_onnx(tmp_path / "vit.onnx"), data, None, OPTIONS)
    assert report.frozen == "" and (report.width, report.kept) == (onnx_report.width, onnx_report.kept) == (32, 24)
    assert (report.norms, report.readers) == (onnx_report.norms, onnx_report.readers)
    assert report.full_rotation_error < 1e-4
    assert report.discarded_energy == pytest.approx(onnx_report.discarded_energy, rel=1e-4)
    assert report.max_abs_error == pytest.approx(onnx_report.max_abs_error, rel=1e-2)
    got = _outputs(sliced.module, data)
    np.testing.assert_allclose(got, _run(onnx_sliced, data), rtol=1e-3, atol=1e-4)
    assert np.abs(got - _outputs(module, data)).max() == pytest.approx(report.max_abs_error, rel=1e-5)
    m = sliced.module
    assert isinstance(m.norm, UnitRMSNorm) and (m.embed.out_channels, m.head.in_features) == (24, 24)
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in module.parameters())
    assert isinstance(module.norm, nn.LayerNorm)  # the input is not modified


def test_full_width_module_rotation_reproduces_the_module() -> None:
    torch.manual_seed(0)
    module = _randomise_norms(models.build("vit"))
    data = _images(32)
    rotated, report = slice_hidden_module(module_model(module, [torch.randn(2, 1, 28, 28)]), data, None,
                                          HiddenOptions(keep=1.0, samples=32, eval_samples=32))
    assert report.kept == 32 and report.max_abs_error is not None and report.max_abs_error < 1e-4
    np.testing.assert_allclose(_outputs(rotated.module, data), _outputs(module, data), rtol=1e-4, atol=1e-4)


def test_tied_lm_head_is_untied_and_rotates() -> None:
    """GPT-2's LM head shares its token embedding: untied first (a writer and a reader rotate differently)."""
    torch.manual_seed(0)
    module = _randomise_norms(models.build("gpt2"))
    assert module.lm_head.weight is module.wte.weight
    data = _tokens()
    sliced, report = slice_hidden_module(module_model(module, [torch.zeros(2, 8, dtype=torch.long)]), data, None, OPTIONS)
    assert report.frozen == "" and report.kept == 24 and report.full_rotation_error < 1e-4
    m = sliced.module
    assert m.wte.weight.shape == (64, 24) and m.lm_head.in_features == 24 and m.lm_head.weight is not m.wte.weight
    assert module.lm_head.weight is module.wte.weight  # the input keeps its tie
    assert np.abs(_outputs(m, data) - _outputs(module, data)).max() == pytest.approx(report.max_abs_error, rel=1e-5)


def test_untie_parameters_copies_every_further_use() -> None:
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4)
    b.weight = a.weight
    seq = nn.Sequential(a, b)
    assert untie_parameters(seq) == ["1.weight"] and seq[1].weight is not seq[0].weight
    assert torch.equal(seq[1].weight, seq[0].weight) and untie_parameters(seq) == []


def test_post_ln_module_freezes_with_the_reason() -> None:
    module = models.build("bert").eval()
    model = module_model(module, [torch.zeros(2, 8, dtype=torch.long)])
    same, report = slice_hidden_module(model, _tokens(16), None, OPTIONS)
    assert same is model and "post-LN" in report.frozen


class _FunctionalNorm(nn.Module):
    """A pre-LN block whose norm is ``F.layer_norm`` in the forward: there is no norm module to replace."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed, self.fc, self.head = nn.Linear(8, dim), nn.Linear(dim, dim), nn.Linear(dim, 4)
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc(nn.functional.layer_norm(h, h.shape[-1:], self.scale))
        return self.head(nn.functional.layer_norm(h, h.shape[-1:], self.scale)).mean(1)


class _NormedResidual(nn.Module):
    """``h + fc(norm(h))``: one Linear reads the normalised stream and writes the stream; with ``literal`` the
    forward then reshapes the stream to its width written as a number."""

    def __init__(self, dim: int = 16, literal: bool = False) -> None:
        super().__init__()
        self.embed, self.fc, self.head = nn.Linear(8, dim), nn.Linear(dim, dim), nn.Linear(dim, 4)
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.literal = literal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc(self.n1(h))
        if self.literal:
            h = h.reshape(x.shape[0], -1, 16)
        return self.head(self.n2(h)).mean(1)


def _sequences(n: int = 32) -> Calibration:
    return Calibration((np.random.default_rng(0).standard_normal((n, 5, 8)).astype(np.float32),), None, "random")


def test_functional_norm_freezes_with_the_reason() -> None:
    model = module_model(_FunctionalNorm().eval(), [torch.randn(2, 5, 8)])
    same, report = slice_hidden_module(model, _sequences(), None, OPTIONS)
    assert same is model and "not an nn.LayerNorm or RMSNorm module's call" in report.frozen


def test_forward_that_hard_codes_the_width_is_refused() -> None:
    model = module_model(_NormedResidual(literal=True).eval(), [torch.randn(2, 5, 8)])
    with pytest.raises(ValidationError, match=r"fails to run .*hard-code the hidden size"):
        slice_hidden_module(model, _sequences(), None, OPTIONS)


def test_hidden_pass_runs_on_a_module_and_on_a_program() -> None:
    """The pipeline's hidden step on a module and on its exported program: the same kept width and outputs."""
    from graphprune.backends.torch_model import ProgramPrunable
    from graphprune.pipeline.config import parse_pipeline
    from graphprune.pipeline.run import run_model

    torch.manual_seed(0)
    module = models.build("vit").eval()
    example = [torch.randn(2, 1, 28, 28)]
    pipeline = parse_pipeline({"pass": [{"name": "hidden", "keep": 0.5, "samples": 32, "eval_samples": 32},
                                        {"name": "validate", "latency_runs": 0}]})
    ws = run_model(pipeline, module_model(module, example), _images(32))
    assert ws.hidden is not None and ws.hidden.kept == 16
    assert isinstance(ws.model.module.norm, UnitRMSNorm)  # type: ignore[attr-defined]
    batch = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    program = program_model(torch.export.export(module, tuple(example), dynamic_shapes=batch))
    pws = run_model(pipeline, program, _images(32))
    assert isinstance(pws.model, ProgramPrunable) and pws.hidden is not None and pws.hidden.kept == 16
    assert pws.hidden.relative_error == pytest.approx(ws.hidden.relative_error, rel=1e-4)
    data = _images(16)
    with torch.no_grad():
        got = pws.model.program.module()(torch.from_numpy(data.inputs[0])).numpy()
    np.testing.assert_allclose(got, _outputs(ws.model.module, data), rtol=1e-4, atol=1e-5)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_program_rotation_matches_the_module_rotation(name: str) -> None:
    """A GPT-2-style LM (its head tied to the token embedding: untied in the program) and a Llama-style one (its
    RMSNorm modules fused from the program's arithmetic, with no module at hand) slice as their modules do."""
    from graphprune.backends.program_rotation import slice_hidden_program

    torch.manual_seed(0)
    module = _randomise_norms(models.build(name)).eval()
    data = _tokens()
    example = torch.from_numpy(data.inputs[0][:2])
    sliced, report = slice_hidden_module(module_model(module, [example]), data, None, OPTIONS)
    batch = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    program = program_model(torch.export.export(module, (example,), dynamic_shapes=batch))
    assert any(n.op_type == "RMSNormalization" for n in program.graph.nodes) == (name == "llama")
    psliced, preport = slice_hidden_program(program, data, None, OPTIONS)
    assert preport.frozen == "" and preport.kept == report.kept == 24
    assert preport.full_rotation_error < 1e-4  # type: ignore[operator]
    assert preport.relative_error == pytest.approx(report.relative_error, rel=1e-4)
    with torch.no_grad():
        got = psliced.program.module()(torch.from_numpy(data.inputs[0])).numpy()
    np.testing.assert_allclose(got, _outputs(sliced.module, data), rtol=1e-3, atol=1e-4)


def test_cli_hidden_on_a_saved_program(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``graphprune prune model.pt2 --hidden`` writes a sliced ``.pt2`` that loads back and runs at any batch."""
    import json

    from graphprune.cli import main

    torch.manual_seed(0)
    module = models.build("vit").eval()
    batch = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    src = tmp_path / "vit.pt2"
    torch.export.save(torch.export.export(module, (torch.randn(2, 1, 28, 28),), dynamic_shapes=batch), str(src))
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, input=rng.standard_normal((64, 1, 28, 28)).astype(np.float32), labels=rng.integers(0, 10, 64))
    out = tmp_path / "out.pt2"
    assert main(["prune", str(src), "-o", str(out), "--hidden", "0.5", "--data", str(npz), "--latency-runs", "0"]) == 0
    assert "hidden size 32 -> 16" in capsys.readouterr().out
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["figures"]["hidden"]["kept"] == 16 and report["after"]["params"] < report["before"]["params"]
    again = torch.export.load(str(out)).module()
    with torch.no_grad():
        assert again(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_a_reader_that_writes_the_stream_rotates_on_both_sides(tmp_path: Path) -> None:
    """Its weight is a reader along its input and a writer along its output (the walk had left the writer side out,
    and the full-width check refused the model); as a module and as its ONNX export."""
    from graphprune.coupling.stream import Side, find_stream

    torch.manual_seed(0)
    module = _randomise_norms(_NormedResidual())
    model = module_model(module, [torch.randn(2, 5, 8)])
    assert Side("fc.weight", 0) in find_stream(model.graph).writers
    data = _sequences()
    full = HiddenOptions(keep=1.0, samples=32, eval_samples=32)
    assert slice_hidden_module(model, data, None, full)[1].max_abs_error < 1e-4  # type: ignore[operator]
    sliced, report = slice_hidden_module(model, data, None, OPTIONS)
    assert report.kept == 12 and 0.0 < report.relative_error < 1.0  # type: ignore[operator]
    path = tmp_path / "block.onnx"
    torch.onnx.export(module, (torch.randn(2, 5, 8),), str(path), input_names=["input"], dynamo=False, opset_version=17,
                      dynamic_axes={"input": {0: "batch"}})
    onnx_sliced, onnx_report = slice_hidden(load_onnx(path), data, None, OPTIONS)
    assert onnx_report.full_rotation_error < 1e-4 and onnx_report.kept == 12  # type: ignore[operator]
    np.testing.assert_allclose(_outputs(sliced.module, data), _run(onnx_sliced, data), rtol=1e-3, atol=1e-4)


class _Conv1DLM(nn.Module):
    """Hugging Face GPT-2's layout: token embedding, a ``Conv1D`` block (``addmm``, ``x.view(-1, d)``), final norm, head."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        from test_torch_frontend import _Conv1DBlock

        self.wte, self.block, self.ln_f, self.head = nn.Embedding(64, dim), _Conv1DBlock(dim), nn.LayerNorm(dim), nn.Linear(dim, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(self.block(self.wte(ids))))


def test_hugging_face_style_conv1d_lm_rotates() -> None:
    """Conv1D weights ([in, out], read by addmm after ``x.view(-1, d)``) are writers and readers; their ``nx`` / ``nf``
    follow the sliced weights."""
    torch.manual_seed(0)
    module = _randomise_norms(_Conv1DLM())
    data = _tokens()
    model = module_model(module, [torch.zeros(2, 8, dtype=torch.long)])
    full = slice_hidden_module(model, data, None, HiddenOptions(keep=1.0, samples=64, eval_samples=64))[1]
    assert full.frozen == "" and full.max_abs_error is not None and full.max_abs_error < 1e-4
    sliced, report = slice_hidden_module(model, data, None, OPTIONS)
    block = sliced.module.block
    assert report.kept == 24 and (block.c_attn.weight.shape[0], block.mlp_proj.nf) == (24, 24)
    assert np.abs(_outputs(sliced.module, data) - _outputs(module, data)).max() == pytest.approx(report.max_abs_error, rel=1e-5)


def test_llama_style_rms_norm_modules_rotate() -> None:
    """RMSNorm modules trace as arithmetic; the frontend fuses each into one RMSNormalization op (checked against
    the module's own output), so the Llama-style model's RMS stream rotates: writers are not centred."""
    torch.manual_seed(0)
    module = models.build("llama").eval()
    with torch.no_grad():
        for m in module.modules():
            if type(m).__name__ == "RMSNorm":
                m.weight.uniform_(0.5, 1.5)
    model = module_model(module, [torch.zeros(2, 8, dtype=torch.long)])
    assert sum(n.op_type == "RMSNormalization" for n in model.graph.nodes) == 5
    data = _tokens()
    full = slice_hidden_module(model, data, None, HiddenOptions(keep=1.0, samples=64, eval_samples=64))[1]
    assert full.frozen == "" and full.max_abs_error is not None and full.max_abs_error < 1e-4
    sliced, report = slice_hidden_module(model, data, None, OPTIONS)
    assert report.kept == 24 and 0.0 < report.relative_error < 1.0  # type: ignore[operator]
    assert all(isinstance(layer.input_norm, UnitRMSNorm) for layer in sliced.module.layers)
    assert np.abs(_outputs(sliced.module, data) - _outputs(module, data)).max() == pytest.approx(report.max_abs_error, rel=1e-5)


def test_a_model_with_no_norm_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="no LayerNormalization"):
        slice_hidden_module(module_model(models.build("resnet20").eval(), [torch.randn(2, 1, 28, 28)]), _images(8), None, OPTIONS)


class OddRMSNorm(nn.Module):
    """Named like an RMSNorm, computing something else: its ops stay as traced."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + self.eps)  # a sum, not a mean


def test_only_modules_that_compute_rms_norm_are_fused() -> None:
    """From the module (run on random input) and from its exported program (the block's own ops run instead)."""
    net = nn.Sequential(nn.Linear(8, 16), OddRMSNorm(16), nn.Linear(16, 4)).eval()
    model = module_model(net, [torch.randn(2, 5, 8)])
    program = program_model(torch.export.export(net, (torch.randn(2, 5, 8),)))
    for graph in (model.graph, program.graph):
        assert not any(n.op_type == "RMSNormalization" for n in graph.nodes)
        assert any(n.op_type == "Pow" for n in graph.nodes)


class _TorchRMSNet(nn.Module):
    """Pre-norm residual blocks with torch's own ``nn.RMSNorm`` (one ``aten.rms_norm`` call, not arithmetic)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, dim)
        self.n1, self.fc1, self.fc2 = nn.RMSNorm(dim), nn.Linear(dim, 32), nn.Linear(32, dim)
        self.norm, self.head = nn.RMSNorm(dim, eps=1e-5), nn.Linear(dim, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.fc2(torch.nn.functional.silu(self.fc1(self.n1(x))))
        return self.head(self.norm(x))


def test_torch_rms_norm_modules_convert_and_rotate_on_both_torch_paths() -> None:
    """``aten.rms_norm`` is RMSNormalization (torch's default epsilon when none is given); the stream rotates as a
    module and as a program, exactly at full width, with the same sliced outputs."""
    from graphprune.backends.program_rotation import slice_hidden_program

    torch.manual_seed(0)
    module = _randomise_norms(_TorchRMSNet()).eval()
    example = torch.zeros(2, 8, dtype=torch.long)
    model = module_model(module, [example])
    norms = [n for n in model.graph.nodes if n.op_type == "RMSNormalization"]
    assert [n.attrs["epsilon"] for n in norms] == pytest.approx([torch.finfo(torch.float32).eps, 1e-5])
    data = _tokens()
    full = HiddenOptions(keep=1.0, samples=64, eval_samples=64)
    assert slice_hidden_module(model, data, None, full)[1].max_abs_error < 1e-4  # type: ignore[operator]
    sliced, report = slice_hidden_module(model, data, None, OPTIONS)
    program = program_model(torch.export.export(module, (example,), dynamic_shapes={"ids": {0: torch.export.Dim("batch")}}))
    psliced, preport = slice_hidden_program(program, data, None, OPTIONS)
    assert report.kept == preport.kept == 12 and preport.full_rotation_error < 1e-4  # type: ignore[operator]
    with torch.no_grad():
        got = psliced.program.module()(torch.from_numpy(data.inputs[0])).numpy()
    np.testing.assert_allclose(got, _outputs(sliced.module, data), rtol=1e-3, atol=1e-4)


class CastingRMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm: the statistics in float32 (``.to`` on a float32 input returns the input itself)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.rand(dim) + 0.5), 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class _CastingBlock(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed, self.fc, self.head = nn.Linear(8, dim), nn.Linear(dim, dim), nn.Linear(dim, 4)
        self.n1, self.n2 = CastingRMSNorm(dim), CastingRMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        residual = h
        h = residual + self.fc(self.n1(h))
        return self.head(self.n2(h)).mean(1)


def test_hugging_face_style_casting_rms_norm_is_fused_and_rotates() -> None:
    """The trace may read the same-type cast where the caller reads the input: the cast stays outside the fused op."""
    torch.manual_seed(0)
    model = module_model(_CastingBlock().eval(), [torch.randn(2, 5, 8)])
    assert sum(n.op_type == "RMSNormalization" for n in model.graph.nodes) == 2
    full = slice_hidden_module(model, _sequences(), None, HiddenOptions(keep=1.0, samples=32, eval_samples=32))[1]
    assert full.frozen == "" and full.max_abs_error is not None and full.max_abs_error < 1e-4


class _ClassTokenViT(nn.Module):
    """Hugging Face ViT's layout: a class token expanded over the batch and concatenated before the patches, the
    head reading its row (``x[:, 0]``)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        from graphprune.models.transformer import Block

        self.embed = nn.Conv2d(1, dim, 7, 7)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = nn.Sequential(Block(dim, 2, 32), Block(dim, 2, 32))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


@pytest.mark.parametrize("dynamo", [False, True])
def test_class_token_concat_is_a_writer_on_both_paths(tmp_path: Path, dynamo: bool) -> None:
    """The class token (through Expand and Concat along the tokens) is rotated with the other writers; the row the
    head reads (``select`` / ``Gather``) passes the normalised stream. Module and ONNX export give the same model."""
    from graphprune.coupling.stream import Side, find_stream

    torch.manual_seed(0)
    module = _randomise_norms(_ClassTokenViT()).eval()
    example = torch.randn(2, 1, 28, 28)
    model = module_model(module, [example])
    stream = find_stream(model.graph)
    assert stream.frozen == "" and Side("cls", 2) in stream.writers
    data = _images(48)
    full = HiddenOptions(keep=1.0, samples=48, eval_samples=48)
    assert slice_hidden_module(model, data, None, full)[1].max_abs_error < 1e-4  # type: ignore[operator]
    sliced, report = slice_hidden_module(model, data, None, OPTIONS)
    assert report.kept == 12 and sliced.module.cls.shape == (1, 1, 12)  # type: ignore[union-attr]
    path = tmp_path / "vit.onnx"
    torch.onnx.export(module, (example,), str(path), input_names=["input"], dynamo=dynamo, opset_version=18 if dynamo else 17,
                      dynamic_axes={"input": {0: "batch"}})
    onnx_sliced, onnx_report = slice_hidden(load_onnx(path), data, None, OPTIONS)
    assert onnx_report.frozen == "" and onnx_report.kept == 12
    assert onnx_report.full_rotation_error < 1e-4  # type: ignore[operator]
    np.testing.assert_allclose(_outputs(sliced.module, data), _run(onnx_sliced, data), rtol=1e-3, atol=1e-4)


def test_prune_a_saved_language_model_program_with_channels_then_hidden_size(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``prune lm.pt2 --data ids.npz --ratio 0.3 --hidden 0.75``: unlabelled token data and (batch, tokens, vocabulary)
    logits, so the analysis takes the output projection loss (said in a stage line); channels then the hidden size."""
    import json

    from graphprune.cli import main
    from graphprune.pipeline.passes import analysis_loss

    torch.manual_seed(0)
    module = models.build("gpt2").eval()
    src = tmp_path / "lm.pt2"
    torch.export.save(torch.export.export(module, (torch.zeros(2, 8, dtype=torch.long),),
                                          dynamic_shapes={"ids": {0: torch.export.Dim("batch", min=1, max=1024)}}), str(src))
    graph = program_model(torch.export.load(str(src))).graph
    assert analysis_loss(graph, "labels", False) == analysis_loss(graph, "fisher", True) == "projection"
    assert analysis_loss(graph, "labels", True) == "labels"
    npz = tmp_path / "ids.npz"
    np.savez(npz, input=np.random.default_rng(0).integers(0, 64, (640, 8)).astype(np.int64))
    out = tmp_path / "out.pt2"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.3", "--hidden", "0.75", "--data", str(npz),
                 "--samples", "256", "--latency-runs", "0", "--allow-over-limit"]) == 0
    text = capsys.readouterr().out
    assert "the output projection loss replaces the fisher loss" in " ".join(text.split()) and "hidden size 32 -> 24" in text
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["figures"]["hidden"]["kept"] == 24 and report["after"]["params"] < report["before"]["params"]
    with torch.no_grad():
        assert torch.export.load(str(out)).module()(torch.zeros(3, 8, dtype=torch.long)).shape == (3, 8, 64)
