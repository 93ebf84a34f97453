"""Predicted against measured latency of `--latency X` plans (random-weight ResNet, random-data analysis).

Run: python benchmarks/latency_targets.py [--depth 20] [--targets 0.8 0.6 0.4] [--batch 32] [--threads 2]
The profile pass tabulates every group from one channel up (below_floors); each target is planned against the
latency model, measured once by the plan's never-slower check, then timed once more (measure_plan_error).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from graphprune import models
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.execution.latency_tables import measure_plan_error
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import load_onnx
from graphprune.pipeline.passes import AnalyzePass, AnalyzePassOptions, PlanPass, ProfileOptions, ProfilePass
from graphprune.pipeline.workspace import Workspace
from graphprune.planning.options import PlanOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (1, 28, 28)
    path = Path(tempfile.mkdtemp()) / "m.onnx"
    models.export_onnx(models.ResNetCifar(depth=args.depth).eval(), path, shape, bn="fold")
    om = OnnxPrunable(load_onnx(path))
    x = np.random.default_rng(0).standard_normal((256, *shape)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, 256)
    ws = Workspace(original=om, model=om, data=Calibration((x,), y, "random"))
    ws = AnalyzePass(AnalyzePassOptions(samples=256, loss="labels"))(ws).workspace
    ws = ProfilePass(ProfileOptions(batch=args.batch, threads=args.threads, runs=5, model_runs=15, below_floors=True))(ws).workspace
    lm = ws.latency
    assert lm is not None
    for target in args.targets:
        plan = PlanPass(PlanOptions(latency=target, latency_runs=15, allow_over_limit=True))(ws).workspace.plan
        assert plan is not None
        keep = {g.group: len(g.keep) for g in plan.groups}
        _, measured, error = measure_plan_error(om.om, ws.groups(), lm, keep)
        print(f"target {target}: predicted {plan.meta['predicted_ms'] / lm.original_ms:.3f}, plan check "
              f"{plan.meta.get('measured_latency', float('nan')):.3f}, timed again {measured / lm.original_ms:.3f} ({error:+.1%})")


if __name__ == "__main__":
    main()
