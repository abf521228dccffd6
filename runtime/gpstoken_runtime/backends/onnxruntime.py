"""ONNX Runtime backend: runs the export's ONNX files on the CPU (or CUDA with onnxruntime-gpu)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import Backend


class OnnxRuntimeBackend(Backend):
    @classmethod
    def from_manifest(cls, folder: Path, manifest: dict, graph: str, device: str = "cpu", threads: int | None = None,
                      custom_ops_library: str | None = None, stop_spinning: bool = True) -> OnnxRuntimeBackend:
        return cls(Path(folder) / manifest["files"][graph]["path"], device, threads, custom_ops_library, stop_spinning)

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, custom_ops_library: str | None = None,
                 stop_spinning: bool = True):
        """``custom_ops_library``: libgpstoken_ort_ops.so (default: $GPSTOKEN_ORT_OPS if set) runs GaussianSplat
        with the compiled kernel instead of the file's dense standard-op function.

        ``stop_spinning``: the session's worker threads stop busy-waiting when a run returns. ONNX Runtime's
        default keeps them spinning for a while, and every session has its own pool, so the encoder's idle
        threads took the cores from the decoder (and the partition) that run right after it: 20-30% of a
        tiny-model reconstruction at batch 1 on 2 cores (benchmarks/runtime.py, fp32-spinning). Threads
        still spin inside a run, between its nodes. False restores ONNX Runtime's default."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        library = custom_ops_library or os.environ.get("GPSTOKEN_ORT_OPS")
        if library:
            if not Path(library).exists():
                raise FileNotFoundError(f"{library}: custom-op library not found")
            options.register_custom_ops_library(str(library))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        if stop_spinning:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        options.log_severity_level = 3  # errors only; ORT warns about harmless constant-folding limits
        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        elif device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("device cuda needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            raise ValueError(f"unknown device {device!r} (cpu or cuda)")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)
