"""Pipelines: shipped TOML files, validation before work, passes in Python, `graphprune run` end to end."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphprune import models
from graphprune.backends.onnx_model import OnnxPrunable
from graphprune.cli import main
from graphprune.errors import BadInputError
from graphprune.frontends.onnx import load_onnx
from graphprune.pipeline.config import load_pipeline, parse_pipeline, run_passes
from graphprune.pipeline.passes import PASSES, Workspace

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["hierarchical", "magnitude", "taylor", "uniform"])
def test_shipped_pipelines_load(name):
    p = load_pipeline(ROOT / "passes" / f"{name}.toml")
    assert p.names[-3:] == ("finetune", "validate", "report") and "rewrite" in p.names


@pytest.mark.parametrize(
    "data,message",
    [
        ({"pass": [{"name": "nope"}]}, "unknown pass 'nope'"),
        ({"pass": [{"name": "plan", "macs": 0.5, "speed": 2}]}, "has no parameter 'speed'"),
        ({"pass": [{"name": "plan", "method": "uniform", "criterion": "l1", "macs": "half"}]}, "must be float"),
        ({"pass": [{"name": "plan", "method": "uniform", "criterion": "l1", "macs": 1.5}]}, "must be in (0, 1)"),
        ({"pass": [{"name": "plan", "method": "uniform", "criterion": "l1", "macs": 0.5, "ratio": 0.5}]}, "one target"),
        ({"pass": [{"name": "plan", "macs": 0.5}]}, "needs an analyze pass"),
        ({"pass": [{"name": "rewrite"}]}, "needs a plan pass"),
        ({"pass": [{"name": "finetune", "epochs": 0}]}, "epochs > 0"),
        ({"pass": [{"name": "rewrite", "verify": 1}]}, "must be bool"),
        ({"pipeline": {"name": "x"}, "extra": {}, "pass": [{"name": "report"}]}, "unknown table"),
        ({"pipeline": {"name": "x"}}, "no passes"),
    ],
)
def test_invalid_pipelines_are_refused(data, message):
    with pytest.raises(BadInputError) as info:
        parse_pipeline(data)
    assert message in str(info.value)


def _npz(path: Path, n: int = 96) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.standard_normal((n, *models.INPUT_SHAPE)).astype(np.float32), labels=rng.integers(0, 10, n))
    return path


def test_invalid_pipeline_fails_before_any_work(exported, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[pass]]\nname = "plan"\nmacs = 0.5\nmetod = "x"\n')
    out = tmp_path / "o.onnx"
    assert main(["run", str(bad), "--model", str(exported("vgg")), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no parameter 'metod'" in err and err.count("\n") == 1 and not out.exists()
    broken = tmp_path / "broken.toml"
    broken.write_text("[[pass]\n")
    assert main(["run", str(broken), "--model", str(exported("vgg")), "-o", str(out)]) == 2
    assert main(["run", str(ROOT / "passes/uniform.toml"), "--model", str(exported("vgg")), "-o", str(out), "--set", "plan.macs"]) == 2


def test_run_hierarchical_end_to_end(exported, tmp_path, capsys):
    data = _npz(tmp_path / "cal.npz")
    out = tmp_path / "small.onnx"
    args = ["run", str(ROOT / "passes/hierarchical.toml"), "--model", str(exported("resnet20")), "--data", str(data),
            "--eval-data", str(data), "-o", str(out), "--set", "plan.macs=0.6", "--set", "finetune.epochs=0.3",
            "--set", "validate.latency_runs=3", "--set", "plan.allow_over_limit=true"]  # random labels: no quality to keep
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "before / after" in text and "exact after rewrite" in text
    onnx.checker.check_model(str(out), full_check=True)
    report = json.loads((tmp_path / "small.report.json").read_text())
    f = report["figures"]
    assert f["after"]["macs"] <= 0.6 * f["before"]["macs"] and f["after"]["accuracy"] is not None
    assert report["plan_meta"]["method"] == "hierarchical" and report["analysis"]["groups"]
    html = (tmp_path / "small.report.html").read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html and "before" in html


def test_run_over_limit_exits_4_and_writes_nothing(exported, tmp_path, capsys):
    data = tmp_path / "cal.npz"  # unlabelled: the limit keeps agreement with the original (random labels keep nothing)
    np.savez(data, input=np.random.default_rng(0).standard_normal((96, *models.INPUT_SHAPE)).astype(np.float32))
    out = tmp_path / "small.onnx"
    args = ["run", str(ROOT / "passes/hierarchical.toml"), "--model", str(exported("vgg")), "--data", str(data),
            "-o", str(out), "--set", "analyze.eps=0.0", "--set", "plan.macs=0.01"]
    assert main(args) == 4
    assert "beyond the estimated maximum compression" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.report.*"))


def test_passes_compose_in_python(exported, tmp_path):
    from graphprune.frontends.data import Calibration

    om = OnnxPrunable(load_onnx(exported("seresnet")))
    x = np.random.default_rng(1).standard_normal((64, *models.INPUT_SHAPE)).astype(np.float32)
    ws = Workspace(original=om, model=om, data=Calibration((x,), None, "random"))
    seen = []
    pipeline = parse_pipeline({"pass": [{"name": "analyze", "samples": 64}, {"name": "plan", "ratio": 0.3},
                                        {"name": "rewrite"}, {"name": "finetune", "epochs": 0.5}]})
    ws = run_passes(pipeline, ws, lambda p, r: seen.append((p.name, r.modified)))
    assert seen == [("analyze", False), ("plan", False), ("rewrite", True), ("finetune", True)]
    assert ws.model is not om and ws.exact_max_abs_error is not None and ws.exact_max_abs_error < 1e-4
    assert set(PASSES) == {"analyze", "limit", "profile", "plan", "compensate", "rewrite", "repair", "hidden", "finetune", "quantize", "validate", "report"}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(exported, tmp_path):
    data = _npz(tmp_path / "cal.npz")
    out = tmp_path / "small.onnx"
    assert main(["run", str(ROOT / "passes/hierarchical.toml"), "--model", str(exported("vgg")), "--data", str(data),
                 "--eval-data", str(data), "-o", str(out), "--set", "finetune.epochs=0.2", "--set", "validate.latency_runs=2"]) == 0
    page = tmp_path / "small.report.html"
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-500:]
    from PIL import Image

    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"))
    assert pixels.shape[0] >= 800 and pixels.std() > 10  # not a blank page
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False).stdout
    assert "estimated maximum compression" in dom and "<img" in dom


def test_prune_cli_targets_and_methods(exported, tmp_path, capsys):
    out, plan = tmp_path / "g.onnx", tmp_path / "plan.json"
    assert main(["prune", str(exported("resnet20")), "-o", str(out), "--macs", "0.4", "--method", "global", "--criterion", "l2",
                 "--latency-runs", "0", "--plan-out", str(plan)]) == 0
    report = json.loads((tmp_path / "g.report.json").read_text())
    assert report["figures"]["after"]["macs"] <= 0.4 * report["figures"]["before"]["macs"]
    assert json.loads(plan.read_text())["meta"]["method"] == "global"
    data = _npz(tmp_path / "cal.npz")
    assert main(["prune", str(exported("resnet20")), "-o", str(tmp_path / "h.onnx"), "--macs", "0.02", "--data", str(data), "--latency-runs", "0"]) == 4
    assert "--allow-over-limit" in capsys.readouterr().err and not (tmp_path / "h.onnx").exists()
    assert main(["prune", str(exported("resnet20")), "-o", str(tmp_path / "h.onnx"), "--macs", "0.02", "--data", str(data),
                 "--allow-over-limit", "--latency-runs", "0"]) == 0
    assert main(["prune", str(exported("resnet20")), "-o", str(tmp_path / "t.onnx"), "--criterion", "taylor"]) == 2


def test_run_under_torchrun_two_processes(exported, tmp_path):
    """Data-parallel fine-tuning: both ranks run, rank 0 alone validates and writes."""
    import os
    import sys

    data = _npz(tmp_path / "cal.npz", n=64)
    out = tmp_path / "dp.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "graphprune.cli",
         "run", str(ROOT / "passes/uniform.toml"), "--model", str(exported("vgg")), "--data", str(data), "-o", str(out),
         "--set", "finetune.epochs=1", "--set", "finetune.batch_size=16", "--set", "validate.latency_runs=0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote ") == 1
    onnx.checker.check_model(str(out), full_check=True)
    assert (tmp_path / "dp.report.json").exists()
