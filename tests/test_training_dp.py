"""Data-parallel fit: two gloo ranks train exactly like one process (no BatchNorm, equal shards)."""
from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

from graphprune.execution.distributed import process_group
from graphprune.execution.training import FitOptions, fit
from graphprune.frontends.data import Calibration


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _data() -> Calibration:
    rng = np.random.default_rng(0)
    return Calibration((rng.standard_normal((64, 1, 4, 4)).astype(np.float32),), rng.integers(0, 3, 64), "x")


OPTIONS = FitOptions(epochs=2, lr=0.1, batch_size=16, weight_decay=0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    """One rank as torchrun would start it: the process group comes from the environment."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with process_group():
        model = _model()
        fit(model, _data(), OPTIONS)
        if rank == 0:
            torch.save(model.state_dict(), out)


def test_two_ranks_equal_one_process(tmp_path):
    single = _model()
    fit(single, _data(), OPTIONS)
    out = tmp_path / "dp.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    dp = torch.load(out, weights_only=True)
    for name, value in single.state_dict().items():
        np.testing.assert_allclose(dp[name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6)
