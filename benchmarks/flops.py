"""FLOPs of exported graphs, counted from the ONNX files with concrete input shapes, and this CPU's GEMM peak.

    python benchmarks/flops.py [--models tiny m128] [--size 256]

Counted (2 FLOPs per multiply-add) from the shapes ONNX Runtime reports when it runs the graph: Conv,
ConvTranspose, MatMul, Gemm; element-wise ops, norms, resizes and the splat's own arithmetic are
left out (a few % of these models). The peak is numpy's float32 GEMM
(OpenBLAS) at 2048^3 on all cores, the best of a few runs: the distance between it and a model's achieved
GFLOP/s (FLOPs / measured time) is what an implementation could still gain.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def graph_flops(model: str | Path | bytes, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """{op type: FLOPs} of one run of the ONNX file (or serialized model) on ``feeds``, from the shapes ONNX
    Runtime reports in its profile (basic graph optimizations only, so the nodes are the file's, with
    constant subgraphs such as the Winograd filter transforms folded; a local function, such as the
    splat's dense form, is counted through the nodes it inlines to)."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    out: dict[str, int] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        kind = args.get("op_name")
        shapes = [list(d.values())[0] for d in args.get("input_type_shape", [])]
        outs = [list(d.values())[0] for d in args.get("output_type_shape", [])]
        if not outs:
            continue
        y = int(np.prod(outs[0]))
        if kind == "Conv":
            flops = 2 * y * int(np.prod(shapes[1][1:]))  # weight (Cout, Cin/groups, kh, kw)
        elif kind == "ConvTranspose":
            w = shapes[1]  # (Cin, Cout/groups, kh, kw): each input element meets Cout/groups x kh x kw weights
            flops = 2 * int(np.prod(shapes[0])) * int(np.prod(w[1:]))
        elif kind in ("MatMul", "Gemm"):  # torch exports Gemm with transA = 0: A is (M, K)
            flops = 2 * y * shapes[0][-1]
        else:
            continue
        out[kind] = out.get(kind, 0) + int(flops)
    return out


def gemm_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 GEMM rate of numpy (OpenBLAS, all cores) at n x n x n, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def tokenizer_flops(folder: str | Path, image: np.ndarray, winograd: bool | int | None = None) -> dict[str, dict[str, int]]:
    """FLOPs of encoding and decoding ``image`` (H, W, 3 uint8) with a `gpstoken export` folder: the runtime
    reconstructs it once while its graphs' feeds are recorded, then each graph is counted on them, as the
    runtime runs it on the CPU (``winograd`` as ``Tokenizer.load`` takes it: the convolutions it rewrites)."""
    import onnx
    from gpstoken_core.winograd import rewrite_convolutions
    from gpstoken_runtime import Tokenizer
    from gpstoken_runtime.backends.onnxruntime import winograd_channels

    tok = Tokenizer.load(folder, winograd=winograd)
    seen: dict[str, list] = {}
    for name, backend in tok.graphs.items():
        run = backend.run

        def record(feeds, name=name, run=run):
            seen.setdefault(name, []).append(dict(feeds))
            return run(feeds)

        backend.run = record
    tok.reconstruct(image[None])
    channels = winograd_channels(tok.manifest, "cpu", winograd)
    counts: dict[str, dict[str, int]] = {}
    for name, calls in seen.items():
        model = Path(folder) / tok.manifest["files"][name]["path"]
        if tok.graphs[name].winograd_convolutions:
            proto = onnx.load(str(model))
            rewrite_convolutions(proto, channels)
            model = proto.SerializeToString()
        total: dict[str, int] = {}
        for feeds in calls:
            for kind, flops in graph_flops(model, feeds).items():
                total[kind] = total.get(kind, 0) + flops
        counts[name] = total
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "m128"])
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    import torch
    from gpstoken_export.export import export_model

    import gpstoken

    print(f"float32 GEMM peak (numpy, 2048^3): {gemm_peak_gflops():.0f} GFLOP/s\n")
    from gpstoken_core.imageio import bundled_photo, center_crop_resize

    image = center_crop_resize(bundled_photo("astronaut"), args.size)
    print("| model | encoder GFLOP | decoder GFLOP | total GFLOP per image |")
    print("|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = gpstoken.GPSTokenizer(name).eval()
        with tempfile.TemporaryDirectory() as tmp:
            counts = tokenizer_flops(export_model(model, Path(tmp) / "export"), image)
        enc = sum(counts["encoder"].values()) / 1e9
        dec = sum(sum(c.values()) for k, c in counts.items() if k != "encoder") / 1e9
        print(f"| {name} | {enc:.2f} | {dec:.2f} | {enc + dec:.2f} |")


if __name__ == "__main__":
    main()
