"""Inference backends: one object per graph, ``run(feeds) -> outputs``. The TensorRT backend implements
the same interface, so callers don't change with the engine."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class Backend(ABC):
    """One loaded graph."""

    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in ``output_names`` order."""


class OnnxRuntimeBackend(Backend):
    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, custom_ops_library: str | None = None):
        """``custom_ops_library``: libgpstoken_ort_ops.so (default: $GPSTOKEN_ORT_OPS if set) runs GaussianSplat
        with the compiled kernel instead of the file's dense standard-op function."""
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


def _tensorrt_backend(*args, **kwargs) -> Backend:
    from .tensorrt_backend import TensorRTBackend  # imports tensorrt only when asked for

    return TensorRTBackend(*args, **kwargs)


BACKENDS = {"onnxruntime": OnnxRuntimeBackend, "tensorrt": _tensorrt_backend}
