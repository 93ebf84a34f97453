"""One pipeline for every format: nn.Modules and saved programs get compensation, repair, fine-tuning and latency targets."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from graphprune import models
from graphprune.backends.torch_model import ModulePrunable, module_model
from graphprune.cli import main
from graphprune.execution.training import FitOptions
from graphprune.frontends.data import Calibration
from graphprune.pipeline.config import parse_pipeline
from graphprune.pipeline.run import run_model

FULL = [{"name": "analyze", "samples": 64}, {"name": "plan", "macs": 0.7, "allow_over_limit": True},
        {"name": "compensate", "samples": 64}, {"name": "rewrite"}, {"name": "repair", "samples": 64},
        {"name": "finetune", "epochs": 0.5, "batch_size": 16}, {"name": "validate", "latency_runs": 2}]


def _data(n: int = 64, labels: bool = True) -> Calibration:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *models.INPUT_SHAPE)).astype(np.float32)
    return Calibration((x,), rng.integers(0, 10, n) if labels else None, "random")


def _x(n: int = 2) -> torch.Tensor:
    return torch.from_numpy(_data(n).inputs[0])


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("method", ["sequential", "edges"])
def test_module_runs_the_whole_pipeline(method):
    """analyze -> plan -> compensate -> rewrite -> repair -> finetune -> validate on an nn.Module, in torch; after the
    sequential refit (which matches every consumer's output) the repair has nothing left to do."""
    net = models.build("vgg").eval()
    original = module_model(net, [_x()])
    steps = [dict(s, method=method) if s["name"] == "compensate" else s for s in FULL]
    ws = run_model(parse_pipeline({"pass": steps}), original, _data(), _data())
    assert isinstance(ws.model, ModulePrunable) and type(ws.model.module) is type(net)
    assert ws.compensation is not None and ws.compensation.edges > 0
    assert ws.repair == ("batchnorm re-estimation" if method == "edges" else
                         f"none (the sequential refit matched {ws.compensation.edges} consumers' outputs to the original's)")
    assert ws.exact_max_abs_error is not None and ws.exact_max_abs_error < 1e-3
    assert _params(ws.model.module) < _params(net)
    assert ws.validation is not None and ws.validation.after.macs < ws.validation.before.macs
    assert ws.validation.after.accuracy is not None and ws.validation.after.latency_ms is not None


def test_module_recovery_passes_change_weights():
    """Compensation writes the module's consumer weights; repair its BN statistics; fine-tuning its parameters."""
    net = models.build("vgg").eval()
    original = module_model(net, [_x()])
    steps = parse_pipeline({"pass": FULL[:3]})
    ws = run_model(steps, original, _data())
    compensated = ws.model
    assert isinstance(compensated, ModulePrunable)
    changed = [k for k, v in compensated.module.state_dict().items() if not torch.equal(v, net.state_dict()[k])]
    assert changed, "compensation folded nothing into the module"
    # the graph sees the new values too (later passes read it)
    name = next(g for g, q in compensated.tm.state_names.items() if q == changed[0])
    assert np.allclose(compensated.graph.param(name), compensated.module.state_dict()[changed[0]].numpy())
    tuned = compensated.finetuned(_data(), FitOptions(epochs=0.5, batch_size=16), None, None)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.module.state_dict().values(), compensated.module.state_dict().values()))
    assert net.state_dict().keys() == original.module.state_dict().keys()  # the input module is untouched


def test_module_without_labels_distils_from_the_original():
    ws = run_model(parse_pipeline({"pass": [{"name": "plan", "method": "uniform", "criterion": "l1", "ratio": 0.3},
                                            {"name": "rewrite"}, {"name": "finetune", "epochs": 0.25, "batch_size": 16}]}),
                   module_model(models.build("resnet20").eval(), [_x()]), _data(labels=False))
    assert isinstance(ws.model, ModulePrunable) and ws.exact_max_abs_error is not None


def _program(tmp_path, name: str):
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(models.build(name).eval(), (_x(),), dynamic_shapes=({0: batch},))
    path = tmp_path / f"{name}.pt2"
    torch.export.save(program, str(path))
    return path, program


def test_pt2_gets_compensation_repair_and_finetuning_from_the_cli(tmp_path, capsys):
    src, program = _program(tmp_path, "vgg")
    name = program.graph_signature.user_inputs[0]
    data = _data()
    np.savez(tmp_path / "cal.npz", **{name: data.inputs[0], "labels": data.labels})
    report = tmp_path / "r.json"
    assert main(["prune", str(src), "-o", str(tmp_path / "small.pt2"), "--data", str(tmp_path / "cal.npz"), "--samples", "64",
                 "--macs", "0.7", "--allow-over-limit", "--finetune-epochs", "0.5", "--latency-runs", "2",
                 "--json", str(report)]) == 0
    doc = json.loads(report.read_text())
    assert doc["format"] == "program" and "compensate" in doc["passes"] and "finetune" in doc["passes"]
    assert doc["figures"]["compensated_edges"] > 0 and doc["figures"]["repair"].startswith("none (the sequential refit")
    assert doc["figures"]["after"]["macs"] < doc["figures"]["before"]["macs"]
    small = torch.export.load(str(tmp_path / "small.pt2"))
    assert sum(v.numel() for v in small.state_dict.values()) < sum(v.numel() for v in program.state_dict.values())
    assert (tmp_path / "small.report.html").exists() and not (tmp_path / "small.report.json").exists()  # --json F replaces it
    assert "wrote" in capsys.readouterr().out


def test_pt2_latency_target_is_measured_in_torch(tmp_path):
    src, _ = _program(tmp_path, "vgg")
    plan = tmp_path / "plan.json"
    assert main(["prune", str(src), "-o", str(tmp_path / "fast.pt2"), "--method", "uniform", "--criterion", "l1",
                 "--latency", "0.9", "--latency-runs", "3", "--plan-out", str(plan)]) == 0
    assert json.loads(plan.read_text())["meta"]["target"]["kind"] == "macs"


@pytest.mark.parametrize("flag", ["--compensate", "--repair"])
def test_recovery_without_data_is_refused(tmp_path, capsys, flag):
    src, _ = _program(tmp_path, "resnet20")
    assert main(["prune", str(src), "-o", str(tmp_path / "x.pt2"), flag]) == 2
    assert "need calibration data" in capsys.readouterr().err and not (tmp_path / "x.pt2").exists()
