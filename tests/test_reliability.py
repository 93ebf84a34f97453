"""Real-world ONNX files: every exporter and opset, dynamic shapes, constructs that must freeze, large external data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from graphprune import models
from graphprune.coupling.groups import build_groups
from graphprune.frontends.onnx import load_onnx
from graphprune.pipeline.run import prune_file

# (exporter, opset, bn): the oldest opset the reference models export at and the newest of each exporter, with
# batch norms kept; folded into the convolutions at the oldest only (the fold removes ops, the newest opsets'
# versions of the rest are covered with them kept).
EXPORTS = [("legacy", 11, "keep"), ("legacy", 11, "fold"), ("legacy", 20, "keep"),
           ("dynamo", 18, "keep"), ("dynamo", 18, "fold"), ("dynamo", 23, "keep")]


def _prune_exact(src: Path, tmp: Path, ratio: float = 0.5):
    result = prune_file(src, tmp / f"{src.stem}.pruned.onnx", ratio=ratio, verify=True, latency_runs=0)
    assert result.validation.exact is True
    onnx.checker.check_model(str(result.output), full_check=True)
    return result


@pytest.mark.parametrize("exporter,opset,bn", EXPORTS)
@pytest.mark.parametrize("name", models.SMALL_MODELS)
def test_every_exporter_and_opset_prunes_exactly(tmp_path, name, exporter, opset, bn):
    src = tmp_path / f"{name}.onnx"
    models.export_onnx(models.build(name), src, opset=opset, bn=bn, dynamo=exporter == "dynamo")
    result = _prune_exact(src, tmp_path)
    assert result.plan.groups and result.after.macs < result.before.macs


def test_dynamic_spatial_dims(tmp_path):
    src = tmp_path / "r.onnx"
    torch.onnx.export(models.build("resnet20"), (torch.zeros(2, 1, 28, 28),), str(src), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n"}}, dynamo=False)
    om = load_onnx(src)
    assert om.graph.tensors["input"].shape == ("n", 1, "h", "w")
    _prune_exact(src, tmp_path)


class _TwoInTwoOut(nn.Module):
    """An image and a side vector in; logits and an embedding out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)
        self.side = nn.Linear(5, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)) + self.side(v)
        return self.head(torch.relu(emb)), emb


def test_multiple_inputs_and_outputs(tmp_path):
    src = tmp_path / "multi.onnx"
    torch.onnx.export(_TwoInTwoOut().eval(), (torch.zeros(2, 1, 8, 8), torch.zeros(2, 5)), str(src), input_names=["x", "v"],
                      output_names=["logits", "emb"], dynamic_axes={"x": {0: "n"}, "v": {0: "n"}}, dynamo=False)
    result = _prune_exact(src, tmp_path)
    coupling = result.coupling
    # conv1's channels are free; the embedding is a graph output, so its group freezes
    assert any(g.prunable and g.channels == 8 for g in coupling.groups)
    assert any(not g.prunable and g.channels == 12 and any("graph output" in r for r in g.frozen) for g in coupling.groups)
    assert [o.name for o in onnx.load(str(result.output)).graph.output] == ["logits", "emb"]


def test_no_value_info_shapes_are_inferred(tmp_path):
    src = tmp_path / "r.onnx"
    models.export_onnx(models.build("resnet20"), src, bn="keep")
    proto = onnx.load(str(src))
    del proto.graph.value_info[:]
    onnx.save(proto, str(src))
    _prune_exact(src, tmp_path)


# --- constructs that freeze their channels, never break -------------------------------------------------------------


def _w(name: str, *shape: int, dtype=np.float32, seed: int = 0) -> TensorProto:
    arr = np.random.default_rng(seed + len(name) + sum(shape)).standard_normal(shape).astype(np.float32) * 0.3
    return numpy_helper.from_array(arr.astype(dtype), name)


def _conv_chain(middle: list[onnx.NodeProto], a_out: str, extra_inits: list[TensorProto], extra_inputs=(), dtype=TensorProto.FLOAT,
                np_dtype=np.float32, opset: int = 17) -> onnx.ModelProto:
    """x -> conv a (8 ch) -> [middle: a -> b] -> conv c (6 ch) -> relu -> conv d (4 ch) -> y."""
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1], name="conv_a"), *middle,
             helper.make_node("Conv", [a_out, "wc"], ["c"], pads=[1, 1, 1, 1], name="conv_c"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wd"], ["y"], name="conv_d")]
    inits = [_w("wa", 8, 3, 3, 3, dtype=np_dtype), _w("wc", 6, 8, 3, 3, dtype=np_dtype), _w("wd", 4, 6, 1, 1, dtype=np_dtype),
             *extra_inits]
    inputs = [helper.make_tensor_value_info("x", dtype, ["N", 3, 8, 8]), *extra_inputs]
    graph = helper.make_graph(nodes, "construct", inputs, [helper.make_tensor_value_info("y", dtype, ["N", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _group_of(coupling, anchor: str):
    (g,) = [g for g in coupling.groups if g.anchor == anchor]
    return g


def _body(name: str, inputs, outputs, nodes, inits=()) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, inputs, outputs, list(inits))


def _if_model() -> onnx.ModelProto:
    then = _body("then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)], [helper.make_node("Relu", ["a"], ["t"])])
    other = _body("else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)], [helper.make_node("Neg", ["a"], ["e"])])
    node = helper.make_node("If", ["cond"], ["b"], then_branch=then, else_branch=other, name="if")
    return _conv_chain([node], "b", [], [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])])


def _loop_model() -> onnx.ModelProto:
    body = _body("body", [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                          helper.make_tensor_value_info("s_in", TensorProto.FLOAT, None)],
                 [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)],
                 [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["s_in", "a"], ["s_out"])])
    node = helper.make_node("Loop", ["trips", "", "a"], ["b"], body=body, name="loop")
    return _conv_chain([node], "b", [numpy_helper.from_array(np.array(3, np.int64), "trips")])


def _scan_model() -> onnx.ModelProto:
    body = _body("body", [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, None), helper.make_tensor_value_info("k", TensorProto.FLOAT, [])],
                 [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)], [helper.make_node("Mul", ["s_in", "k"], ["s_out"])])
    node = helper.make_node("Scan", ["a", "ks"], ["b"], body=body, num_scan_inputs=1, name="scan")
    return _conv_chain([node], "b", [numpy_helper.from_array(np.array([0.5, 2.0, 1.5], np.float32), "ks")])


def _qdq_activation_model() -> onnx.ModelProto:
    nodes = [helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["b"], name="dequant")]
    return _conv_chain(nodes, "b", [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])


def _custom_model() -> onnx.ModelProto:
    model = _conv_chain([helper.make_node("Gelu2", ["a"], ["b"], domain="com.example", name="custom")], "b", [])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


CONTROL_FLOW = {"If": _if_model, "Loop": _loop_model, "Scan": _scan_model}


@pytest.mark.parametrize("op", sorted(CONTROL_FLOW))
def test_control_flow_freezes_what_it_touches(tmp_path, op):
    src = _save(CONTROL_FLOW[op](), tmp_path / f"{op}.onnx")
    coupling = build_groups(load_onnx(src).graph)
    frozen = _group_of(coupling, "wa[0]")
    assert not frozen.prunable and any(op in r for r in frozen.frozen), frozen.frozen
    assert _group_of(coupling, "wc[0]").prunable
    if op == "If":  # onnxruntime needs the condition as an input
        result = prune_file(src, tmp_path / "out.onnx", ratio=0.5, latency_runs=0)
        assert result.validation.exact is None
    else:
        result = _prune_exact(src, tmp_path)
    assert [g.anchor for g in result.plan.groups] == ["wc[0]"]


def test_qdq_pair_passes_the_quantized_activation(tmp_path):
    """A per-tensor QDQ pair maps element for element: the channels through it prune, exactly."""
    src = _save(_qdq_activation_model(), tmp_path / "qdq.onnx")
    result = _prune_exact(src, tmp_path)
    assert _group_of(result.coupling, "wa[0]").prunable
    assert [g.anchor for g in result.plan.groups] == ["wa[0]", "wc[0]"]
    out = onnx.load(str(result.output))
    assert {t.name: list(t.dims) for t in out.graph.initializer if t.name in ("s", "z")} == {"s": [], "z": []}


def test_quantized_weights_prune_with_their_conv(tmp_path):
    """int8 weight -> DequantizeLinear -> Conv: the int8 tensor is sliced with the conv's filters and stays int8."""
    wq = numpy_helper.from_array(np.random.default_rng(0).integers(-100, 100, (6, 8, 3, 3)).astype(np.int8), "wq")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wc_f"], name="dq_w")]
    model = _conv_chain(nodes, "a", [wq, numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
                                     numpy_helper.from_array(np.array(0, np.int8), "wz")])
    conv_c = next(n for n in model.graph.node if n.name == "conv_c")
    conv_c.input[1] = "wc_f"
    del model.graph.initializer[[t.name for t in model.graph.initializer].index("wc")]
    src = _save(model, tmp_path / "qw.onnx")
    result = _prune_exact(src, tmp_path)
    assert "wq[0]" in [g.anchor for g in result.plan.groups]
    out = onnx.load(str(result.output))
    (q,) = [t for t in out.graph.initializer if t.name == "wq"]
    assert q.data_type == TensorProto.INT8 and q.dims[0] < 6
    assert {t.name: list(t.dims) for t in out.graph.initializer if t.name in ("ws", "wz")} == {"ws": [], "wz": []}


def test_custom_domain_op_freezes(tmp_path):
    src = _save(_custom_model(), tmp_path / "custom.onnx")
    coupling = build_groups(load_onnx(src).graph)
    frozen = _group_of(coupling, "wa[0]")
    assert not frozen.prunable and any("com.example::Gelu2" in r for r in frozen.frozen)


def test_fp16_weights_keep_their_dtype(tmp_path):
    src = _save(_conv_chain([], "a", [], dtype=TensorProto.FLOAT16, np_dtype=np.float16), tmp_path / "fp16.onnx")
    result = _prune_exact(src, tmp_path)
    assert len(result.plan.groups) == 2
    out = onnx.load(str(result.output))
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def test_bf16_weights_keep_their_dtype(tmp_path):
    """bf16 initializers cast to float at run time (onnxruntime has no bf16 Conv on CPU)."""
    import ml_dtypes

    nodes = [helper.make_node("Cast", ["wc16"], ["wc_f"], to=TensorProto.FLOAT, name="cast_w")]
    wc16 = numpy_helper.from_array(np.random.default_rng(1).standard_normal((6, 8, 3, 3)).astype(ml_dtypes.bfloat16), "wc16")
    model = _conv_chain(nodes, "a", [wc16])
    conv_c = next(n for n in model.graph.node if n.name == "conv_c")
    conv_c.input[1] = "wc_f"
    del model.graph.initializer[[t.name for t in model.graph.initializer].index("wc")]
    src = _save(model, tmp_path / "bf16.onnx")
    result = _prune_exact(src, tmp_path)
    assert {g.anchor for g in result.plan.groups} >= {"wa[0]"}
    out = onnx.load(str(result.output))
    (t,) = [t for t in out.graph.initializer if t.name == "wc16"]
    assert t.data_type == TensorProto.BFLOAT16 and t.dims[1] < 8


def test_shared_initializer_couples_both_convs(tmp_path):
    """One weight read by two convs on two inputs: both convs lose the same filters, the weight is sliced once."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1], name="conv_x"),
             helper.make_node("Conv", ["x2", "w"], ["b"], pads=[1, 1, 1, 1], name="conv_x2"),
             helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Conv", ["ra", "wy"], ["y"], name="head_a"), helper.make_node("Conv", ["rb", "wz"], ["z"], name="head_b")]
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 8, 8]) for n in ("x", "x2")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4, 8, 8]) for n in ("y", "z")],
        [_w("w", 8, 3, 3, 3), _w("wy", 4, 8, 1, 1), _w("wz", 4, 8, 1, 1)])
    src = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "shared.onnx")
    result = _prune_exact(src, tmp_path)
    (g,) = result.plan.groups
    assert {m.tensor for m in result.coupling.by_id(g.group).members} >= {"w", "a", "b", "wy", "wz"}
    out = onnx.load(str(result.output))
    assert [list(t.dims) for t in out.graph.initializer if t.name == "w"] == [[len(g.keep), 3, 3, 3]]


def test_runtime_weights_freeze(tmp_path):
    """A conv weight fed at run time cannot be sliced: its channels freeze with the reason."""
    model = _conv_chain([], "a", [], [helper.make_tensor_value_info("wc_in", TensorProto.FLOAT, [6, 8, 3, 3])])
    conv_c = next(n for n in model.graph.node if n.name == "conv_c")
    conv_c.input[1] = "wc_in"
    del model.graph.initializer[[t.name for t in model.graph.initializer].index("wc")]
    src = _save(model, tmp_path / "runtime.onnx")
    coupling = build_groups(load_onnx(src).graph)
    for anchor in ("wa[0]", "wd[0]"):
        assert _group_of(coupling, anchor).prunable is False or anchor == "wd[0]"
    frozen = [g for g in coupling.groups if not g.prunable]
    assert any("input" in r for g in frozen for r in g.frozen), [g.frozen for g in frozen]
    result = _prune_exact(src, tmp_path)
    assert all("wc_in" not in {m.tensor for m in result.coupling.by_id(g.group).members} for g in result.plan.groups)


# --- large models with external data --------------------------------------------------------------------------------


def test_external_data_model_prunes_with_bounded_memory(tmp_path):
    """A 0.25 GB external-data model: groups and pruning in a fresh process, peak RSS under 3x the weights."""
    from large_model import write_wide_model

    size = write_wide_model(tmp_path / "wide.onnx", width=2048, layers=15)
    script = (
        "import json, resource, sys; from pathlib import Path; "
        "from graphprune.pipeline.run import prune_file; "
        "r = prune_file(Path(sys.argv[1]), Path(sys.argv[2]), ratio=0.5, latency_runs=0); "
        "print(json.dumps({'peak': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'groups': len(r.plan.groups)}))"
    )
    base = json.loads(subprocess.run([sys.executable, "-c", "import json, resource; import graphprune.backends.onnx_model; "
                                      "print(json.dumps({'peak': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))"],
                                     check=True, capture_output=True, text=True).stdout)["peak"]
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "wide.onnx"), str(tmp_path / "out.onnx")],
                         check=True, capture_output=True, text=True)
    figures = json.loads(out.stdout)
    assert figures["groups"] == 15
    assert figures["peak"] - base < 1.5 * size, (figures["peak"] - base) / size  # issue 8 asks for well under 3x
    assert (tmp_path / "out.onnx.data").exists(), "an external-data input gives an external-data output"


# --- no data loss ---------------------------------------------------------------------------------------------------


def _folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} | {
        p.name + "/": b"" for p in folder.iterdir() if p.is_dir()}


@pytest.mark.parametrize("when", ["save", "validate"])
@pytest.mark.parametrize("signal", [KeyboardInterrupt, RuntimeError])
def test_interrupt_or_crash_mid_write_leaves_nothing(tmp_path, monkeypatch, capsys, when, signal):
    """Ctrl-C (or a crash) while the output is written or validated: the input is intact, the old output kept,
    no partial file or staging folder is left."""
    import graphprune.backends.onnx_model
    import graphprune.io
    from graphprune.cli import main

    src = tmp_path / "m.onnx"
    models.export_onnx(models.build("vgg"), src)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")
    before = _folder_state(tmp_path)

    real_save = graphprune.io.save_onnx

    def save_then_fail(model, path, external=False):
        real_save(model, path, external)
        with open(path, "r+b") as f:  # a half-written file
            f.truncate(100)
        raise signal("stop")

    def fail(*a, **k):
        raise signal("stop")

    if when == "save":
        monkeypatch.setattr(graphprune.backends.onnx_model, "save_onnx", save_then_fail)
    else:
        monkeypatch.setattr(graphprune.backends.onnx_model, "validate_pruned", fail)
    code = main(["prune", str(src), "-o", str(out), "--force", "--latency-runs", "0"])
    assert code == (130 if signal is KeyboardInterrupt else 1)
    assert _folder_state(tmp_path) == before
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_sigint_to_a_running_prune_leaves_nothing(tmp_path):
    """A real SIGINT to a CLI process that is validating its staged output (held there until the signal)."""
    import signal as sig
    import time

    src = tmp_path / "m.onnx"
    models.export_onnx(models.build("resnet20"), src)
    out = tmp_path / "out.onnx"
    marker = tmp_path.parent / f"{tmp_path.name}.validating"
    before = _folder_state(tmp_path)
    hold = (  # validation waits for the signal, so the interrupt lands while the staged file exists
        "import signal, sys, time, pathlib, graphprune.backends.onnx_model as op; real = op.validate_pruned\n"
        # a terminal's Ctrl-C: restore Python's handler, which a shell ignoring SIGINT for background jobs turns off
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "def slow(*a, **k):\n    pathlib.Path(sys.argv[1]).touch(); time.sleep(120); return real(*a, **k)\n"
        "op.validate_pruned = slow\n"
        "from graphprune.cli import main; sys.exit(main(sys.argv[2:]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", hold, str(marker), "prune", str(src), "-o", str(out), "--latency-runs", "0"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists() and any(p.name.startswith(".out.onnx.") for p in tmp_path.iterdir()), "staged output expected"
    proc.send_signal(sig.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted; nothing was written" in err and "Traceback" not in err
    assert _folder_state(tmp_path) == before
