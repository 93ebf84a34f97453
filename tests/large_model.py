"""Write wide MLP-style ONNX models with external data, weight by weight (for large-model tests and benchmarks).

Run: python tests/large_model.py OUT.onnx --width 8192 --layers 9   (about 2.4 GB of weights)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["write_wide_model"]


def _external(name: str, shape: tuple[int, ...], location: str, offset: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
    length = int(np.prod(shape)) * 4
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)
    return t


def write_wide_model(path: Path, width: int, layers: int, seed: int = 0) -> int:
    """``layers`` Gemm(width x width) + Relu blocks and a 10-way classifier; returns the weight bytes.

    Weights go to ``<name>.data`` one tensor at a time, so writing needs memory for one layer only.
    """
    rng = np.random.default_rng(seed)
    data = path.with_name(path.name + ".data")
    inits, nodes, offset = [], [], 0
    x = "input"
    with open(data, "wb") as f:
        for i in range(layers + 1):
            cout = width if i < layers else 10
            for name, shape in ((f"w{i}", (cout, width)), (f"b{i}", (cout,))):
                arr = (rng.standard_normal(shape, dtype=np.float32) * (1.0 / np.sqrt(width))).astype(np.float32)
                f.write(arr.tobytes())
                inits.append(_external(name, shape, data.name, offset))
                offset += arr.nbytes
            y = f"h{i}" if i < layers else "logits"
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y if i == layers else f"g{i}"], transB=1, name=f"gemm{i}"))
            if i < layers:
                nodes.append(helper.make_node("Relu", [f"g{i}"], [y], name=f"relu{i}"))
            x = y
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return offset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", type=Path)
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--layers", type=int, default=9)
    args = p.parse_args()
    size = write_wide_model(args.output, args.width, args.layers)
    print(f"{args.output}: {size / 2**30:.2f} GiB of weights")


if __name__ == "__main__":
    main()
