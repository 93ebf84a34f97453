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


class _Opened:
    """A stand-in :data:`~graphprune.execution.timing.Runner`: every run takes ``ms`` times the machine's slowdown,
    which grows with every run of any variant (a machine whose load rises during the measurement)."""

    def __init__(self, ms: float, machine: dict, name: str, opened: list) -> None:
        self.ms, self.machine, self.name, self.opened = ms, machine, name, opened

    def __call__(self):
        import contextlib

        self.opened.append(self.name)
        return contextlib.nullcontext(self.run)

    def run(self) -> None:
        import time

        self.machine["runs"] += 1
        end = time.perf_counter() + self.ms * (1 + self.machine["runs"] / self.machine["per_doubling"]) / 1e3
        while time.perf_counter() < end:
            pass


def test_interleaved_rounds_open_each_variant_in_turn_from_a_rotating_start():
    from graphprune.execution.timing import interleaved_ms

    machine, opened = {"runs": 0, "per_doubling": 1e12}, []
    ms = interleaved_ms([_Opened(0.2, machine, "a", opened), _Opened(1.0, machine, "b", opened), _Opened(0.2, machine, "c", opened)],
                        rounds=4, per_round=3, warmup=1, min_ms=1.0)
    assert opened == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert ms[1] / ms[0] == pytest.approx(5.0, rel=0.3) and ms[0] == pytest.approx(ms[2], rel=0.3)


def test_side_by_side_timing_is_not_skewed_by_a_load_that_rises_during_the_measurement():
    """Two identical models on a machine that slows down as it runs: timed one after the other, the second looks
    slower; interleaved, they tie (the never-slower check and validation compare models this way)."""
    from graphprune.execution.timing import interleaved_ms, median_ms

    machine, opened = {"runs": 0, "per_doubling": 400}, []
    a, b = _Opened(0.05, machine, "a", opened), _Opened(0.05, machine, "b", opened)
    with a() as run_a:
        alone_a = median_ms(run_a, runs=200, warmup=0, min_ms=0)
    with b() as run_b:
        alone_b = median_ms(run_b, runs=200, warmup=0, min_ms=0)
    assert alone_b / alone_a > 1.2, "the planted drift"
    machine["runs"] = 0
    first, second = interleaved_ms([a, b], rounds=20, per_round=10, warmup=0, min_ms=0)
    assert second / first == pytest.approx(1.0, abs=0.08)


def test_side_by_side_times_real_models_and_refuses_a_setting_before_timing(exported):
    import torch

    from graphprune import models
    from graphprune.backends.onnx_model import load_onnx_model
    from graphprune.backends.torch_model import module_model
    from graphprune.errors import BadInputError
    from graphprune.execution.timing import side_by_side_ms
    from graphprune.ir.model import Int8Form

    onnx = load_onnx_model(exported("resnet20"))
    ms = side_by_side_ms([onnx, onnx], 2, runs=2, threads=1)
    assert len(ms) == 2 and all(0 < m < 1e4 for m in ms)
    module = module_model(models.build("resnet20"), [torch.zeros(1, *models.INPUT_SHAPE)])
    assert all(m > 0 for m in side_by_side_ms([module], 2, runs=2))
    with pytest.raises(BadInputError, match="int8 latency is measured on onnxruntime"):
        side_by_side_ms([onnx, module], 1, runs=2, quantized=Int8Form())
