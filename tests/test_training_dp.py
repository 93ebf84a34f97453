"""Data-parallel fit: two gloo ranks train exactly like one process (no BatchNorm, equal shards)."""
from __future__ import annotations

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

from graphprune.data import Calibration
from graphprune.training import FitOptions, fit


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _data() -> Calibration:
    rng = np.random.default_rng(0)
    return Calibration((rng.standard_normal((64, 1, 4, 4)).astype(np.float32),), rng.integers(0, 3, 64), "x")


OPTIONS = FitOptions(epochs=2, lr=0.1, batch_size=16, weight_decay=0.0)


def _worker(rank: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = _model()
    fit(model, _data(), OPTIONS)
    if rank == 0:
        torch.save(model.state_dict(), out)
    torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
    torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    single = _model()
    fit(single, _data(), OPTIONS)
    out = tmp_path / "dp.pt"
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    dp = torch.load(out, weights_only=True)
    for name, value in single.state_dict().items():
        np.testing.assert_allclose(dp[name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6)
