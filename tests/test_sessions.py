"""onnxruntime sessions: which provider, and a GPU install shadowed by the CPU wheel."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize(("installed", "cuda", "clash"), [
    ({"onnxruntime"}, False, False),
    ({"onnxruntime", "onnxruntime-gpu"}, False, True),
    ({"onnxruntime", "onnxruntime-gpu"}, True, False),
    ({"onnxruntime-gpu"}, True, False),
])
def test_a_shadowed_gpu_install_is_named_with_its_fix(monkeypatch, installed, cuda, clash):
    """Runs everywhere (not a GPU test): the CPU wheel installed over onnxruntime-gpu hides CUDA; say so and how to fix it."""
    from importlib import metadata

    from graphprune.execution import sessions

    def version(name: str) -> str:
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return "1.0"

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"])
    reason = sessions.onnxruntime_clash()
    assert (reason is not None) == clash
    if clash:
        assert sessions.GPU_FIX in reason
