"""Static int8 quantization of ONNX models (onnxruntime.quantization, QDQ), calibrated on graphprune's data.

The ``quantize`` pass (:mod:`graphprune.pipeline.passes`) runs after pruning:
it quantizes the pruned model and the original with the same calibration
samples and settings, so the report can put fp32 and int8 side by side, and
checks that pruning commutes with quantization (:func:`quantization_check`).

Example:
    >>> QuantizeOptions(samples=128).check()
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphprune.errors import BadInputError, ValidationError, short_message
from graphprune.execution.exactness import compare_outputs
from graphprune.frontends.data import Calibration
from graphprune.frontends.onnx import OnnxModel, prepare
from graphprune.io import save_onnx, uses_external_data
from graphprune.ir.graph import Axis
from graphprune.ir.masks import keep_masks
from graphprune.ir.model import ACTIVATION_TYPES, Int8Form
from graphprune.ir.onnx import model_session

__all__ = ["ACTIVATION_TYPES", "CALIBRATION_METHODS", "QuantCheck", "QuantizeOptions", "output_scales", "quantization_check", "quantize_onnx", "quantized_for_timing", "timing_options", "zeroed_weights"]

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
"""onnxruntime's calibration methods, by the names the pass takes."""


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """Static QDQ quantization (int8 weights and activations) on ``samples`` calibration samples.

    Attributes:
        samples: Calibration samples (a seeded subset of the workspace's data).
        batch_size: Samples per calibration batch.
        seed: Seed of the subset.
        per_channel: Per-output-channel weight scales (else one scale per weight).
        calibration: ``minmax``, ``entropy`` or ``percentile`` (onnxruntime's calibrators).
        activations: ``uint8`` or ``int8`` activations (:data:`ACTIVATION_TYPES`); weights are int8.
        reduce_range: 7-bit weights: x86-64 u8s8 kernels without VNNI (AVX2, AVX-512) add pairs of u8 x s8
            products in int16, which saturates with full-range weights (MobileNetV2, uint8 activations: 0.8833
            accuracy with 8-bit weights, 0.9003 with 7-bit, fp32 0.9013).
        tolerance_steps: Largest allowed difference of the int8 pruned model from the masked int8 original,
            in quantization steps of each output's scale (:func:`quantization_check`).
        verify: Run that check.
    """

    samples: int = 256
    batch_size: int = 32
    seed: int = 0
    per_channel: bool = True
    calibration: str = "minmax"
    activations: str = "uint8"
    reduce_range: bool = True
    tolerance_steps: float = 2.0
    verify: bool = True

    def check(self) -> None:
        if self.samples < 1 or self.batch_size < 1:
            raise BadInputError(f"quantize needs samples >= 1 and batch_size >= 1, got {self.samples} and {self.batch_size}")
        if self.calibration not in CALIBRATION_METHODS:
            raise BadInputError(f"quantize calibration must be one of {', '.join(CALIBRATION_METHODS)}, got {self.calibration!r}")
        if self.activations not in ACTIVATION_TYPES:
            raise BadInputError(f"quantize activations must be one of {', '.join(ACTIVATION_TYPES)}, got {self.activations!r}")
        if self.tolerance_steps < 0:
            raise BadInputError(f"quantize tolerance_steps must be >= 0, got {self.tolerance_steps}")


@dataclasses.dataclass(frozen=True)
class QuantCheck:
    """The int8 pruned model against the int8 original with the removed channels masked.

    Both run without graph optimisation, i.e. with the operators' own QDQ semantics (DequantizeLinear, float
    op, QuantizeLinear): the check tests the rewrite, not onnxruntime's kernel fusion. ``fused_steps`` is the
    same comparison with onnxruntime's optimisations on, where the pruned model's QDQ groups fuse into integer
    kernels (QLinearConv...) that the reference's masking nodes keep apart: reported, not checked.

    Attributes:
        max_steps: Largest output difference, in quantization steps of that output's scale.
        tolerance_steps: The allowed difference.
        max_abs_error: Largest output difference (absolute).
        output_scales: The scale of each output (its last DequantizeLinear), by output name.
        samples: Samples compared.
    """

    max_steps: float
    tolerance_steps: float
    max_abs_error: float
    output_scales: Mapping[str, float]
    samples: int
    fused_steps: float = 0.0

    def line(self) -> str:
        return (f"int8 pruned vs masked int8 original: {self.max_steps:.2f} steps of the output scale at most "
                f"(tolerance {self.tolerance_steps:g}) on {self.samples} samples; {self.fused_steps:.2f} with onnxruntime's fused kernels")


_PER_CHANNEL_AXES = {"BatchNormalization": 0, "LayerNormalization": 0, "InstanceNormalization": 0}
"""Channel axes of per-channel weights onnxruntime would take as axis 1 (normalisation scales are vectors)."""


def _reader(data: Calibration, names: list[str], batch_size: int) -> object:
    """An onnxruntime CalibrationDataReader over ``data``'s batches (restartable: ``rewind``)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(())
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter([dict(zip(names, inputs)) for _, inputs, _ in data.batches(batch_size)])

        def __len__(self) -> int:
            return len(data)

    return Reader()


def quantize_onnx(om: OnnxModel, data: Calibration, options: QuantizeOptions, ranges: Path | None = None) -> OnnxModel:
    """``om`` quantized to QDQ int8 by ``onnxruntime.quantization.quantize_static`` on ``data``.

    Args:
        om: An fp32 (or fp16) ONNX model.
        data: Calibration samples (all of them are used: pass a subset).
        options: Quantization settings.
        ranges: A calibration cache file: read when it exists (the same activation ranges for several models,
            matched by tensor name), else written.

    Raises:
        BadInputError: When onnxruntime cannot quantize the model (the reason in one line).
    """
    reader = _reader(data, list(om.graph.inputs), options.batch_size)
    return prepare(_quantized(om.model, reader, options, ranges), om.path)


def timing_options(form: Int8Form) -> QuantizeOptions:
    """The quantize pass's options that write ``form`` (the rest at their defaults)."""
    return QuantizeOptions(activations=form.activations, reduce_range=form.reduce_range)


def quantized_for_timing(model: ir.Model, feeds: Mapping[str, np.ndarray], options: QuantizeOptions | None = None,
                         probe: bool = False) -> ir.Model:
    """``model`` quantized as the quantize pass does (static QDQ int8, per-channel weights by default), its ranges
    calibrated on ``feeds`` alone: for latency measurements, where only the graph's ops and shapes matter.

    ``probe``: ``model`` is a sub-graph cut from a whole model; ops that onnxruntime's quantizer quantizes only
    behind a quantized input (MaxPool, Transpose, ...) are quantized anyway (``ForceQuantizeNoInputCheck``), as
    they are inside the whole quantized model, where their producer is.

    Raises:
        BadInputError: When onnxruntime cannot quantize the model.
    """
    names = list(feeds)
    batch = int(next(iter(feeds.values())).shape[0])
    reader = _reader(Calibration(tuple(feeds[n] for n in names), None, "timing inputs"), names, batch)
    return _quantized(model, reader, options or QuantizeOptions(), force=probe)


def _quantized(model: ir.Model, reader: object, options: QuantizeOptions, ranges: Path | None = None,
               force: bool = False) -> ir.Model:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.calibration]
    external = uses_external_data(model)
    with tempfile.TemporaryDirectory(prefix="graphprune-quant-") as tmp:
        src, out = Path(tmp) / "fp.onnx", Path(tmp) / "int8.onnx"
        save_onnx(model, src, external=external)
        try:
            quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ,
                            per_channel=options.per_channel, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8 if options.activations == "uint8" else QuantType.QInt8,
                            reduce_range=options.reduce_range,
                            calibrate_method=method, use_external_data_format=external,
                            calibration_cache_path=str(ranges) if ranges is not None else None,
                            extra_options={"QDQOpTypePerChannelSupportToAxis": _PER_CHANNEL_AXES,
                                           "ForceQuantizeNoInputCheck": force})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types; all mean this model cannot be quantized
            raise BadInputError(f"onnxruntime cannot quantize the model: {short_message(exc)}") from None
        quantized = ir.load(out)
        if external:  # the weights must outlive the temporary folder
            for value in quantized.graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    return quantized


def output_scales(model: ir.Model) -> dict[str, float]:
    """Per graph output produced by a per-tensor DequantizeLinear, its scale (one quantization step)."""
    scales: dict[str, float] = {}
    for value in model.graph.outputs:
        node = value.producer()
        if node is None or node.op_type != "DequantizeLinear" or node.inputs[1] is None:
            continue
        scale = node.inputs[1].const_value
        if scale is not None and scale.numpy().size == 1 and value.name:
            scales[value.name] = float(scale.numpy().reshape(()))
    return scales


def zeroed_weights(om: OnnxModel, kept: Mapping[Axis, np.ndarray]) -> OnnxModel:
    """``om`` with every removed element of its weights set to 0 (masks from :func:`graphprune.ir.masks.keep_masks`)."""
    from graphprune.execution.onnx_finetune import with_constants

    masks = keep_masks(om.graph, {a: k for a, k in kept.items() if a.tensor in om.graph.tensors}, kinds=("param",))
    return with_constants(om, {name: om.graph.param(name) * mask for name, mask in masks.items()})


def quantization_check(source: OnnxModel, pruned: OnnxModel, kept: Mapping[Axis, np.ndarray], data: Calibration,
                       options: QuantizeOptions) -> QuantCheck:
    """Quantize ``pruned`` and ``source`` with the same activation ranges and compare, in steps of the output scale.

    ``source`` first gets its removed weights zeroed (the original with the removed channels zeroed, so that
    no removed weight sets a weight scale: a consumer's per-output-channel scale is a maximum over its input
    channels, removed ones included). The activation ranges are calibrated on it and reused for ``pruned`` by
    tensor name, and its int8 model is masked (removed activations set to their zero point, i.e. to 0).
    The two then differ only by rounding where the order of accumulation differs (see :class:`QuantCheck`).

    Raises:
        ValidationError: When an output differs by more than ``options.tolerance_steps`` steps, or has no scale.
    """
    from graphprune.execution.validate import masked_model

    subset = data.subset(options.samples, options.seed)
    source = zeroed_weights(source, kept)
    with tempfile.TemporaryDirectory(prefix="graphprune-ranges-") as tmp:
        ranges = Path(tmp) / "ranges.json"
        q_source = quantize_onnx(source, subset, options, ranges)
        q_pruned = quantize_onnx(pruned, subset, options, ranges)
    scales = output_scales(q_pruned.model)
    missing = [n for n in q_pruned.graph.outputs if n not in scales]
    if missing:
        raise ValidationError(f"int8 model output(s) {', '.join(missing)} come from no per-tensor DequantizeLinear: "
                              "no quantization step to state a tolerance in")
    on_graph = {a: k for a, k in kept.items() if a.tensor in q_source.graph.tensors}
    reference = masked_model(q_source, on_graph)
    names = list(q_pruned.graph.outputs)
    steps, err, fused = 0.0, 0.0, 0.0
    with model_session(reference, optimize=False) as ref, model_session(q_pruned.model, optimize=False) as got, \
            model_session(reference) as ref_fused, model_session(q_pruned.model) as got_fused:
        for _, inputs, _ in subset.batches(options.batch_size):
            feeds = dict(zip(source.graph.inputs, inputs))
            expected, outs = ref.run(None, feeds), got.run(None, feeds)
            for name, want, have in zip(names, expected, outs):
                step = scales[name]
                diff = compare_outputs([want], [have], [name], what="the int8 pruned model", rtol=0.0,
                                       atol=options.tolerance_steps * step * (1 + 1e-3),
                                       hint=f"more than {options.tolerance_steps:g} quantization steps ({step:.3g}) from the masked int8 original")
                steps, err = max(steps, diff / step), max(err, diff)
            for name, want, have in zip(names, ref_fused.run(None, feeds), got_fused.run(None, feeds)):
                fused = max(fused, float(np.max(np.abs(np.asarray(want, np.float64) - have))) / scales[name])
    check = QuantCheck(steps, options.tolerance_steps, err, scales, len(subset), fused)
    log.info("%s", check.line())
    return check
