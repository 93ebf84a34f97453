"""Shared fixtures: reference models exported once per session."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

from graphprune import models


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Return a function (name, opset, bn) -> path of the exported ONNX file (cached)."""
    root = tmp_path_factory.mktemp("exported")
    cache: dict[tuple[str, int, Literal["keep", "fold"]], Path] = {}

    def get(name: str, opset: int = 17, bn: Literal["keep", "fold"] = "keep") -> Path:
        key = (name, opset, bn)
        if key not in cache:
            path = root / f"{name}-{opset}-{bn}.onnx"
            models.export_onnx(models.build(name), path, opset=opset, bn=bn)
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(autouse=True, scope="session")
def latency_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Latency tables go to a session folder, never to the user's cache."""
    import os

    root = tmp_path_factory.mktemp("graphprune-cache")
    before = os.environ.get("GRAPHPRUNE_CACHE")
    os.environ["GRAPHPRUNE_CACHE"] = str(root)
    yield root
    if before is None:
        os.environ.pop("GRAPHPRUNE_CACHE", None)
    else:
        os.environ["GRAPHPRUNE_CACHE"] = before
