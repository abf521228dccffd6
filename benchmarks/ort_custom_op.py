"""The ONNX Runtime custom-op library (libgpstoken_ort_ops.so) against the model-local function, one run.

    cmake -S . -B build/ort -DORT_INCLUDE_DIR=/path/to/onnxruntime/headers -DGPSTOKEN_TORCH_EXTENSION=OFF \\
          -DGPSTOKEN_PARTITION_MODULE=OFF -DGPSTOKEN_CUDA=OFF && cmake --build build/ort --target gpstoken_ort_ops
    python benchmarks/ort_custom_op.py build/ort/libgpstoken_ort_ops.so

Checks the library's output against gpstoken.splat_reference (float64) and times one GaussianSplat node
three ways: the library on the bare node, the library with the local function present (ORT picks the
kernel), and the local function alone (the dense standard-op body). B=8, L=128, C=16, 64x64.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from gpstoken_core.official import SUPPORT
from gpstoken_export.splat_function import DOMAIN, DOMAIN_VERSION, ONNX_OPSET, OP_TYPE, add_splat_function
from onnx import TensorProto, helper

import gpstoken


def one_node(with_function: bool, size: int) -> bytes:
    node = helper.make_node(OP_TYPE, ["g", "f"], ["y"], domain=DOMAIN, height=size, width=size, support=SUPPORT)
    graph = helper.make_graph(
        [node], "splat",
        [helper.make_tensor_value_info("g", TensorProto.FLOAT, ["B", "L", 5]), helper.make_tensor_value_info("f", TensorProto.FLOAT, ["B", "L", "C"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "C", size, size])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    return (add_splat_function(model) if with_function else model).SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("library", help="path of libgpstoken_ort_ops.so")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(8, 128, 5, generator=gen, dtype=torch.float64)
    g[..., :2] = g[..., :2] * 0.1 + 0.01
    g[..., 2] = g[..., 2] * 1.8 - 0.9
    g[..., 3:] = g[..., 3:] * 2.2 - 1.1
    f = torch.randn(8, 128, 16, generator=gen, dtype=torch.float64)
    ref = gpstoken.splat_reference(g, f, (args.size, args.size)).numpy()
    feeds = {"g": g.float().numpy(), "f": f.float().numpy()}
    with_lib = ort.SessionOptions()
    with_lib.register_custom_ops_library(args.library)
    print(f"onnxruntime {ort.__version__}\n")
    print("| GaussianSplat node | max abs error vs float64 reference | median ms | vs local function |")
    print("|---|---|---|---|")
    rows = []
    for name, blob, options in [
        ("custom-op library, bare node", one_node(False, args.size), with_lib),
        ("custom-op library + local function", one_node(True, args.size), with_lib),
        ("local function only (standard ops)", one_node(True, args.size), ort.SessionOptions()),
    ]:
        session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        out = session.run(None, feeds)[0]
        times = []
        for _ in range(20):
            t = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - t)
        rows.append((name, float(np.abs(out - ref).max()), statistics.median(times) * 1000))
    baseline = rows[-1][2]
    for name, err, ms in rows:
        print(f"| {name} | {err:.2e} | {ms:.2f} | {baseline / ms:.1f}x |")


if __name__ == "__main__":
    main()
