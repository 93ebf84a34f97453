"""The torch interpreter of channel graphs: onnxruntime parity, gradients, training mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from graphprune import models
from graphprune.errors import UnsupportedOpError
from graphprune.execution.interpreter import GraphInterpreter
from graphprune.execution.sessions import make_session
from graphprune.frontends.onnx import load_onnx


def _x(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *models.INPUT_SHAPE)).astype(np.float32)


def _ort(path, x: np.ndarray) -> np.ndarray:
    session = make_session(str(path))
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", models.SMALL_MODELS)
@pytest.mark.parametrize("opset,bn", [(13, "fold"), (17, "keep")])
def test_matches_onnxruntime(exported, name, opset, bn):
    path = exported(name, opset, bn)
    interp = GraphInterpreter(load_onnx(path).graph).eval()
    x = _x()
    with torch.no_grad():
        got = interp(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, _ort(path, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "shufflenetv2", "vit"])
def test_matches_onnxruntime_dynamo_export(tmp_path, name):
    path = tmp_path / f"{name}.onnx"
    models.export_onnx(models.build(name), path, opset=18, dynamo=True)
    interp = GraphInterpreter(load_onnx(path).graph).eval()
    x = _x(seed=1)
    with torch.no_grad():
        got = interp(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, _ort(path, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet20", "vit", "densenet"])
def test_gradients_match_the_torch_module(exported, name):
    module = models.build(name)
    interp = GraphInterpreter(load_onnx(exported(name, 17, "keep")).graph).eval()
    x = torch.from_numpy(_x(4))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (module(xa) ** 2).sum().backward()
    (interp(xb)[0] ** 2).sum().backward()
    np.testing.assert_allclose(xb.grad.numpy(), xa.grad.numpy(), rtol=1e-3, atol=1e-6)


def test_weights_are_parameters_and_train(exported):
    interp = GraphInterpreter(load_onnx(exported("vgg", 17, "keep")).graph)
    params = list(interp.parameters())
    assert params and all(p.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    interp.train()
    interp(torch.from_numpy(_x(8)))[0].sum().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_batchnorm_training_mode_matches_torch(exported):
    module = models.build("resnet20").train()
    interp = GraphInterpreter(load_onnx(exported("resnet20", 17, "keep")).graph).train()
    x = torch.from_numpy(_x(8))
    with torch.no_grad():
        want, got = module(x), interp(x)[0]
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    mean = dict(interp.named_constants())["blocks.0.body.0.1.running_mean"]
    np.testing.assert_allclose(mean.numpy(), module.blocks[0].body[0][1].running_mean.numpy(), rtol=1e-5, atol=1e-6)


def test_unsupported_op_is_named(tmp_path):
    import onnx
    from onnx import helper

    node = helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->ij")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])],
    )
    path = tmp_path / "einsum.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(UnsupportedOpError, match="Einsum"):
        GraphInterpreter(load_onnx(path).graph)


@pytest.mark.parametrize(("opset", "bounds"), [
    (13, (-0.5, 0.7)), (13, (-0.5, None)), (13, (None, 0.7)), (13, (None, None)), (6, (-0.5, 0.7)), (6, (None, 0.2)),
])
def test_clip_matches_onnxruntime(tmp_path, opset, bounds):
    """Clip with both, one or no bound, as inputs (opset 11 on) or attributes (before)."""
    import onnx
    from onnx import TensorProto, helper

    lo, hi = bounds
    inits, names, attrs = [], ["x"], {}
    if opset >= 11:
        for tag, v in (("lo", lo), ("hi", hi)):
            names.append("" if v is None else tag)
            if v is not None:
                inits.append(helper.make_tensor(tag, TensorProto.FLOAT, [], [v]))
        while names[-1] == "":
            names.pop()
    else:
        attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
    graph = helper.make_graph([helper.make_node("Clip", names, ["y"], **attrs)], "clip",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])], inits)
    path = tmp_path / "clip.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8), path)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    with torch.no_grad():
        got = GraphInterpreter(load_onnx(path).graph).eval()(torch.from_numpy(x))[0].numpy()
    np.testing.assert_array_equal(got, _ort(path, x))
