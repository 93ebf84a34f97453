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


class _Counting:
    """A stand-in session whose every run takes ``ms`` and is counted."""

    def __init__(self, ms: float) -> None:
        self.ms, self.calls = ms, 0

    def run(self, outputs, feeds):
        import time

        self.calls += 1
        end = time.perf_counter() + self.ms / 1e3
        while time.perf_counter() < end:
            pass


def test_sub_millisecond_models_are_timed_for_a_minimum_time_not_a_run_count():
    from graphprune.execution.sessions import measure_latency

    fast = _Counting(0.05)
    ms = measure_latency(fast, {}, runs=5, warmup=2, min_ms=10.0)
    # 10 ms of warm-up and 10 ms of timing at 0.05 ms a run: far more than the 7 runs asked for
    assert fast.calls >= 2 * 100 and ms == pytest.approx(0.05, rel=0.5, abs=0.05)
    slow = _Counting(4.0)
    measure_latency(slow, {}, runs=5, warmup=2, min_ms=10.0)
    assert slow.calls == 3 + 5  # warm-up reaches 10 ms on its 3rd run; 5 timed runs outlast 10 ms
