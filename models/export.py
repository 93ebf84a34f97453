"""Export a torch model to ONNX with a dynamic batch dimension."""
from __future__ import annotations

import os
import warnings
from typing import Literal

import torch
from torch import nn

__all__ = ["export_onnx", "export_tokens"]


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_shape: tuple[int, ...] = (1, 28, 28),
    opset: int = 17,
    bn: Literal["keep", "fold"] = "fold",
    dynamo: bool = False,
) -> None:
    """Write ``model`` to ``path`` as ONNX.

    Args:
        model: The module (put in eval mode here).
        path: Output file.
        input_shape: Shape of one sample (the batch dimension is dynamic).
        opset: ONNX opset.
        bn: ``fold`` merges BatchNorm into the preceding conv (the usual eval
            export; with dynamo, folded in torch first by ``torch.fx``);
            ``keep`` leaves BatchNormalization nodes in the graph.
        dynamo: Use the torch.export-based exporter instead of TorchScript.
    """
    model = model.eval()
    x = torch.randn(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            if bn == "fold":
                model = _fold_batch_norm(model)
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(
                model, (x,), str(path), opset_version=opset, input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
            )
            return
        mode = torch.onnx.TrainingMode.PRESERVE if bn == "keep" else torch.onnx.TrainingMode.EVAL
        torch.onnx.export(
            model, (x,), str(path), opset_version=opset, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, training=mode,
            do_constant_folding=bn == "fold", dynamo=False,
        )


def _fold_batch_norm(model: nn.Module) -> nn.Module:
    """Conv + BatchNorm pairs fused in torch (``torch.fx`` tracing); a model without BN is returned as is."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    return fuse(model)


def export_tokens(
    model: nn.Module,
    path: str | os.PathLike[str],
    seq: int = 8,
    vocab: int = 64,
    opset: int = 17,
    dynamo: bool = False,
    max_seq: int = 64,
) -> None:
    """Write a token-input model (``(N, L)`` int64 ids -> ``logits``) with dynamic batch and sequence length.

    Args:
        model: The module (put in eval mode here).
        path: Output file.
        seq: Sequence length of the example input.
        vocab: Token ids of the example are drawn below this.
        opset: ONNX opset.
        dynamo: Use the torch.export-based exporter instead of TorchScript.
        max_seq: Largest sequence length the dynamo export allows (the models' context).
    """
    model = model.eval()
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("seq", min=2, max=max_seq)}
            torch.onnx.export(
                model, (ids,), str(path), opset_version=opset, input_names=["input_ids"], output_names=["logits"],
                dynamic_shapes=(dims,), dynamo=True, verbose=False,
            )
            return
        out_axes = {0: "batch", 1: "seq"} if _per_token(model, ids) else {0: "batch"}
        torch.onnx.export(
            model, (ids,), str(path), opset_version=opset, input_names=["input_ids"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": out_axes}, dynamo=False,
        )


def _per_token(model: nn.Module, ids: torch.Tensor) -> bool:
    """Whether the output has a sequence axis (an LM) or not (a classifier)."""
    with torch.no_grad():
        out = model(ids)
    return out.dim() == 3
