"""CLI behaviour: tables, JSON, plans, exit codes on bad input, no overwrite."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from graphprune.cli import main


def run(*args: str) -> int:
    return main(list(args))


def test_groups_table_and_json(exported, tmp_path, capsys):
    out = tmp_path / "groups.json"
    assert run("groups", str(exported("resnet20")), "--json", str(out)) == 0
    assert "13 groups: 12 prunable, 1 frozen" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["prunable"] == 12 and len(data["groups"]) == 13


def test_prune_writes_plan_and_applies_it(exported, tmp_path):
    src = exported("vgg")
    a, b, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    assert run("prune", str(src), "-o", str(a), "--ratio", "0.5", "--verify", "--plan-out", str(plan), "--latency-runs", "0") == 0
    assert run("prune", str(src), "-o", str(b), "--plan", str(plan), "--verify", "--latency-runs", "0") == 0
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(plan.read_text())["format"] == "graphprune.plan/1"


def test_round_to_keeps_multiples(exported, tmp_path):
    plan = tmp_path / "plan.json"
    assert run("prune", str(exported("resnet20")), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3", "--round-to", "8", "--plan-out", str(plan), "--latency-runs", "0") == 0
    kept = [len(g["keep"]) for g in json.loads(plan.read_text())["groups"]]
    assert kept and all(k % 8 == 0 for k in kept)


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all", b"\x08\x07\x12\x04\xff\xff"])
def test_corrupt_inputs_exit_2(tmp_path, capsys, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    assert run("prune", str(bad), "-o", str(tmp_path / "o.onnx")) == 2
    err = capsys.readouterr().err
    assert err.startswith("graphprune: error:") and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_model_exit_2(exported, tmp_path):
    data = exported("vgg").read_bytes()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(data[: len(data) // 2])
    assert run("groups", str(bad)) == 2


def test_missing_file_exit_2(tmp_path):
    assert run("groups", str(tmp_path / "nope.onnx")) == 2


def test_never_overwrites_input(exported, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(exported("vgg").read_bytes())
    before = src.read_bytes()
    assert run("prune", str(src), "-o", str(src), "--force") == 2
    assert src.read_bytes() == before


def test_existing_output_needs_force(exported, tmp_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep me")
    assert run("prune", str(exported("vgg")), "-o", str(out), "--latency-runs", "0") == 2
    assert out.read_bytes() == b"keep me"
    assert run("prune", str(exported("vgg")), "-o", str(out), "--force", "--latency-runs", "0") == 0
    assert out.read_bytes() != b"keep me"


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "abc"])
def test_bad_ratio_exit_2(exported, tmp_path, ratio):
    with pytest.raises(SystemExit) as exc:
        run("prune", str(exported("vgg")), "-o", str(tmp_path / "o.onnx"), "--ratio", ratio)
    assert exc.value.code == 2


def test_plan_for_another_model_exit_2(exported, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert run("prune", str(exported("vgg")), "-o", str(tmp_path / "a.onnx"), "--plan-out", str(plan), "--latency-runs", "0") == 0
    assert run("prune", str(exported("resnet20")), "-o", str(tmp_path / "b.onnx"), "--plan", str(plan)) == 2
    assert "another model" in capsys.readouterr().err
    assert not (tmp_path / "b.onnx").exists()


def test_console_script_runs_as_module(exported, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "graphprune.cli", "groups", str(tmp_path / "missing.onnx")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no such file" in proc.stderr


def test_external_data_model_round_trip(exported, tmp_path):
    import onnx

    src_dir = tmp_path / "ext"
    src_dir.mkdir()
    src = src_dir / "model.onnx"
    proto = onnx.load(str(exported("resnet20")))
    onnx.save(proto, str(src), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    assert (src_dir / "model.onnx.data").exists()
    out = tmp_path / "pruned.onnx"
    assert run("prune", str(src), "-o", str(out), "--verify", "--latency-runs", "0") == 0
    onnx.checker.check_model(str(out), full_check=True)


def test_external_data_outside_folder_refused(exported, tmp_path, capsys):
    import onnx

    inner = tmp_path / "inner"
    inner.mkdir()
    proto = onnx.load(str(exported("vgg")))
    onnx.save(proto, str(inner / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    (inner / "m.data").rename(tmp_path / "m.data")
    model = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../m.data"
    onnx.save(model, str(inner / "m.onnx"))
    assert run("groups", str(inner / "m.onnx")) == 2
    assert "outside the model's folder" in capsys.readouterr().err
