"""``graphprune analyze``: outputs, data errors, Fashion-MNIST hint, torchrun data parallelism."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from graphprune import models
from graphprune.analysis.effective import Analysis
from graphprune.cli import main


def _npz(path, n=96, labels=True, seed=0, shape=models.INPUT_SHAPE):
    rng = np.random.default_rng(seed)
    arrays = {"input": rng.standard_normal((n, *shape)).astype(np.float32)}
    if labels:
        arrays["labels"] = rng.integers(0, 10, n)
    np.savez(path, **arrays)
    return path


def test_analyze_writes_json_plot_and_html(exported, tmp_path, capsys):
    data = _npz(tmp_path / "cal.npz")
    out, png, page = tmp_path / "a.json", tmp_path / "a.png", tmp_path / "a.html"
    assert main(["analyze", str(exported("resnet20")), "--data", str(data), "-o", str(out), "--plot", str(png), "--html", str(page)]) == 0
    text = capsys.readouterr().out
    assert "Effective filters" in text and "maximum compression" in text
    report = json.loads(out.read_text())
    assert report["format"] == "graphprune.analysis/1" and len(report["groups"]) == 12
    assert report["options"]["loss"] == "labels"  # labels present -> task loss by default
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html and "</html>" in html
    assert Analysis.load(out).fisher


def test_unlabelled_data_uses_fisher(exported, tmp_path):
    data = _npz(tmp_path / "cal.npz", labels=False)
    out = tmp_path / "a.json"
    assert main(["analyze", str(exported("vgg")), "--data", str(data), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["options"]["loss"] == "fisher"


@pytest.mark.parametrize(
    "kind,message",
    [("nan", "NaN"), ("shape", "sample shape"), ("few", "at least 2 samples"), ("name", "named after"), ("labels", "labels")],
)
def test_bad_data_is_a_one_line_error(exported, tmp_path, capsys, kind, message):
    path = tmp_path / "bad.npz"
    x = np.zeros((8, *models.INPUT_SHAPE), np.float32)
    arrays = {"input": x}
    if kind == "nan":
        x[0, 0, 0, 0] = np.nan
    elif kind == "shape":
        arrays = {"input": np.zeros((8, 3, 28, 28), np.float32)}
    elif kind == "few":
        arrays = {"input": x[:1]}
    elif kind == "name":
        arrays = {"a": x, "b": x}
    else:
        arrays = {"input": x, "labels": np.zeros(7, np.int64)}
    np.savez(path, **arrays)
    assert main(["analyze", str(exported("vgg")), "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_labels_loss_without_labels_is_refused(exported, tmp_path, capsys):
    data = _npz(tmp_path / "cal.npz", labels=False)
    assert main(["analyze", str(exported("vgg")), "--data", str(data), "--loss", "labels"]) == 2
    assert "--loss fisher" in capsys.readouterr().err


def test_missing_fashion_mnist_says_how_to_install(exported, tmp_path, capsys):
    env = {**os.environ, "GRAPHPRUNE_FASHION_MNIST": str(tmp_path / "none")}
    proc = subprocess.run(
        [sys.executable, "-m", "graphprune.cli", "analyze", str(exported("vgg")), "--data", "fashion-mnist"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert "apt-get install -y dataset-fashion-mnist" in proc.stderr and "Traceback" not in proc.stderr


def test_image_folder(exported, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    out = tmp_path / "a.json"
    args = ["analyze", str(exported("vgg")), "--data", str(tmp_path / "imgs"), "--mean", "0.5", "--std", "0.25", "-o", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["samples"] == 12 and report["options"]["loss"] == "labels"


def test_torchrun_two_processes_equal_one(exported, tmp_path):
    """Each rank reads its shard; the all-reduced F equals the single-process F (up to the
    float32 rounding of forward passes over differently composed batches)."""
    model = str(exported("seresnet"))
    data = _npz(tmp_path / "cal.npz", n=80, labels=False)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["analyze", model, "--data", str(data), "--batch-size", "16", "-o", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "graphprune.cli", "analyze", model, "--data", str(data), "--batch-size", "16", "-o", str(two)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = Analysis.load(one), Analysis.load(two)
    assert [g.effective for g in a.groups] == [g.effective for g in b.groups]
    assert a.samples == b.samples == 80
    for gid, gf in a.fisher.items():
        tol = 1e-6 * np.abs(gf.f).max()
        np.testing.assert_allclose(b.fisher[gid].f, gf.f, rtol=1e-5, atol=tol)
        np.testing.assert_allclose(b.fisher[gid].halves[0], gf.halves[0], rtol=1e-5, atol=tol)
