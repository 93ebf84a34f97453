"""graphprune as an Olive pass (``pip install graphprune[olive]``).

Olive finds passes outside its tree through its package config (the JSON that
maps a pass type to its ``module_path``): :func:`package_config` is Olive's own
config plus ``GraphPrune``; pass it to ``olive.workflows.run(config,
package_config=...)`` (or ``olive run --package-config``). The pass's options
are graphprune's pipeline keys (:mod:`graphprune.pipeline.olive_options`),
checked by the same validation before anything runs; it writes the pruned
model and a ``model.report.json`` and returns an ``ONNXModelHandler``.

Importing this module also registers ``graphprune_npz`` with Olive's data
registry: a dataset over a graphprune ``.npz`` file (one array per model input,
optional ``labels``), for Olive's calibration and evaluation data configs
(``"user_script"``: a file with ``import graphprune.pipeline.olive``).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from olive.data.registry import Registry
from olive.model import ONNXModelHandler
from olive.package_config import OlivePackageConfig
from olive.passes import Pass
from olive.passes.pass_config import PassConfigParam

from graphprune.errors import BadInputError
from graphprune.pipeline.olive_options import OPTION_KEYS, pipeline_from_options

__all__ = ["GraphPrune", "NpzDataset", "graphprune_npz", "package_config", "write_package_config"]

log = logging.getLogger(__name__)

PASS_TYPE = "GraphPrune"


def package_config() -> dict[str, Any]:
    """Olive's default package config with the ``GraphPrune`` pass added."""
    with open(OlivePackageConfig.get_default_config_path()) as f:
        config: dict[str, Any] = json.load(f)
    config["passes"][PASS_TYPE] = {"module_path": f"{__name__}.GraphPrune", "supported_providers": ["*"],
                                   "supported_accelerators": ["*"], "supported_precisions": ["*"],
                                   "dataset": "dataset_not_required"}
    return config


def write_package_config(path: str | Path) -> Path:
    """Write :func:`package_config` as JSON (for ``olive run --package-config``)."""
    out = Path(path)
    out.write_text(json.dumps(package_config(), indent=1))
    return out


class NpzDataset:
    """Samples of a graphprune ``.npz`` file: ({input name: array}, label) pairs (label -1 when there are none)."""

    def __init__(self, path: str | Path, max_samples: int | None = None) -> None:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        labels = arrays.pop("labels", None)
        n = len(next(iter(arrays.values())))
        n = min(n, max_samples) if max_samples else n
        self.inputs = {k: v[:n] for k, v in arrays.items()}
        self.labels = labels[:n].astype(np.int64) if labels is not None else np.full(n, -1, np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        return {k: v[i] for k, v in self.inputs.items()}, int(self.labels[i])


@Registry.register_dataset("graphprune_npz")
def graphprune_npz(data_path: str, max_samples: int | None = None) -> NpzDataset:
    """Olive dataset component: ``{"type": "graphprune_npz", "params": {"data_path": "cal.npz"}}``."""
    return NpzDataset(data_path, max_samples)


def _options(config: Any) -> dict[str, Any]:
    """The pass's graphprune options from an Olive config object, unset ones left out."""
    values = config if isinstance(config, Mapping) else config.model_dump() if hasattr(config, "model_dump") else vars(config)
    return {k: values[k] for k in OPTION_KEYS if values.get(k) is not None}


class GraphPrune(Pass):
    """Prune an ONNX model with a graphprune pipeline (analysis, plan, compensation, rewrite, repair, fine-tuning)."""

    @classmethod
    def _default_config(cls, accelerator_spec: Any) -> dict[str, PassConfigParam]:  # noqa: ARG003 - Olive's signature
        return {
            "method": PassConfigParam(type_=str, default_value="hierarchical", description="plan method: hierarchical, uniform, global"),
            "target": PassConfigParam(type_=dict, default_value={}, description='plan target, e.g. {"macs": 0.5} (empty: the estimated maximum)'),
            "data": PassConfigParam(type_=str, default_value=None, description="calibration / training data, as --data takes"),
            "eval_data": PassConfigParam(type_=str, default_value=None, description="labelled data for graphprune's own figures"),
            "compensation": PassConfigParam(type_=bool | dict, default_value=True, description="compensate pass: true, false or its options"),
            "repair": PassConfigParam(type_=bool | dict, default_value=True, description="repair pass: true, false or its options"),
            "finetune": PassConfigParam(type_=bool | dict, default_value=True, description="finetune pass: true, false or its options"),
            "analyze": PassConfigParam(type_=dict, default_value={}, description="more analyze pass options (eps, samples...)"),
            "plan": PassConfigParam(type_=dict, default_value={}, description="more plan pass options (criterion, round_to...)"),
            "validation": PassConfigParam(type_=dict, default_value={}, description="validate pass options (latency_runs...)"),
        }

    @classmethod
    def validate_config(cls, config: Any, accelerator_spec: Any) -> bool:  # noqa: ARG003 - Olive's signature
        """Check the options as graphprune checks a pipeline.

        Raises:
            ValueError: With the reason (one of the errors Olive lets through instead of pruning the run quietly).
        """
        try:
            pipeline_from_options(_options(config))
        except BadInputError as exc:
            raise ValueError(str(exc)) from None
        return True

    def _run_for_config(self, model: Any, config: Any, output_model_path: str) -> Any:
        from graphprune.pipeline.run import run_file

        if not isinstance(model, ONNXModelHandler):
            raise BadInputError(f"the GraphPrune pass takes an ONNX model, got {type(model).__name__}")
        options = _options(config)
        pipeline = pipeline_from_options(options)
        out_dir = Path(output_model_path)
        out_dir = out_dir.parent / out_dir.stem if out_dir.suffix == ".onnx" else out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        output = out_dir / "model.onnx"
        result = run_file(pipeline, Path(model.model_path), output, options.get("data"), options.get("eval_data"), force=True)
        assert result is not None  # Olive runs one process
        log.info("graphprune: wrote %s (%s)", output, ", ".join(str(p) for p in result.reports))
        return ONNXModelHandler(model_path=str(out_dir), onnx_file_name=output.name)
