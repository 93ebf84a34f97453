"""Shared checks for pruned torch modules: one optimizer step, and an ONNX export that matches the module."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from graphprune.execution.sessions import make_session


def step_changes(module: nn.Module, x: torch.Tensor, lr: float, loss: Callable[[torch.Tensor], torch.Tensor] = torch.sum) -> list[bool]:
    """One SGD step in train mode on ``loss(module(x))``; per parameter, whether it changed. Leaves the module in eval mode."""
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    before = [p.detach().clone() for p in module.parameters()]
    loss(module(x)).backward()
    opt.step()
    module.eval()
    return [not torch.equal(a, b) for a, b in zip(before, module.parameters())]


def assert_export_matches(module: nn.Module, example: torch.Tensor, x: torch.Tensor, path: Path) -> None:
    """The TorchScript ONNX export (dynamic batch) gives the module's outputs on onnxruntime."""
    torch.onnx.export(module, (example,), str(path), input_names=["input"], dynamo=False, dynamic_axes={"input": {0: "batch"}})
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(make_session(str(path)).run(None, {"input": x.numpy()})[0], want, rtol=1e-4, atol=1e-5)
