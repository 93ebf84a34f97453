"""Measuring the latency model: sub-graphs cut from the model, timed on onnxruntime, cached on disk.

For every op a prunable group touches, a small sub-graph is cut from the model
itself: the op plus the element-wise and normalisation ops onnxruntime fuses
with it (Conv+BN+Relu, Conv+Add+Relu, Gemm+Relu...), with its real input
shapes at the user's batch. Its weights are sliced to candidate channel counts
by the ONNX backend and each variant is timed on the chosen execution
provider. The result is a plain-data
:class:`~graphprune.analysis.latency.LatencyModel`.

Tables are cached on disk, keyed by the machine, onnxruntime version,
provider, threads, batch and a name-free signature of the sub-graph, so a
second build measures nothing and identical blocks share one table.

The whole model is timed as the median of its runs, like validation, and once
more pruned at a calibration point (every group at a fast count near half its
channels), timed beside the original in interleaved rounds so that its ratio to
the original is not skewed by a load that changed while the tables were built:
the latency model's ``scale`` is fitted to that measurement, which
corrects what the isolated probes miss (their run overhead, onnxruntime's
layout reorders at their borders, min-of-runs timing). A second point, every
group at a multiple of the largest probed multiple, is timed the same way and
calibrates the plans whose counts keep onnxruntime's channel blocking: the
whole model reorders its layout around an op whose count breaks it, which an
isolated probe does not show. Both whole-model
figures are measured by every build, never read from the cache: the scale
fitted to them then also absorbs any change of the machine's load or clocks
since the cached tables were measured (a whole-model figure cached under
another load skewed predictions by +200%).

Example:
    >>> opts = LatencyOptions(batch=1, threads=2, runs=5)   # doctest: +SKIP
    >>> lm = build_latency_model(om, build_groups(om.graph), opts)   # doctest: +SKIP
    >>> measure_plan_error(om, coupling, lm, {g.id: g.channels // 2 for g in coupling.prunable})   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphprune.analysis.latency import FORMAT, AxisSpec, BuildStats, LatencyModel, OpTable
from graphprune.backends.onnx import apply_kept
from graphprune.coupling.groups import Coupling
from graphprune.errors import BadInputError, GraphpruneError, short_message
from graphprune.execution.timing import interleaved_ms, median_ms, rounds_for, session_runner
from graphprune.frontends.onnx import OnnxModel
from graphprune.ir.dtypes import FLOAT_TYPES
from graphprune.ir.graph import Axis, ChannelGraph, OpNode
from graphprune.ir.model import ACTIVATION_TYPES, Int8Form
from graphprune.ir.onnx import model_bytes, node_map, value_map
from graphprune.ir.plan import kept_elements, plan_from_keep

__all__ = ["QUANTIZED_SETTING", "LatencyOptions", "SubGraph", "blocked_point", "build_latency_model", "cache_setting", "calibration_point",
           "candidate_counts", "cut_subgraph", "measure_plan_error"]

log = logging.getLogger(__name__)

FUSED = frozenset({"BatchNormalization", "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add", "Sum"})
"""Followers onnxruntime fuses into (or runs alongside) a kernel: cut with it so the fused kernel is timed."""
FREE = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Shape", "Dropout"})
"""Ops that are views or metadata in onnxruntime: not measured (no latency change assumed)."""
MAX_FOLLOWERS = 4
MODEL_STATISTIC = "median"
"""How whole models are timed: the median of their runs, as validation measures them."""
QUANTIZED_SETTING = "int8 QDQ, probe inputs quantized"
"""The cache setting of int8 tables (probes quantized as inside the whole model: MaxPool behind its producer's QDQ),
followed by the int8 form (:meth:`graphprune.ir.model.Int8Form.describe`)."""


@dataclasses.dataclass(frozen=True)
class LatencyOptions:
    """How the tables are measured.

    Attributes:
        batch: Batch size of every measurement.
        threads: onnxruntime intra-op threads (0: its default).
        provider: Execution provider; None picks the best available (CUDA first).
        runs: Timed runs per table point (median); ``warmup`` untimed ones before.
        warmup: Untimed runs before each measurement.
        model_runs: Timed runs of the whole model.
        multiples: Channel multiples probed (kernel blocking); ``m - 1`` of the largest is probed too.
        max_counts: Most candidate counts per table axis.
        max_measurements: Most new measurements in one build; ops beyond it are left out (reported).
        statistic: Of a table point's runs: ``min`` (robust to other load on the machine: the tables are differenced)
            or ``median``. The whole model is always timed as the median (what validation measures).
        calibrate: Measure the model pruned at a calibration point and fit the tables' scale to it.
        quantized: Time every probe and whole model quantized to int8 QDQ first (as the ``quantize`` pass does,
            ranges from the timing inputs): tables of the int8 model that ships.
        activations: With ``quantized``: the activation type, as the quantize pass's option (``uint8`` / ``int8``).
        reduce_range: With ``quantized``: 7-bit weights, as the quantize pass's option.
        cache_dir: Table cache; None: ``$GRAPHPRUNE_CACHE/latency`` or ``~/.cache/graphprune/latency``.
        cache_check: A cached table's full-size point is timed again; more than this relative difference and
            the table is measured again (the cache was written under other conditions). 0: trust the cache.
    """

    batch: int = 1
    threads: int = 0
    provider: str | None = None
    runs: int = 10
    warmup: int = 2
    model_runs: int = 30
    multiples: tuple[int, ...] = (8, 16)
    max_counts: int = 10
    max_measurements: int = 5000
    statistic: str = "min"
    calibrate: bool = True
    quantized: bool = False
    activations: str = "uint8"
    reduce_range: bool = True
    cache_dir: str | None = None
    cache_check: float = 0.25

    def __post_init__(self) -> None:
        ints = {"batch": 1, "threads": 0, "runs": 1, "warmup": 0, "model_runs": 1, "max_counts": 2, "max_measurements": 0}
        for name, low in ints.items():
            if getattr(self, name) < low:
                raise BadInputError(f"latency option {name} must be >= {low}, got {getattr(self, name)}")
        if self.statistic not in ("min", "median"):
            raise BadInputError(f"latency option statistic must be 'min' or 'median', got {self.statistic!r}")
        if not self.multiples or min(self.multiples) < 1:
            raise BadInputError(f"latency option multiples must be positive integers, got {self.multiples}")
        if self.cache_check < 0:
            raise BadInputError(f"latency option cache_check must be >= 0 (0: trust the cache), got {self.cache_check}")
        if self.activations not in ACTIVATION_TYPES:
            raise BadInputError(f"latency option activations must be one of {', '.join(ACTIVATION_TYPES)}, got {self.activations!r}")

    @property
    def int8(self) -> Int8Form | None:
        """The int8 form models are timed in (None: float)."""
        return Int8Form(self.activations, self.reduce_range) if self.quantized else None

    def resolved_provider(self) -> str:
        """The provider used: the given one (checked) or the best available."""
        import onnxruntime as ort

        from graphprune.execution.sessions import providers

        if self.provider is None:
            return providers()[0]
        if self.provider not in ort.get_available_providers():
            raise BadInputError(f"execution provider {self.provider} is not available (have: {', '.join(ort.get_available_providers())})")
        return self.provider

    def cache_root(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        env = os.environ.get("GRAPHPRUNE_CACHE")
        return (Path(env) if env else Path.home() / ".cache" / "graphprune") / "latency"


def candidate_counts(floor: int, channels: int, options: LatencyOptions) -> tuple[int, ...]:
    """Channel counts measured for a group: C, the floor, multiples (largest multiple first), ``m - 1`` probes; capped."""
    lo = max(1, min(floor, channels))
    order: list[int] = [channels, lo]
    for m in sorted(options.multiples, reverse=True):
        order += list(range(channels // m * m, lo - 1, -m))
        if m == max(options.multiples):
            order += [x - 1 for x in range(channels // m * m, lo, -m)]
    chosen = list(dict.fromkeys(c for c in order if lo <= c <= channels))[: options.max_counts]
    return tuple(sorted(chosen))


@dataclasses.dataclass(frozen=True)
class SubGraph:
    """A cut sub-graph: its ops, an onnx-ir model of them and their channel graph (same tensor names)."""

    nodes: tuple[OpNode, ...]
    om: OnnxModel

    @property
    def op_types(self) -> tuple[str, ...]:
        return tuple(n.op_type for n in self.nodes)


def _followers(graph: ChannelGraph, anchor: OpNode, taken: set[str]) -> list[OpNode]:
    """The fusable single-consumer chain after ``anchor`` (a follower another chain took is left to it)."""
    chain = [anchor]
    consumers = graph.consumers()
    while len(chain) <= MAX_FOLLOWERS:
        out = chain[-1].outputs[0]
        nxt = consumers.get(out, [])
        if out in graph.outputs or len(nxt) != 1 or nxt[0].domain or nxt[0].op_type not in FUSED or nxt[0].name in taken:
            break
        chain.append(nxt[0])
    return chain


def cut_subgraph(om: OnnxModel, nodes: Iterable[OpNode], batch: int) -> SubGraph:
    """A standalone model of ``nodes`` (weights shared with ``om``), external inputs at ``batch``.

    Raises:
        BadInputError: When an external input is not floating point or has a dynamic non-batch size.
    """
    nodes = tuple(nodes)
    src_values, src_nodes = value_map(om.model.graph), node_map(om.model.graph)
    consumers = om.graph.consumers()
    inside = {n.name for n in nodes}
    new: dict[str, ir.Value] = {}
    inputs: list[ir.Value] = []
    inits: list[ir.Value] = []

    def get(name: str) -> ir.Value:
        if name not in new:
            src, info = src_values[name], om.graph.tensors[name]
            if info.kind == "param":
                new[name] = ir.Value(name=name, const_value=src.const_value, shape=src.shape, type=src.type)
                inits.append(new[name])
            else:
                dims = [d if isinstance(d, int) else batch if i == 0 else None for i, d in enumerate(info.shape or ())]
                if info.shape is None or None in dims or info.dtype not in FLOAT_TYPES:
                    raise BadInputError(f"input '{name}' of the cut sub-graph is dynamic or not floating point")
                new[name] = ir.Value(name=name, shape=ir.Shape(dims), type=src.type)
                inputs.append(new[name])
        return new[name]

    ir_nodes, outputs = [], []
    for n in nodes:
        orig = src_nodes[n.name]
        ins = [get(i) if i else None for i in n.inputs]
        attrs = [ir.Attr(a.name, a.type, a.value) for a in orig.attributes.values()]
        node = ir.Node(orig.domain, orig.op_type, ins, attrs, num_outputs=len(orig.outputs), version=orig.version, name=n.name)
        for out, old in zip(node.outputs, orig.outputs):
            out.name, out.type = old.name, old.type
            new[str(old.name)] = out
            used_outside = any(c.name not in inside for c in consumers.get(str(old.name), ()))
            if used_outside or old.name in om.graph.outputs:
                outputs.append(out)
        ir_nodes.append(node)
    graph = ir.Graph(inputs, outputs, nodes=ir_nodes, initializers=inits, opset_imports=dict(om.model.opset_imports), name="latency_probe")
    names = set(new)
    cg = ChannelGraph({k: v for k, v in om.graph.tensors.items() if k in names}, list(nodes),
                      tuple(v.name for v in inputs if v.name), tuple(v.name for v in outputs if v.name), om.graph.constant_loader)
    return SubGraph(nodes, OnnxModel(ir.Model(graph, ir_version=om.model.ir_version), cg))


def _channel_axes(node: OpNode, graph: ChannelGraph, index: Mapping[Axis, list[tuple[int, int, int]]]) -> tuple[Axis | None, Axis | None]:
    """(input, output) channel axes of a kernel op; for other ops the first grouped axis of input 0 and output 0."""
    rank = len(graph.shape(node.outputs[0]) or ())
    if node.op_type in ("Conv", "ConvTranspose"):
        return Axis(node.inputs[0], 1), Axis(node.outputs[0], 1)
    if node.op_type == "Gemm":
        return Axis(node.inputs[0], 0 if node.attrs.get("transA", 0) else 1), Axis(node.outputs[0], 1)
    if node.op_type == "MatMul" and rank:
        return Axis(node.inputs[0], len(graph.shape(node.inputs[0]) or ()) - 1), Axis(node.outputs[0], rank - 1)

    def first(name: str) -> Axis | None:
        return next((Axis(name, i) for i in range(len(graph.shape(name) or ())) if Axis(name, i) in index), None)

    return (first(node.inputs[0]) if node.inputs and node.inputs[0] else None), first(node.outputs[0])


def _table_axes(node: OpNode, graph: ChannelGraph, index: Mapping[Axis, list[tuple[int, int, int]]]) -> tuple[AxisSpec, ...]:
    specs = []
    for ax in _channel_axes(node, graph, index):
        size = graph.tensors[ax.tensor].size(ax.axis) if ax is not None and ax.tensor in graph.tensors else None
        if ax is not None and ax in index and size is not None:
            specs.append(AxisSpec(ax.tensor, ax.axis, size, tuple(index[ax])))
    if len(specs) == 2 and {g[0] for g in specs[0].groups} & {g[0] for g in specs[1].groups}:
        return (specs[1],)  # input and output in one group (depthwise): one axis
    return tuple(specs)


def _axis_candidates(spec: AxisSpec, counts: Mapping[int, tuple[int, ...]], cap: int) -> dict[int, dict[int, int]]:
    """Axis size -> the group counts that give it (one group varied at a time), capped evenly."""
    out: dict[int, dict[int, int]] = {spec.size: {}}
    for g, m, c in spec.groups:
        for k in counts[g]:
            out.setdefault(spec.size - (c - k) * m, {g: k})
    sizes = sorted(out)
    if len(sizes) > cap:
        sizes = [sizes[i] for i in np.unique(np.linspace(0, len(sizes) - 1, cap).round().astype(int))]
    return {s: out[s] for s in sizes}


def _middle(sizes: list[int], step: int) -> int:
    """The size nearest half way, among multiples of ``step`` when there are some (probes are slow on purpose)."""
    pool = [s for s in sizes if s % step == 0] or sizes
    return min(pool, key=lambda s: abs(s - (sizes[0] + sizes[-1]) / 2))


def _grid(cands: list[dict[int, dict[int, int]]], step: int) -> list[tuple[int, ...]]:
    """Points to measure: each axis swept through the other's full size, plus a coarse interior grid."""
    if len(cands) == 1:
        return [(s,) for s in cands[0]]
    (fi, ins), (fo, outs) = ((max(c), sorted(c)) for c in cands)
    coarse_i = {ins[0], _middle(ins, step)} - {fi}
    coarse_o = {outs[0], _middle(outs, step)} - {fo}
    pts: list[tuple[int, ...]] = [(i, fo) for i in ins]
    pts += [(fi, o) for o in outs if o != fo]
    return pts + [(i, o) for i in sorted(coarse_i) for o in sorted(coarse_o)]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool)) or value is None else repr(value)


def _signature(graph: ChannelGraph, nodes: tuple[OpNode, ...], axes: tuple[AxisSpec, ...], batch: int) -> list[Any]:
    """A name-free description of a sub-graph: op types, attributes, input shapes (at ``batch``), dtypes, varied axes."""
    ref: dict[str, list[Any]] = {}
    body: list[Any] = []
    for j, n in enumerate(nodes):
        ins: list[Any] = []
        for name in n.inputs:
            if name and name not in ref:
                info = graph.tensors[name]
                shape = [d if isinstance(d, int) else batch if i == 0 else str(d) for i, d in enumerate(info.shape or ())]
                small = info.kind == "param" and info.dtype not in FLOAT_TYPES and all(isinstance(d, int) for d in shape) and len(graph.param(name).flat) <= 64
                ref[name] = ["ext", len(ref), info.kind, info.dtype, shape, graph.param(name).tolist() if small else None]
            ins.append(ref.get(name))
        body.append([n.domain, n.op_type, n.opset, sorted((k, _plain(v)) for k, v in n.attrs.items()), ins])
        ref.update((o, ["node", j, k]) for k, o in enumerate(n.outputs))
    return [body, [[ref.get(a.tensor), a.axis] for a in axes]]


def _machine(provider: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    machine = f"{cpu} x{os.cpu_count()}"
    if provider == "CUDAExecutionProvider":
        try:
            import torch

            machine += f" / {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
        except (ImportError, RuntimeError):
            pass
    return machine


class _Cache:
    """Measured points of one table on disk: ``root/<key hash>.json``."""

    def __init__(self, root: Path, key: Mapping[str, Any]):
        self.key = json.loads(json.dumps(key))
        self.hash = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:32]
        self.path = root / f"{self.hash}.json"
        self.points: dict[tuple[int, ...], float] = {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("key") == self.key:
                self.points = {tuple(p[0]): float(p[1]) for p in data["points"]}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("latency cache %s unreadable (%s): measuring again", self.path, short_message(exc))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"key": self.key, "points": [[list(k), v] for k, v in sorted(self.points.items())]})
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)


@dataclasses.dataclass
class _Meter:
    """Times models on one runtime setting and counts what it did."""

    options: LatencyOptions
    provider: str
    measurements: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    model_timings: int = 0
    spot_checks: int = 0
    stale_tables: int = 0

    def time(self, model: ir.Model) -> float:
        """Milliseconds of the cut probe ``model`` on random inputs, by the options' statistic of their runs
        (quantized as a probe, see :func:`graphprune.backends.quantize.quantized_for_timing`; whole models:
        :meth:`time_model`)."""
        start = time.perf_counter()
        rng = np.random.default_rng(0)
        feeds = {v.name: rng.standard_normal(v.shape.numpy()).astype(v.dtype.numpy())
                 for v in model.graph.inputs if v.name and v.shape is not None and v.dtype is not None}
        session = self._session(self._timed_form(model, feeds, probe=True))
        for _ in range(self.options.warmup):
            session.run(None, dict(feeds))
        times = []
        for _ in range(self.options.runs):
            t = time.perf_counter()
            session.run(None, dict(feeds))
            times.append(time.perf_counter() - t)
        ms = 1e3 * (min(times) if self.options.statistic == "min" else float(np.median(times)))
        self.measurements += 1
        self.seconds += time.perf_counter() - start
        return ms

    def _timed_form(self, model: ir.Model, feeds: Mapping[str, np.ndarray], probe: bool) -> bytes:
        """The bytes timed for ``model``: itself, or quantized first when the tables are of the int8 form."""
        form = self.options.int8
        if form is not None:
            from graphprune.backends.quantize import quantized_for_timing, timing_options

            model = quantized_for_timing(model, feeds, timing_options(form), probe=probe)
        return model_bytes(model)

    def _session(self, blob: bytes) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        if self.options.threads:
            opts.intra_op_num_threads = self.options.threads
        return ort.InferenceSession(blob, opts, providers=list(dict.fromkeys([self.provider, "CPUExecutionProvider"])))

    def time_beside(self, reference: ir.Model, model: ir.Model, feeds: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """Two whole models timed side by side, like the never-slower check (:func:`graphprune.execution.timing.side_by_side_ms`
        ``model_runs``): (``model`` ms, ``reference`` ms), their ratio not skewed by a load that changed between them."""
        start = time.perf_counter()
        blobs = [self._timed_form(m, feeds, probe=False) for m in (model, reference)]

        rounds, per_round = rounds_for(self.options.model_runs)
        runners = [session_runner(functools.partial(self._session, b), feeds) for b in blobs]
        model_ms, reference_ms = interleaved_ms(runners, rounds, per_round)
        self.model_timings += 2
        self.seconds += time.perf_counter() - start
        return model_ms, reference_ms

    def time_model(self, model: ir.Model, feeds: Mapping[str, np.ndarray]) -> float:
        """A whole model, timed like validation (:func:`graphprune.execution.timing.median_ms`: warmed up and timed
        for at least :data:`~graphprune.execution.timing.MIN_TIMED_MS` each; counted apart from the table points).
        A few warm-up runs are not enough: on the demo's ResNet-20 (0.33 ms) right after the torch work of the
        limit pass, 2 warm-up and 30 timed runs gave 0.40 ms, which set the scale of every prediction 20% high."""
        start = time.perf_counter()
        session = self._session(self._timed_form(model, feeds, probe=False))
        ms = median_ms(lambda: session.run(None, dict(feeds)), runs=self.options.model_runs, warmup=self.options.warmup)
        self.model_timings += 1
        self.seconds += time.perf_counter() - start
        return ms

    def spot_check(self, model: ir.Model) -> float:
        """A cached table point timed again to check the cache (counted apart from new measurements)."""
        ms = self.time(model)
        self.measurements -= 1
        self.spot_checks += 1
        return ms


def _group_index(coupling: Coupling) -> dict[Axis, list[tuple[int, int, int]]]:
    index: dict[Axis, list[tuple[int, int, int]]] = {}
    for g in coupling.prunable:
        for m in g.members:
            index.setdefault(Axis(m.tensor, m.axis), []).append((g.id, int(m.indices.shape[1]), g.channels))
    return index


def _build_table(om: OnnxModel, coupling: Coupling, sub: SubGraph, axes: tuple[AxisSpec, ...], counts: Mapping[int, tuple[int, ...]],
                 meter: _Meter, base_key: Mapping[str, Any], root: Path) -> tuple[OpTable, bool]:
    """Measure (or read) one table; returns it and whether it came wholly from the cache."""
    cache = _Cache(root, {**base_key, "signature": _signature(om.graph, sub.nodes, axes, meter.options.batch)})
    cands = [_axis_candidates(a, counts, meter.options.max_counts) for a in axes]
    todo = _grid(cands, min(meter.options.multiples))
    tensors = set(sub.om.graph.tensors)

    def probe(p: tuple[int, ...]) -> ir.Model:
        keep = {g: np.arange(k) for s, c in zip(p, cands) for g, k in c[s].items()}
        kept = kept_elements(plan_from_keep(coupling, keep), coupling, om.graph)
        return apply_kept(sub.om, {a: i for a, i in kept.items() if a.tensor in tensors})

    full = tuple(max(c) for c in cands)
    stale = False
    if meter.options.cache_check > 0 and full in cache.points:
        now = meter.spot_check(probe(full))  # the cache holds another time's timings: check one point before trusting the rest
        if abs(now / max(cache.points[full], 1e-9) - 1.0) > meter.options.cache_check:
            log.info("latency cache %s: the full-size point measures %.3f ms against %.3f cached: measuring the table again",
                     cache.path.name, now, cache.points[full])
            meter.stale_tables += 1
            cache.points, stale = {full: now}, True
    missing = [p for p in todo if p not in cache.points]
    meter.cache_hits += len(todo) - len(missing) - (1 if stale else 0)
    try:
        for p in missing:
            if meter.measurements >= meter.options.max_measurements:
                raise _BudgetSpent
            cache.points[p] = meter.time(probe(p))
    finally:
        if missing or stale:
            cache.save()
    points = tuple((p, cache.points[p]) for p in todo)
    return OpTable(sub.nodes[0].name, sub.op_types, axes, points, cache.hash), not missing and not stale


class _BudgetSpent(GraphpruneError):
    """The build's measurement budget is spent."""


def build_latency_model(om: OnnxModel, coupling: Coupling, options: LatencyOptions | None = None,
                        floors: Mapping[int, int] | None = None) -> LatencyModel:
    """Measure (or read from the cache) the latency tables of every op the prunable groups touch.

    Args:
        om: The model.
        coupling: Its groups; only prunable ones vary.
        options: Runtime setting and measurement budget.
        floors: Smallest count per group id to tabulate (e.g. the effective filters r_g); default 1.

    Returns:
        The latency model; ``stats`` says what building cost, ``left_out`` which ops have no table.

    Raises:
        BadInputError: For an unavailable provider or a floor outside [1, C].
    """
    options = options or LatencyOptions()
    start = time.perf_counter()
    provider = options.resolved_provider()
    import onnxruntime as ort

    from graphprune.execution.sessions import sample_inputs

    setting = cache_setting(options, provider, ort.__version__)
    floors = dict(floors or {})
    channels = {g.id: g.channels for g in coupling.prunable}
    for g, f in floors.items():
        if g not in channels or not 1 <= f <= channels[g]:
            raise BadInputError(f"floor {f} of group {g} is not within [1, C] of a prunable group")
    counts = {g: candidate_counts(floors.get(g, 1), c, options) for g, c in channels.items()}
    meter, root = _Meter(options, provider), options.cache_root()
    index = _group_index(coupling)
    whole: dict[tuple[int, ...], float] = {}  # this build's whole-model timings (never cached, see the module)
    feeds = sample_inputs(om.graph, batch=options.batch)
    whole[()] = meter.time_model(om.model, feeds)
    tables: list[OpTable] = []
    left_out: list[tuple[str, str]] = []
    cached, absorbed = 0, set[str]()
    for node in om.graph.nodes:
        touched = [t for t in (*node.inputs, *node.outputs) if t and any(Axis(t, i) in index for i in range(len(om.graph.shape(t) or ())))]
        if not touched or node.name in absorbed:
            continue
        if node.op_type in FREE:
            left_out.append((node.name, f"{node.op_type} is a view in onnxruntime"))
            continue
        chain = _followers(om.graph, node, absorbed)
        axes = _table_axes(node, om.graph, index)
        if not axes:
            left_out.append((node.name, "no prunable channel axis on its data path"))
            continue
        try:
            table, hit = _build_table(om, coupling, cut_subgraph(om, chain, options.batch), axes, counts, meter, setting, root)
        except _BudgetSpent:
            left_out.append((node.name, f"measurement budget ({options.max_measurements}) spent"))
            continue
        except Exception as exc:  # noqa: BLE001 - onnxruntime and rewrite failures of one probe leave that op out, reported
            log.warning("latency table of %s left out: %s", node.name, short_message(exc))
            left_out.append((node.name, short_message(exc)))
            continue
        absorbed.update(n.name for n in chain)
        tables.append(table)
        cached += hit
    lm = LatencyModel(whole[()], tuple(tables), counts, channels, tuple(left_out), setting, BuildStats())
    if options.calibrate:
        lm = _calibrate(om, coupling, lm, whole, meter, feeds)
    stats = BuildStats(meter.measurements, meter.cache_hits, len(tables), cached, time.perf_counter() - start, meter.seconds,
                       meter.model_timings, meter.spot_checks, meter.stale_tables)
    log.info("latency model: %d tables (%d cached), %d measurements in %.1f s, %d cache hits, scale %s",
             stats.tables, cached, stats.measurements, stats.measure_seconds, stats.cache_hits, lm.scale)
    return dataclasses.replace(lm, stats=stats)


def cache_setting(options: LatencyOptions, provider: str, ort_version: str) -> dict[str, Any]:
    """What every cache key holds: machine, onnxruntime version, provider, threads, batch and both statistics."""
    setting = {"format": FORMAT, "machine": _machine(provider), "onnxruntime": ort_version, "provider": provider,
               "threads": options.threads, "batch": options.batch, "statistic": options.statistic, "model_statistic": MODEL_STATISTIC}
    form = options.int8
    if form is None:
        return setting
    return {**setting, "quantized": f"{QUANTIZED_SETTING}, {form.describe()}",
            "int8": {"activations": form.activations, "reduce_range": form.reduce_range}}


def calibration_point(lm: LatencyModel) -> dict[int, int]:
    """Every tabulated group at its largest fast count up to half its channels (else its smallest fast count)."""
    point = {}
    for g, c in lm.channels.items():
        fast = lm.fast_counts(g)
        below = [k for k in fast if k <= (c + 1) // 2]
        point[g] = below[-1] if below else fast[0]
    return point


def blocked_point(lm: LatencyModel, multiple: int) -> dict[int, int]:
    """Every tabulated group at its largest tabulated multiple of ``multiple`` up to half its channels (else the
    smallest tabulated one; else all its channels): counts that keep onnxruntime's channel blocking whole."""
    point = {}
    for g, c in lm.channels.items():
        blocked = [k for k in lm.counts.get(g, ()) if k % multiple == 0 and k < c]
        below = [k for k in blocked if k <= (c + 1) // 2]
        point[g] = below[-1] if below else (blocked[0] if blocked else c)
    return point


def _pruned(om: OnnxModel, coupling: Coupling, keep: Mapping[int, int]) -> ir.Model:
    """The whole model with the first ``keep[g]`` channels of each group kept."""
    plan = plan_from_keep(coupling, {g: np.arange(k) for g, k in keep.items()})
    return apply_kept(om, kept_elements(plan, coupling, om.graph))


def _calibrate(om: OnnxModel, coupling: Coupling, lm: LatencyModel, whole: dict[tuple[int, ...], float], meter: _Meter,
               feeds: Mapping[str, np.ndarray]) -> LatencyModel:
    """Fit ``lm``'s scale to one whole-model measurement at :func:`calibration_point`; when that point
    measures no faster than the tables say (isolated probes favour counts that break the channel blocking), to
    one at :func:`blocked_point` of the largest probed multiple. That blocked point is measured either way and
    calibrates the plans whose counts keep the blocking (multiples of the smallest probed multiple; see
    :meth:`LatencyModel.corrected`)."""
    blocked = blocked_point(lm, max(meter.options.multiples))
    fitted = _calibrate_at(om, coupling, lm, calibration_point(lm), whole, meter, feeds)
    if fitted.scale is None and fitted.calibration_ms is not None:
        second = _calibrate_at(om, coupling, lm, blocked, whole, meter, feeds)
        fitted = second if second.scale is not None else fitted
    if all(k == lm.channels[g] for g, k in blocked.items()):
        return fitted
    ms = _measured(om, coupling, blocked, whole, meter, feeds)
    return fitted if ms is None else fitted.with_blocked(blocked, ms, min(meter.options.multiples))


def _key(point: Mapping[int, int]) -> tuple[int, ...]:
    return tuple(point[g] for g in sorted(point))


def _measured(om: OnnxModel, coupling: Coupling, point: dict[int, int], whole: dict[tuple[int, ...], float], meter: _Meter,
              feeds: Mapping[str, np.ndarray]) -> float | None:
    """The whole model pruned at ``point``, timed beside the original once per build (None when it cannot run)."""
    key = _key(point)
    if key not in whole:
        try:  # timed beside the original, as a ratio to it, on the scale of the build's own timing of the original
            point_ms, original_ms = meter.time_beside(om.model, _pruned(om, coupling, point), feeds)
            whole[key] = whole[()] * point_ms / original_ms
        except Exception as exc:  # noqa: BLE001 - a calibration that cannot run leaves the model uncalibrated, said
            log.warning("latency calibration skipped: %s", short_message(exc))
            return None
    return whole[key]


def _calibrate_at(om: OnnxModel, coupling: Coupling, lm: LatencyModel, point: dict[int, int], whole: dict[tuple[int, ...], float],
                  meter: _Meter, feeds: Mapping[str, np.ndarray]) -> LatencyModel:
    """``lm`` fitted to one whole-model measurement at ``point`` (measured once per build)."""
    if all(k == lm.channels[g] for g, k in point.items()):
        return lm  # the tables see nothing faster: nothing to fit
    ms = _measured(om, coupling, point, whole, meter, feeds)
    return lm if ms is None else lm.calibrated(point, ms)


def measure_plan_error(om: OnnxModel, coupling: Coupling, latency: LatencyModel, keep: Mapping[int, int],
                       options: LatencyOptions | None = None) -> tuple[float, float, float]:
    """Apply ``keep`` (counts per group; first channels kept) and time the whole pruned model once.

    Args:
        om: The model the latency model was built for.
        coupling: Its groups.
        latency: The latency model.
        keep: Channels kept per group id.
        options: Runtime setting; default: the latency model's own (provider, threads, batch).

    Returns:
        (predicted ms, measured ms, (predicted - measured) / measured).
    """
    from graphprune.execution.sessions import sample_inputs

    s = latency.setting
    options = options or LatencyOptions(batch=int(s["batch"]), threads=int(s["threads"]), provider=str(s["provider"]),
                                         statistic=str(s["statistic"]), quantized=bool(s.get("quantized")))
    predicted = latency.predict(keep)
    meter = _Meter(options, options.resolved_provider())
    measured = meter.time_model(_pruned(om, coupling, keep), sample_inputs(om.graph, batch=options.batch))
    return predicted, measured, (predicted - measured) / measured
