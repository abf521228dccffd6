"""benchmarks/flops.py counts FLOPs from the shapes ONNX Runtime reports: checked against closed forms."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def load_flops():
    spec = importlib.util.spec_from_file_location("flops", ROOT / "benchmarks" / "flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_graph_flops_match_closed_forms(tmp_path):
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((7, 3)).astype(np.float32), "m"),
        numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "gw"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),  # (1, 3, 8, 8) -> (1, 4, 8, 8)
        helper.make_node("MatMul", ["a", "m"], ["b"]),  # (2, 5, 7) @ (7, 3)
        helper.make_node("Gemm", ["c", "gw"], ["d"], transB=1),  # (4, 6) @ (6, 5)
        helper.make_node("Relu", ["d"], ["e"]),  # not counted
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8]),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 5, 7]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [4, 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "b", "e")], inits,
    )  # fmt: skip
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    feeds = {"x": np.zeros((2, 3, 8, 8), np.float32), "a": np.zeros((2, 5, 7), np.float32), "c": np.zeros((4, 6), np.float32)}
    counts = load_flops().graph_flops(path, feeds)
    assert counts == {"Conv": 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3), "MatMul": 2 * (2 * 5 * 3) * 7, "Gemm": 2 * (4 * 5) * 6}
