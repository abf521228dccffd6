"""TensorRT backend: the engines `gpstoken export --tensorrt` builds, run with the same API as ONNX Runtime.

    tok = Tokenizer.load("exported/", backend="tensorrt", plugin_library="libgpstoken_trt.so")

Device memory, pinned host buffers and the stream come from cuda-bindings (``cuda.bindings.runtime``,
the maintained binding TensorRT's own samples use). One stream per graph; buffers grow as needed and
are reused; with ``cuda_graph=True`` a CUDA graph is captured per input shape and replayed.

Imports neither torch nor TensorRT until a backend is created, so ``import gpstoken_runtime`` works
everywhere; without TensorRT the error says what to install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpstoken_core.manifest import tensorrt_files
from gpstoken_core.tensorrt import (  # noqa: F401  (TensorRTUnavailable, EngineMismatch: raised to callers)
    EngineMismatch,
    TensorRTUnavailable,
    check_cuda,
    check_engine_compatibility,
    find_plugin_library,
    gpu_properties,
    import_cudart,
    import_tensorrt,
    load_plugin,
)

from .base import Backend

_NUMPY_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
                "INT8": np.int8, "UINT8": np.uint8}


def _numpy_type(engine, name: str):
    kind = engine.get_tensor_dtype(name).name
    if kind not in _NUMPY_TYPES:
        raise EngineMismatch(f"engine tensor {name!r} has TensorRT type {kind}, which this runtime does not feed or read")
    return _NUMPY_TYPES[kind]


class TensorRTBackend(Backend):
    @classmethod
    def from_manifest(cls, folder: Path, manifest: dict, graph: str, device: str = "cuda", threads: int | None = None,
                      plugin_library=None, cuda_graph: bool = False) -> TensorRTBackend:
        """The engine of ``graph`` from the manifest's tensorrt section (checked: present, hash, this GPU)."""
        engine = tensorrt_files(folder, manifest).get(graph)
        if engine is None:
            raise EngineMismatch(f"the manifest's tensorrt section has no engine for the {graph} graph; rebuild the engines (gpstoken export --tensorrt)")
        device = "cuda" if device == "cpu" else device
        return cls(engine, device=device, plugin_library=plugin_library, cuda_graph=cuda_graph, manifest_section=manifest["tensorrt"])

    def __init__(self, path: str | Path, device: str = "cuda", threads: int | None = None, plugin_library=None,
                 cuda_graph: bool = False, manifest_section: dict | None = None):
        """``path``: a serialized engine. ``threads`` is accepted for API symmetry and unused."""
        if device not in ("cuda", "cuda:0") and not device.startswith("cuda"):
            raise ValueError(f"the TensorRT backend runs on cuda devices, got device={device!r}")
        trt = import_tensorrt()
        self.cudart = cudart = import_cudart()
        self.device = int(device.split(":")[1]) if ":" in device else 0
        check_cuda(cudart.cudaSetDevice(self.device), "cudaSetDevice")
        if manifest_section is not None:
            check_engine_compatibility(manifest_section, trt.__version__, *gpu_properties(self.device))
        load_plugin(trt, find_plugin_library(plugin_library))
        self.logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise EngineMismatch(f"{path}: TensorRT could not deserialize the engine (another TensorRT version or GPU?)")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _numpy_type(engine, n) for n in names}
        self.profile = {n: tuple(tuple(d) for d in engine.get_tensor_profile_shape(n, 0)) for n in self.input_names}
        self.device_buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)
        self.host_buffers: dict[str, tuple[int, int]] = {}  # pinned
        self.use_cuda_graph = cuda_graph
        self.graphs: dict[tuple, object] = {}

    # ---------------------------------------------------------------- buffers
    def _buffer(self, pool: dict, name: str, nbytes: int, pinned: bool) -> int:
        ptr, size = pool.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                check_cuda((self.cudart.cudaFreeHost if pinned else self.cudart.cudaFree)(ptr), "free")
            alloc = self.cudart.cudaMallocHost if pinned else self.cudart.cudaMalloc
            ptr = int(check_cuda(alloc(max(nbytes, 1)), "cudaMallocHost" if pinned else "cudaMalloc"))
            pool[name] = (ptr, nbytes)
            if not pinned:
                self._drop_graphs()  # captured graphs hold the old device addresses (host copies are outside them)
        return ptr

    def _host_view(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(self.dtypes[name])
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr = self._buffer(self.host_buffers, name, nbytes, pinned=True)
        import ctypes

        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    # ---------------------------------------------------------------- run
    def _check_feed(self, name: str, array: np.ndarray) -> np.ndarray:
        expected = self.dtypes[name]
        if array.dtype != expected:
            raise ValueError(f"input {name!r}: dtype {array.dtype}, the engine takes {np.dtype(expected)}")
        lo, _, hi = self.profile[name]
        if len(array.shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(array.shape, lo, hi)):
            raise ValueError(
                f"input {name!r}: shape {tuple(array.shape)} is outside the engine's optimization profile "
                f"(min {lo}, max {hi}); rebuild with a larger --max-batch / --max-tokens"
            )
        return np.ascontiguousarray(array)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        cudart, stream = self.cudart, self.stream
        H2D, D2H = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise ValueError(f"missing inputs {sorted(missing)}")
        key = []
        for name in self.input_names:
            array = self._check_feed(name, np.asarray(feeds[name]))
            key.append(array.shape)
            host = self._host_view(name, array.shape)
            host[...] = array
            dev = self._buffer(self.device_buffers, name, array.nbytes, pinned=False)
            if not self.context.set_input_shape(name, array.shape):
                raise ValueError(f"input {name!r}: TensorRT refused shape {tuple(array.shape)}")
            self.context.set_tensor_address(name, dev)
            check_cuda(cudart.cudaMemcpyAsync(dev, host.ctypes.data, array.nbytes, H2D, stream), "cudaMemcpyAsync")
        shapes = {n: tuple(self.context.get_tensor_shape(n)) for n in self.output_names}
        for name, shape in shapes.items():
            nbytes = int(np.prod(shape)) * np.dtype(self.dtypes[name]).itemsize
            self.context.set_tensor_address(name, self._buffer(self.device_buffers, name, nbytes, pinned=False))
        self._execute(tuple(key))
        outputs = []
        for name, shape in shapes.items():
            host = self._host_view(name, shape)
            dev, _ = self.device_buffers[name]
            check_cuda(cudart.cudaMemcpyAsync(host.ctypes.data, dev, host.nbytes, D2H, stream), "cudaMemcpyAsync")
            outputs.append(host)
        check_cuda(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return [o.copy() for o in outputs]

    def _execute(self, key: tuple) -> None:
        cudart, stream = self.cudart, self.stream
        if not self.use_cuda_graph:
            if not self.context.execute_async_v3(int(stream)):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            return
        if key not in self.graphs:
            # TensorRT needs one plain run after a shape change before it can be captured.
            if not self.context.execute_async_v3(int(stream)):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            check_cuda(cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
            captured = self.context.execute_async_v3(int(stream))
            graph = check_cuda(cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")  # always leave capture mode
            try:
                if not captured:
                    raise RuntimeError("TensorRT execute_async_v3 failed during CUDA-graph capture (see the TensorRT log)")
                self.graphs[key] = check_cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            finally:
                cudart.cudaGraphDestroy(graph)  # the instantiated graph is independent of it
        check_cuda(cudart.cudaGraphLaunch(self.graphs[key], stream), "cudaGraphLaunch")

    def _drop_graphs(self) -> None:
        for graph_exec in self.graphs.values():
            self.cudart.cudaGraphExecDestroy(graph_exec)
        self.graphs.clear()

    def __del__(self):
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        if getattr(self, "graphs", None):
            self._drop_graphs()
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
        for ptr, _ in getattr(self, "device_buffers", {}).values():
            cudart.cudaFree(ptr)
        for ptr, _ in getattr(self, "host_buffers", {}).values():
            cudart.cudaFreeHost(ptr)
