"""Transformers as they are shipped: run-time head reshapes, both exporters, onnxruntime's fused ops."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_fusions import ALL, optimized_ops

from graphprune import models
from graphprune.coupling.groups import build_groups
from graphprune.frontends.onnx import load_onnx
from graphprune.pipeline.run import prune_file

HEADS = {"gpt2": 4, "bert": 4, "llama": 2, "vit": 4}
"""Channels of a head group: query heads, or key/value groups (the Llama-style model: 4 query heads in 2 groups)."""


def _export(name: str, path: Path, dynamo: bool = False) -> Path:
    if name == "vit":
        models.export_onnx(models.build(name), path, opset=18 if dynamo else 17, dynamo=dynamo)
    else:
        models.export_tokens(models.build(name), path, opset=18 if dynamo else 17, dynamo=dynamo)
    return path


def _head_groups(path: Path, heads: int) -> list:
    coupling = build_groups(load_onnx(path).graph)
    return [g for g in coupling.prunable if g.channels == heads and len(g.params()) >= 2]


def _prunes_exactly(src: Path, out: Path) -> None:
    result = prune_file(src, out, ratio=0.5, verify=True, latency_runs=0)
    assert result.validation.exact is True
    assert result.after.params < 0.75 * result.before.params


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "vit"])
def test_legacy_export_prunes_whole_heads_exactly(tmp_path, name):
    src = _export(name, tmp_path / f"{name}.onnx")
    heads = _head_groups(src, HEADS[name])
    assert len(heads) == 2, "one head group per layer (q, k, v and the output projection together; GPT-2: one fused c_attn)"
    _prunes_exactly(src, tmp_path / "small.onnx")


@pytest.mark.parametrize("name", ["bert", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_dynamo_export_prunes_whole_heads_exactly(tmp_path, name):
    src = _export(name, tmp_path / f"{name}.onnx", dynamo=True)
    assert len(_head_groups(src, HEADS[name])) == 2
    _prunes_exactly(src, tmp_path / "small.onnx")


def _ort_optimize(src: Path, out: Path, model_type: str) -> Path:
    cmd = [sys.executable, "-m", "onnxruntime.transformers.optimizer", "--input", str(src), "--output", str(out),
           "--model_type", model_type, "--num_heads", "4", "--hidden_size", "32"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.mark.parametrize(("name", "fused"), [("bert", "BiasGelu"), pytest.param("gpt2", "FastGelu", marks=pytest.mark.slow),
                                           pytest.param("vit", "BiasGelu", marks=pytest.mark.slow)])
def test_ort_optimized_prunes_heads_and_feed_forward_and_keeps_fusions(tmp_path, name, fused):
    src = _ort_optimize(_export(name, tmp_path / f"{name}.onnx"), tmp_path / f"{name}.ort.onnx", "vit" if name == "vit" else name)
    ops = Counter(n.op_type for n in onnx.load(str(src)).graph.node)
    assert ops[fused] == 2 and ops["SkipLayerNormalization"] >= 3
    coupling = build_groups(load_onnx(src).graph)
    assert len([g for g in coupling.prunable if g.channels == 64]) == 2, "feed-forward groups through the fused ops"
    assert len(_head_groups(src, 4)) == 2
    if name == "bert":
        assert any("EmbedLayerNormalization" in r for g in coupling.groups for r in g.frozen)
    out = tmp_path / "small.onnx"
    _prunes_exactly(src, out)
    assert optimized_ops(out, tmp_path / "b.opt.onnx", ALL) == optimized_ops(src, tmp_path / "a.opt.onnx", ALL)


def test_ort_optimized_llama_style_model_loads_and_prunes_key_value_groups_and_swiglu_exactly(tmp_path):
    """The optimizer writes RMS norms as SimplifiedLayerNormalization in the default domain (onnxruntime's, not ONNX's):
    checked as a contrib op, loaded, pruned (whole key/value groups with their query heads, SwiGLU channels) and
    validated."""
    from graphprune.frontends.onnx import check_onnx

    src = _ort_optimize(_export("llama", tmp_path / "llama.onnx"), tmp_path / "llama.ort.onnx", "gpt2")
    ops = Counter((n.domain, n.op_type) for n in onnx.load(str(src)).graph.node)
    assert ops[("", "SimplifiedLayerNormalization")] == 1 and ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 4
    with pytest.raises(Exception, match="No Op registered for SimplifiedLayerNormalization"):
        onnx.checker.check_model(str(src))
    check_onnx(src)
    coupling = build_groups(load_onnx(src).graph)
    assert len([g for g in coupling.prunable if g.channels == 64]) == 2, "SwiGLU gate and up with down"
    assert len(_head_groups(src, HEADS["llama"])) == 2
    out = tmp_path / "small.onnx"
    _prunes_exactly(src, out)
    before, after = optimized_ops(src, tmp_path / "a.opt.onnx", ALL), optimized_ops(out, tmp_path / "b.opt.onnx", ALL)
    fused = {k: v for k, v in before.items() if "Normalization" in k or k.startswith("com.microsoft:")}
    assert {k: after[k] for k in fused} == fused, "every fused norm and contrib op kept"
    # the repeat of the key/value groups (an Expand to a run-time shape) gets its new head counts as a Mul + Add,
    # which replaces more shape arithmetic than it adds
    assert sum(after.values()) <= sum(before.values())


def test_a_model_invalid_for_other_reasons_is_still_refused(tmp_path):
    from graphprune.errors import BadInputError

    src = _ort_optimize(_export("llama", tmp_path / "llama.onnx"), tmp_path / "llama.ort.onnx", "gpt2")
    model = onnx.load(str(src))
    model.graph.node[0].input[0] = "nowhere"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(BadInputError, match="invalid ONNX model"):
        load_onnx(bad)


def _attention_model(path: Path, op: str) -> Path:
    """X (B, S, 16) -> com.microsoft attention op with 4 heads of 4 (GQA: of 8, onnxruntime's minimum, in 2 groups) -> Linear."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.FLOAT, shape, rng.standard_normal(shape).astype(np.float32).reshape(-1))

    hidden = 32 if op == "GroupQueryAttention" else 16
    inits = [w("wo", hidden, 8)]
    nodes = []
    if op == "Attention":
        inits += [w("wqkv", 16, 48), w("bqkv", 48)]
        nodes.append(helper.make_node("Attention", ["x", "wqkv", "bqkv"], ["att"], domain="com.microsoft", num_heads=4))
    else:
        kv = hidden // 2 if op == "GroupQueryAttention" else hidden
        inits += [w("wq", 16, hidden), w("wk", 16, kv), w("wv", 16, kv)]
        nodes += [helper.make_node("MatMul", ["x", f"w{t}"], [t]) for t in "qkv"]
        if op == "MultiHeadAttention":
            nodes.append(helper.make_node(op, ["q", "k", "v"], ["att"], domain="com.microsoft", num_heads=4))
        else:
            nodes += [helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Gather", ["xs", "one"], ["s64"], axis=0),
                      helper.make_node("Cast", ["s64"], ["total"], to=TensorProto.INT32),
                      helper.make_node("Gather", ["xs", "zero"], ["b64"], axis=0),
                      helper.make_node("Sub", ["total", "one32"], ["slen"]),
                      helper.make_node("Unsqueeze", ["b64", "zero1"], ["b1"]),
                      helper.make_node("Expand", ["slen", "b1"], ["seqlens"]),
                      helper.make_node(op, ["q", "k", "v", "", "", "seqlens", "total"], ["att", "pk", "pv"],
                                       domain="com.microsoft", num_heads=4, kv_num_heads=2)]
            inits += [helper.make_tensor("one", TensorProto.INT64, [], [1]), helper.make_tensor("zero", TensorProto.INT64, [], [0]),
                      helper.make_tensor("one32", TensorProto.INT32, [], [1]), helper.make_tensor("zero1", TensorProto.INT64, [1], [0])]
    nodes.append(helper.make_node("MatMul", ["att", "wo"], ["y"]))
    graph = helper.make_graph(nodes, "att", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(("op", "units"), [("Attention", 4), ("MultiHeadAttention", 4), ("GroupQueryAttention", 2)])
def test_fused_attention_loses_whole_heads_and_its_head_counts_follow(tmp_path, op, units):
    src = _attention_model(tmp_path / "att.onnx", op)
    coupling = build_groups(load_onnx(src).graph)
    heads = [g for g in coupling.prunable if g.channels == units]
    assert len(heads) == 1, [(g.channels, g.frozen) for g in coupling.groups]
    out = tmp_path / "small.onnx"
    result = prune_file(src, out, ratio=0.5, verify=True, latency_runs=0)
    assert result.validation.exact is True
    node = next(n for n in onnx.load(str(out)).graph.node if n.op_type == op)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == 2
    if op == "GroupQueryAttention":
        assert attrs["kv_num_heads"] == 1


def test_macs_count_the_sequence_length_and_the_table_names_it(tmp_path):
    from graphprune.analysis.cost import cost_label, model_cost, resolve_dims
    from graphprune.cli import main

    src = _export("bert", tmp_path / "bert.onnx")
    graph = load_onnx(src).graph
    one = model_cost(graph).macs
    assert "seq counted as 1" in cost_label(graph)
    resolve_dims(graph, None, [np.zeros((4, 16), np.int64)])  # calibration data of length 16
    at16 = model_cost(graph).macs
    assert cost_label(graph) == "MACs / sample (seq = 16)"
    resolve_dims(graph, 32, None)
    at32 = model_cost(graph).macs
    assert 16 * one <= at16 < at32 and at32 > 2 * at16  # linear layers scale with L, attention scores with L^2
    out = tmp_path / "small.onnx"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--latency-runs", "0", "--no-profile",
                 "--seq-len", "32", "--json", str(tmp_path / "r.json")]) == 0
    assert "seq = 32" in (tmp_path / "r.json").read_text()


def _hf_export(kind: str, path: Path, dynamo: bool = False, mask: bool = False) -> Path:
    """A Hugging Face model from a tiny config (random weights, eager attention): BERT / ViT by the legacy exporter, GPT-2 by
    dynamo; ``mask``: BERT takes ``attention_mask`` as a second input (as exported for serving)."""
    hf = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32, "intermediate_size": 64}
    if kind == "bert":
        inner = hf.BertModel(hf.BertConfig(vocab_size=50, max_position_embeddings=32, **small), add_pooling_layer=False)
    elif kind == "vit":
        inner = hf.ViTModel(hf.ViTConfig(image_size=8, patch_size=4, num_channels=1, **small), add_pooling_layer=False)
    else:
        inner = hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                 bos_token_id=0, eos_token_id=0))
    inner.config._attn_implementation = "eager"

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner.eval()

        def forward(self, x: torch.Tensor, *attention_mask: torch.Tensor) -> torch.Tensor:
            if kind == "vit":
                return self.inner(pixel_values=x).last_hidden_state
            if kind == "gpt2":
                return self.inner(input_ids=x, use_cache=False).logits
            return self.inner(input_ids=x, attention_mask=attention_mask[0] if attention_mask else None).last_hidden_state

    x = torch.randn(2, 1, 8, 8) if kind == "vit" else torch.randint(0, 50, (2, 8))
    axes = {0: "batch"} if kind == "vit" else {0: "batch", 1: "seq"}
    if mask:
        names = ["input", "attention_mask"]
        torch.onnx.export(Wrapped().eval(), (x, torch.ones_like(x)), str(path), input_names=names, output_names=["out"],
                          opset_version=17, dynamic_axes={n: axes for n in names}, dynamo=False)
        return path
    with torch.no_grad():
        if dynamo:
            dims = {k: torch.export.Dim(v, min=2, max=16) for k, v in axes.items()}
            torch.onnx.export(Wrapped().eval(), (x,), str(path), input_names=["input"], output_names=["out"], opset_version=18,
                              dynamic_shapes=(dims,), dynamo=True, verbose=False)
        else:
            torch.onnx.export(Wrapped().eval(), (x,), str(path), input_names=["input"], output_names=["out"], opset_version=17,
                              dynamic_axes={"input": axes}, dynamo=False)
    return path


def _float_duplicates(path: Path) -> int:
    """Float initializers (more than one element) byte-identical to an earlier one."""
    seen: set[tuple[int, tuple[int, ...], bytes]] = set()
    dups = 0
    for t in onnx.load(str(path)).graph.initializer:
        arr = onnx.numpy_helper.to_array(t)
        if arr.dtype.kind == "f" and arr.size > 1:
            key = (t.data_type, tuple(t.dims), arr.tobytes())
            dups += key in seen
            seen.add(key)
    return dups


def _share_constants(src: Path, out: Path) -> Path:
    """``src`` with every 32-wide norm parameter and bias read from one initializer (and the 64-wide ones from another),
    as onnxruntime's optimizer leaves the equal (zero) biases of a randomly initialised Hugging Face BERT."""
    m = onnx.load(str(src))
    inits = {t.name: t for t in m.graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    first: dict[tuple[int, ...], str] = {}
    for node in m.graph.node:
        if node.op_type not in ("Add", "LayerNormalization"):
            continue
        for i, read in enumerate(node.input):
            name = aliases.get(read, read)  # the legacy exporter's own sharing: Identity of an equal initializer
            if name in inits and inits[name].data_type == TensorProto.FLOAT and len(inits[name].dims) == 1:
                node.input[i] = first.setdefault(tuple(inits[name].dims), name)
    nodes = [n for n in m.graph.node if n.op_type != "Identity" or n.output[0] not in aliases]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for n in m.graph.node for i in n.input}
    kept = [t for t in m.graph.initializer if t.name in used]
    for i, t in enumerate(kept):  # the shared tensors hold equal values, as a random init's biases and norm scales do
        if t.name in first.values():
            kept[i] = onnx.numpy_helper.from_array(np.full(tuple(t.dims), 1.0 + 1.0 / t.dims[0], np.float32), t.name)
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    onnx.save(m, str(out))
    return out


def test_shared_bias_constants_no_longer_tie_heads_to_the_hidden_stream(tmp_path):
    src = _share_constants(_export("bert", tmp_path / "bert.onnx"), tmp_path / "shared.onnx")
    om = load_onnx(src)
    assert len(om.graph.copies) >= 11, "one norm vector serves as every 32-wide bias and norm parameter"
    coupling = build_groups(om.graph)
    assert len(_head_groups(src, 4)) == 2, [(g.channels, g.frozen) for g in coupling.groups]
    assert len([g for g in coupling.prunable if g.channels == 64]) == 2, "the layers' feed-forward groups stay apart"
    out = tmp_path / "small.onnx"
    _prunes_exactly(src, out)
    assert _float_duplicates(out) == 0, "copies still equal after pruning are one initializer again"


def test_reshape_matches_symbolic_products_and_freezes_static_axes_merged_with_dynamic_ones():
    from graphprune.ops.shape import factorize

    assert factorize(["batch", "seq", 64], ["seq*batch", 64]) == [([0, 1], [0]), ([2], [1])]
    assert factorize(["batch", "seq", 4, 16], ["seq*batch", 64]) == [([0, 1], [0]), ([2, 3], [1])]
    assert factorize(["2*seq*batch", 8], ["batch", 2, "seq", 8]) == [([0], [0, 1, 2]), ([1], [3])]
    assert factorize(["batch", 4], ["4*batch"]) == [([0, 1], [0])]
    assert factorize(["batch", 4], ["seq", 4]) is None
    assert factorize(["batch+1", 4], ["batch+1", 4]) == [([0], [0]), ([1], [1])]
    assert factorize(["N", 6, 2], ["N", 4, 3]) == [([0], [0]), ([1, 2], [1, 2])]  # static runs of non-dividing sizes


def _ort_hf(tmp_path: Path, kind: str, mask: bool = False) -> Path:
    src = _hf_export(kind, tmp_path / f"hf-{kind}.onnx", mask=mask)
    cmd = [sys.executable, "-m", "onnxruntime.transformers.optimizer", "--input", str(src), "--output", str(tmp_path / "ort.onnx"),
           "--model_type", kind, "--num_heads", "4", "--hidden_size", "32"]
    subprocess.run(cmd, check=True, capture_output=True)
    return tmp_path / "ort.onnx"


@pytest.mark.parametrize("kind", ["bert", pytest.param("vit", marks=pytest.mark.slow)])
def test_hugging_face_model_after_the_ort_optimizer_prunes_heads_exactly_and_keeps_fusions(tmp_path, kind):
    src = _ort_hf(tmp_path, kind)
    ops = Counter(n.op_type for n in onnx.load(str(src)).graph.node)
    assert ops["SkipLayerNormalization"] == 4 and ops["BiasGelu"] == 2
    om = load_onnx(src)
    assert om.graph.copies, "the optimizer shares the equal (zero) biases of the random model"
    coupling = build_groups(om.graph)
    assert len(_head_groups(src, 4)) == 2, [(g.channels, g.frozen) for g in coupling.groups]
    assert len([g for g in coupling.prunable if g.channels == 64]) == 2
    out = tmp_path / "small.onnx"
    _prunes_exactly(src, out)
    assert Counter(n.op_type for n in onnx.load(str(out)).graph.node) == ops
    before, after = optimized_ops(src, tmp_path / "a.opt.onnx", ALL), optimized_ops(out, tmp_path / "b.opt.onnx", ALL)
    fused = {k for k in (*before, *after) if k.startswith("com.microsoft:")}
    assert {k: after[k] for k in fused} == {k: before[k] for k in fused}, "onnxruntime fuses the pruned graph as it did the original"
    assert all(after[k] <= before[k] for k in after), "(equal shape vectors of the rewritten reshapes may merge)"


def test_hugging_face_bert_with_its_attention_mask_fuses_attention_and_the_fused_op_loses_whole_heads(tmp_path):
    """With ``attention_mask`` an input, onnxruntime's optimizer fuses each layer into one ``com.microsoft`` Attention
    (packed QKV weight, ``num_heads``) and the embeddings into EmbedLayerNormalization: heads prune through the fused op."""
    src = _ort_hf(tmp_path, "bert", mask=True)
    ops = Counter(n.op_type for n in onnx.load(str(src)).graph.node)
    assert ops["Attention"] == 2 and ops["EmbedLayerNormalization"] == 1 and ops["Softmax"] == 0
    assert len(_head_groups(src, 4)) == 2
    out = tmp_path / "small.onnx"
    _prunes_exactly(src, out)
    pruned = onnx.load(str(out)).graph
    assert Counter(n.op_type for n in pruned.node) == ops, "no op added or lost: the fusions stay"
    heads = [a.i for n in pruned.node if n.op_type == "Attention" for a in n.attribute if a.name == "num_heads"]
    assert heads == [2, 2]
    packed = [list(t.dims) for t in pruned.initializer if t.name.endswith("qkv_weight")]
    assert packed == [[32, 48], [32, 48]], "q, k and v keep 2 heads of 4 each, sliced inside the packed weight"


@pytest.mark.slow
def test_hugging_face_gpt2_dynamo_export_prunes_heads_and_feed_forward_exactly(tmp_path):
    src = _hf_export("gpt2", tmp_path / "hf-gpt2.onnx", dynamo=True)
    coupling = build_groups(load_onnx(src).graph)
    assert len(_head_groups(src, 4)) == 2, [(g.channels, g.frozen) for g in coupling.groups]
    assert len([g for g in coupling.prunable if g.channels == 128]) == 2
    _prunes_exactly(src, tmp_path / "small.onnx")


@pytest.mark.slow
def test_decomposed_attention_key_transpose_folds_into_one_transpose_and_key_value_groups_prune(tmp_path):
    """torch's SDPA decomposition transposes the key through (B*H, S, D): the heads would sit in the dynamic batch axis."""
    src = _export("llama", tmp_path / "llama.onnx", dynamo=True)
    reshapes = Counter(n.op_type for n in onnx.load(str(src)).graph.node)["Reshape"]
    om = load_onnx(src)
    perms = [tuple(n.attrs["perm"]) for n in om.graph.nodes if n.op_type == "Transpose"]
    assert perms.count((0, 1, 3, 2)) == 2 and (0, 2, 1) not in perms, "one Transpose per layer instead of three ops"
    assert len(_head_groups(src, HEADS["llama"])) == 2
    out = tmp_path / "small.onnx"
    _prunes_exactly(src, out)
    assert Counter(n.op_type for n in onnx.load(str(out)).graph.node)["Reshape"] == reshapes - 4
