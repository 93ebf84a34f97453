"""Bad-input corpus: mutated ONNX files, and a runner that checks graphprune fails cleanly on each.

Generate and run (each file: ``graphprune prune F -o OUT --ratio 0.5 --verify``
in a forked child, with a time and a memory bound):

    python tests/fuzz_corpus.py --count 1000 --out /tmp/corpus --run [--json result.json]

A file passes when the command exits 0, 2 or 3 with at most one line on
stderr and no traceback, within ``--timeout`` seconds and ``--max-rss`` MB.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MUTATIONS", "Outcome", "generate", "run_corpus"]

BASE_MODELS = ("vgg", "resnet20", "mobilenetv2", "shufflenetv2")
OK_CODES = (0, 2, 3)


def _base_protos(folder: Path) -> dict[str, onnx.ModelProto]:
    from graphprune import models

    out = {}
    for name in BASE_MODELS:
        path = folder / f"{name}.onnx"
        models.export_onnx(models.build(name), path, bn="keep" if name == "resnet20" else "fold")
        out[name] = onnx.load(str(path))
    return out


Mutation = Callable[[onnx.ModelProto, random.Random, Path], bytes | None]
MUTATIONS: dict[str, Mutation] = {}


def _mutation(fn: Mutation) -> Mutation:
    MUTATIONS[fn.__name__.lstrip("_")] = fn
    return fn


def _bytes(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString()


@_mutation
def _truncated(m: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    data = _bytes(m)
    return data[: rng.randrange(0, len(data))]


@_mutation
def _flipped_bytes(m: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    data = bytearray(_bytes(m))
    for _ in range(rng.choice((1, 2, 8, 64))):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


@_mutation
def _wrong_dims(m: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    """An initializer or a declared input/output shape gets a wrong dim."""
    if rng.random() < 0.5 and m.graph.initializer:
        t = rng.choice(list(m.graph.initializer))
        arr = numpy_helper.to_array(t)
        if arr.ndim:
            shape = list(arr.shape)
            k = rng.randrange(len(shape))
            shape[k] = max(1, shape[k] + rng.choice((-1, 1, 3)))
            new = np.resize(arr, shape).astype(arr.dtype)
            t.CopyFrom(numpy_helper.from_array(new, t.name))
    else:
        vi = rng.choice([*m.graph.input, *m.graph.output])
        dims = vi.type.tensor_type.shape.dim
        if dims:
            d = rng.choice(list(dims))
            d.ClearField("dim_param")
            d.dim_value = rng.choice((0, 1, 2, 5, 3000))
    return _bytes(m)


@_mutation
def _dangling_edge(m: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    node = rng.choice(list(m.graph.node))
    if node.input:
        node.input[rng.randrange(len(node.input))] = f"missing_{rng.randrange(1000)}"
    else:
        node.input.append("missing")
    return _bytes(m)


@_mutation
def _cycle(m: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    """A node reads the output of a node after it (directly or further down)."""
    nodes = list(m.graph.node)
    readers = [k for k, n in enumerate(nodes[:-1]) if n.input]
    i = rng.choice(readers)
    j = rng.randrange(i + 1, len(nodes))
    nodes[i].input[rng.randrange(len(nodes[i].input))] = nodes[j].output[0]
    return _bytes(m)


@_mutation
def _missing_initializer(m: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    if m.graph.initializer:
        del m.graph.initializer[rng.randrange(len(m.graph.initializer))]
    return _bytes(m)


@_mutation
def _huge_shape(m: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    """Huge declared dims: on an input, or on an initializer whose data does not match."""
    if rng.random() < 0.5:
        vi = m.graph.input[0]
        for d in list(vi.type.tensor_type.shape.dim)[1:]:
            d.ClearField("dim_param")
            d.dim_value = rng.choice((1 << 20, 1 << 31, 1 << 40))
    else:
        t = rng.choice(list(m.graph.initializer))
        t.dims[:] = [rng.choice((1 << 31, 1 << 40)), *t.dims[1:]] if t.dims else [1 << 40]
    return _bytes(m)


@_mutation
def _escaping_external_data(m: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    """An initializer's external data points outside the model's folder (or nowhere)."""
    t = rng.choice([t for t in m.graph.initializer if t.dims])
    location = rng.choice(("../outside.bin", "/etc/passwd", "../../../../../etc/hostname", "sub/../../x.bin", "missing.bin"))
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="length", value=str(4 * int(np.prod(t.dims))))
    return _bytes(m)


@_mutation
def _bad_attribute(m: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    """A conv gets an impossible group, kernel or pads attribute, or an op its opset lacks."""
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    node = rng.choice(convs or list(m.graph.node))
    kind = rng.randrange(4)
    if kind == 0:
        node.attribute.append(helper.make_attribute("group", rng.choice((0, 3, 7, -1))))
    elif kind == 1:
        node.attribute.append(helper.make_attribute("pads", [rng.randrange(-3, 50)] * 4))
    elif kind == 2:
        node.op_type = rng.choice(("NoSuchOp", "Conv2D", "Relu6"))
    else:
        m.opset_import[0].version = rng.choice((1, 5, 999))
    return _bytes(m)


@_mutation
def _wrong_dtype(m: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    """An input or initializer declares another element type."""
    if rng.random() < 0.5:
        m.graph.input[0].type.tensor_type.elem_type = rng.choice((TensorProto.INT64, TensorProto.STRING, TensorProto.DOUBLE, 0))
    else:
        t = rng.choice(list(m.graph.initializer))
        t.data_type = rng.choice((TensorProto.INT8, TensorProto.DOUBLE, TensorProto.FLOAT16, 99))
    return _bytes(m)


@_mutation
def _graph_surgery(m: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    """Duplicate outputs, removed graph outputs, removed nodes, or nodes swapped out of order."""
    kind = rng.randrange(4)
    nodes = list(m.graph.node)
    if kind == 0 and len(nodes) > 2:
        a, b = rng.sample(range(len(nodes)), 2)
        nodes[a].output[0] = nodes[b].output[0]
    elif kind == 1:
        del m.graph.output[:]
    elif kind == 2:
        del m.graph.node[rng.randrange(len(nodes))]
    else:
        perm = nodes[:]
        rng.shuffle(perm)
        del m.graph.node[:]
        m.graph.node.extend(perm)
    return _bytes(m)


def generate(out: Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` mutated models (kinds in turn, base models at random) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        bases = _base_protos(Path(tmp))
    kinds = sorted(MUTATIONS)
    paths = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        base = rng.choice(BASE_MODELS)
        m = onnx.ModelProto()
        m.CopyFrom(bases[base])
        data = MUTATIONS[kind](m, rng, out)
        path = out / f"{i:05d}-{kind}-{base}.onnx"
        path.write_bytes(data or b"")
        paths.append(path)
    return paths


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one file did: exit code (None: killed), stderr lines, traceback seen, seconds, why it was killed."""

    path: str
    code: int | None
    stderr_lines: int
    traceback: bool
    seconds: float
    killed: str = ""

    @property
    def ok(self) -> bool:
        return self.code in OK_CODES and not self.traceback and self.stderr_lines <= 1 and not self.killed


def _child(path: str, out_dir: str, conn) -> None:
    from graphprune.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["prune", path, "-o", os.path.join(out_dir, "out.onnx"), "--ratio", "0.5", "--verify",
                         "--latency-runs", "0", "--force"])
        except BaseException as exc:  # noqa: BLE001 - what escapes main is what the user would see
            import traceback

            traceback.print_exc(file=err)
            code = 99 if not isinstance(exc, SystemExit) else int(exc.code or 0)
    text = err.getvalue()
    conn.send((code, len([ln for ln in text.splitlines() if ln.strip()]), "Traceback" in text))
    conn.close()


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def run_one(path: Path, timeout: float, max_rss_mb: float) -> Outcome:
    """Run ``graphprune prune`` on one file in a forked child and watch its time and the memory it adds."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    with tempfile.TemporaryDirectory() as out_dir:
        base = _rss_mb(os.getpid())  # the forked child starts with the parent's pages: bound what it adds
        t0 = time.perf_counter()
        proc = ctx.Process(target=_child, args=(str(path), out_dir, send))
        proc.start()
        send.close()
        killed = ""
        while proc.is_alive():
            proc.join(0.05)
            if time.perf_counter() - t0 > timeout:
                killed = "timeout"
            elif _rss_mb(proc.pid) - base > max_rss_mb:
                killed = "memory"
            if killed:
                proc.kill()
                proc.join()
        seconds = time.perf_counter() - t0
        if killed or not recv.poll():
            return Outcome(str(path), None, 0, False, seconds, killed or f"died (exit {proc.exitcode})")
        code, lines, tb = recv.recv()
        return Outcome(str(path), code, lines, tb, seconds)


def run_corpus(paths: list[Path], timeout: float = 60.0, max_rss_mb: float = 3000.0, jobs: int = 2,
               progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
    """Run every file (``jobs`` children at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    done = 0
    results: list[Outcome] = []
    with ThreadPoolExecutor(jobs) as pool:
        for outcome in pool.map(lambda p: run_one(p, timeout, max_rss_mb), paths):
            results.append(outcome)
            done += 1
            if progress:
                progress(done, len(paths))
    return results


def summary(results: list[Outcome]) -> dict:
    """Counts for the README: exit codes, failures, killed, slowest."""
    return {
        "files": len(results),
        "exit_codes": dict(Counter(str(r.code) for r in results)),
        "failures": [dataclasses.asdict(r) for r in results if not r.ok],
        "tracebacks": sum(r.traceback for r in results),
        "timeouts": sum(r.killed == "timeout" for r in results),
        "memory_kills": sum(r.killed == "memory" for r in results),
        "slowest_s": round(max((r.seconds for r in results), default=0.0), 2),
        "total_s": round(sum(r.seconds for r in results), 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "graphprune-corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", action="store_true", help="run graphprune on every file and report")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--max-rss", type=float, default=3000.0, help="MB")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    paths = generate(args.out, args.count, args.seed)
    print(f"{len(paths)} files in {args.out}")
    if not args.run:
        return 0
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("fuzzing", total=len(paths))
        results = run_corpus(paths, args.timeout, args.max_rss, args.jobs, lambda d, t: bar.update(task, completed=d))
    s = summary(results)
    by_kind = Counter((Path(r.path).name.split("-")[1], r.code) for r in results)
    for (kind, code), n in sorted(by_kind.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        print(f"{kind:24s} exit {code}: {n}")
    print(json.dumps({k: v for k, v in s.items() if k != "failures"}, indent=1))
    for f in s["failures"][:20]:
        print("FAIL", f)
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))
    return 0 if not s["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
