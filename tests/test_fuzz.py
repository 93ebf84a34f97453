"""Mutated ONNX files (tests/fuzz_corpus.py): every one exits 0, 2 or 3 in one line, in bounded time and memory.

CI runs 12 files of every mutation kind; ``python tests/fuzz_corpus.py --count 1000 --run`` runs the full corpus
(figures in benchmarks/README.md).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from fuzz_corpus import MUTATIONS, generate, run_corpus, summary


def test_mutated_models_fail_cleanly(tmp_path):
    paths = generate(tmp_path / "corpus", count=12 * len(MUTATIONS), seed=1)
    assert Counter(p.name.split("-")[1] for p in paths) == {k: 12 for k in MUTATIONS}
    results = run_corpus(paths, timeout=60.0, max_rss_mb=3000.0, jobs=2)
    s = summary(results)
    assert not s["failures"], s["failures"][:5]
    assert s["tracebacks"] == 0 and s["timeouts"] == 0 and s["memory_kills"] == 0
    assert set(s["exit_codes"]) <= {"0", "2", "3"} and s["exit_codes"].get("2", 0) > len(paths) // 2


def test_escaping_external_data_is_always_refused(tmp_path):
    paths = [p for p in generate(tmp_path / "corpus", count=4 * len(MUTATIONS), seed=2) if "escaping_external_data" in p.name]
    results = run_corpus(paths, timeout=60.0, jobs=2)
    assert [r.code for r in results] == [2] * len(paths)


def test_runner_catches_a_crash(tmp_path, monkeypatch):
    """The harness itself must be able to fail: a command that raises past main counts as a failure."""
    import graphprune.cli

    def boom(argv=None):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(graphprune.cli, "main", boom)
    (tmp_path / "m.onnx").write_bytes(b"x")
    (outcome,) = run_corpus([Path(tmp_path / "m.onnx")], timeout=30.0, jobs=1)
    assert not outcome.ok and outcome.traceback
