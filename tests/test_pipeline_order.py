"""Pass order is checked from what passes declare they require, ensure and forbid, not from their names."""
from __future__ import annotations

from typing import ClassVar

import pytest

from graphprune.errors import BadInputError
from graphprune.pipeline.config import parse_pipeline
from graphprune.pipeline.passes import PASSES, CompensatePass, PlanPass, RewritePass
from graphprune.pipeline.workspace import FACTS, Pass, check_order, register_pass
from graphprune.planning.options import PlanOptions


class _NeedsRewrite(Pass):
    """A pass from outside the package: it names no built-in pass, only the fact it needs."""

    name = "export-stats"
    requires: ClassVar[frozenset[str]] = frozenset({"rewritten"})


def test_a_new_pass_is_ordered_by_its_declared_facts():
    plan = PlanPass(PlanOptions(method="uniform", criterion="l1", ratio=0.5))
    with pytest.raises(BadInputError, match="the export-stats pass needs a rewrite pass before it"):
        check_order([plan, _NeedsRewrite()], "p")
    check_order([plan, RewritePass(), _NeedsRewrite()], "p")  # in order: no error


def test_forbidden_facts_and_conditional_requirements():
    plan = PlanPass(PlanOptions(method="uniform", criterion="l1", ratio=0.5))
    with pytest.raises(BadInputError, match="the compensate pass must come before a rewrite pass"):
        check_order([plan, RewritePass(), CompensatePass()], "p")
    with pytest.raises(BadInputError, match="needs calibration data"):
        check_order([plan, CompensatePass()], "p", has_data=False)
    assert PlanPass(PlanOptions()).required() == {"analysis"}  # hierarchical needs the analysis
    assert PlanPass(PlanOptions(method="uniform", criterion="l2", macs=0.5)).required() == frozenset()


def test_every_registered_pass_declares_known_facts_and_whether_it_mutates():
    for cls in PASSES.values():
        assert (cls.requires | cls.ensures | cls.forbids) <= set(FACTS), cls.name
    assert {n for n, c in PASSES.items() if c.mutates} == {"compensate", "rewrite", "repair", "hidden", "finetune", "quantize"}
    with pytest.raises(ValueError, match="unknown facts"):
        register_pass(type("Bad", (Pass,), {"name": "bad", "requires": frozenset({"weights"})}))


def test_a_pass_cannot_run_without_its_facts(exported):
    from graphprune.backends.onnx_model import load_onnx_model
    from graphprune.pipeline.workspace import Workspace

    model = load_onnx_model(exported("vgg"))
    with pytest.raises(BadInputError, match="needs a plan pass"):
        RewritePass()(Workspace(original=model, model=model))
    with pytest.raises(BadInputError, match="plan pass needs an analyze pass before it"):
        parse_pipeline({"pass": [{"name": "plan", "macs": 0.5}, {"name": "rewrite"}]})


def test_presets_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    from graphprune.pipeline.config import load_pipeline, preset_names

    monkeypatch.chdir(tmp_path)  # no passes/ folder here
    assert set(preset_names()) >= {"hierarchical", "magnitude", "taylor", "uniform"}
    assert load_pipeline("hierarchical").names == load_pipeline("hierarchical.toml").names
    with pytest.raises(BadInputError, match="no such pipeline file or preset"):
        load_pipeline("nope")
