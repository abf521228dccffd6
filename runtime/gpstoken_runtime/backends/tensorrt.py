"""TensorRT backend: the engines `gpstoken export --tensorrt` builds, run with the same API as ONNX Runtime.

    tok = Tokenizer.load("exported/", backend="tensorrt", plugin_library="libgpstoken_trt.so")

Device memory, pinned host buffers and the stream come from cuda-bindings (``cuda.bindings.runtime``,
the maintained binding TensorRT's own samples use). One stream per graph; buffers grow as needed and
are reused; with ``cuda_graph=True`` each input shape gets its own execution context, runs plainly once,
is captured as a CUDA graph on its second call and replayed after that. ``run_device`` keeps inputs and
outputs on the GPU (``cuda_arrays``): the generator's sampler state never leaves the device.

Imports neither torch nor TensorRT until a backend is created, so ``import gpstoken_runtime`` works
everywhere; without TensorRT the error says what to install.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
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


class _Slot:
    """One execution context with its device buffers and, with CUDA graphs, the graph captured on them.

    TensorRT only promises that a captured graph replays the context state of its capture, so each input
    shape that gets a graph has its own context and buffers (their addresses are baked into the graph)."""

    def __init__(self, context):
        self.context = context
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.host: dict[str, tuple[int, int]] = {}  # pinned staging for host feeds / results
        self.graph = None  # cudaGraphExec_t
        self.runs = 0


class TensorRTBackend(Backend):
    MAX_GRAPHS = 8  # shapes with a captured graph (and a context) kept; the least recently used is dropped

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
        self._use_device()
        if manifest_section is not None:
            check_engine_compatibility(manifest_section, trt.__version__, *gpu_properties(self.device))
        load_plugin(trt, find_plugin_library(plugin_library))
        self.logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise EngineMismatch(f"{path}: TensorRT could not deserialize the engine (another TensorRT version or GPU?)")
        self.engine = engine
        self.stream = check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _numpy_type(engine, n) for n in names}
        self.profile = {n: tuple(tuple(d) for d in engine.get_tensor_profile_shape(n, 0)) for n in self.input_names}
        self.use_cuda_graph = cuda_graph
        self.slots: OrderedDict = OrderedDict()  # input shapes (or None without CUDA graphs) -> _Slot

    def _use_device(self) -> None:
        # The current device is per host thread: set it on every entry (threads, several GPUs).
        check_cuda(self.cudart.cudaSetDevice(self.device), "cudaSetDevice")

    # ---------------------------------------------------------------- contexts and buffers
    def _slot(self, key: tuple) -> _Slot:
        key = key if self.use_cuda_graph else None
        slot = self.slots.get(key)
        if slot is not None:
            self.slots.move_to_end(key)
            return slot
        if len(self.slots) >= self.MAX_GRAPHS:
            self._free_slot(self.slots.popitem(last=False)[1])
        slot = self.slots[key] = _Slot(self.engine.create_execution_context())
        return slot

    def _device_buffer(self, slot: _Slot, name: str, nbytes: int) -> int:
        ptr, size = slot.buffers.get(name, (0, 0))
        if size < nbytes:  # only without CUDA graphs: a graph's slot sees one shape
            if ptr:
                check_cuda(self.cudart.cudaFree(ptr), "cudaFree")
            ptr = int(check_cuda(self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            slot.buffers[name] = (ptr, nbytes)
        return ptr

    def _host_view(self, slot: _Slot, name: str, shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(self.dtypes[name])
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr, size = slot.host.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                check_cuda(self.cudart.cudaFreeHost(ptr), "cudaFreeHost")
            ptr = int(check_cuda(self.cudart.cudaMallocHost(max(nbytes, 1)), "cudaMallocHost"))
            slot.host[name] = (ptr, nbytes)
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def _free_slot(self, slot: _Slot) -> None:
        if slot.graph is not None:
            self.cudart.cudaGraphExecDestroy(slot.graph)
            slot.graph = None
        for ptr, _ in slot.buffers.values():
            self.cudart.cudaFree(ptr)
        for ptr, _ in slot.host.values():
            self.cudart.cudaFreeHost(ptr)
        slot.buffers, slot.host, slot.context = {}, {}, None

    # ---------------------------------------------------------------- run
    def _check_feed(self, name: str, array) -> None:
        expected = self.dtypes[name]
        if array.dtype != expected:
            raise ValueError(f"input {name!r}: dtype {array.dtype}, the engine takes {np.dtype(expected)}")
        lo, _, hi = self.profile[name]
        if len(array.shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(array.shape, lo, hi)):
            raise ValueError(
                f"input {name!r}: shape {tuple(array.shape)} is outside the engine's optimization profile "
                f"(min {lo}, max {hi}); rebuild with a larger --max-batch / --max-tokens"
            )

    def _enqueue(self, feeds: dict, stream, device_context=None) -> tuple[_Slot, dict[str, tuple]]:
        """Set shapes and addresses, copy the inputs in (host arrays through pinned staging, device arrays
        device to device) and run the engine on ``stream``; returns the slot and the output shapes."""
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise ValueError(f"missing inputs {sorted(missing)}")
        arrays = {}
        for name in self.input_names:
            array = feeds[name] if hasattr(feeds[name], "gpstoken_ops") else np.ascontiguousarray(feeds[name])
            self._check_feed(name, array)
            arrays[name] = array
        self._use_device()
        slot = self._slot(tuple(a.shape for a in arrays.values()))
        cudart, context = self.cudart, slot.context
        for name, array in arrays.items():
            dev = self._device_buffer(slot, name, array.nbytes)
            if not context.set_input_shape(name, array.shape):
                raise ValueError(f"input {name!r}: TensorRT refused shape {tuple(array.shape)}")
            context.set_tensor_address(name, dev)
            if hasattr(array, "gpstoken_ops"):
                kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
                check_cuda(cudart.cudaMemcpyAsync(dev, array.ptr, array.nbytes, kind, stream), "cudaMemcpyAsync")
            elif device_context is not None:  # no staging: the next call could overwrite it before the copy ran
                kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
                staged = device_context.upload(array)
                check_cuda(cudart.cudaMemcpyAsync(dev, staged.ptr, array.nbytes, kind, stream), "cudaMemcpyAsync")
            else:
                host = self._host_view(slot, name, array.shape)
                host[...] = array
                kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
                check_cuda(cudart.cudaMemcpyAsync(dev, host.ctypes.data, array.nbytes, kind, stream), "cudaMemcpyAsync")
        shapes = {n: tuple(context.get_tensor_shape(n)) for n in self.output_names}
        for name, shape in shapes.items():
            nbytes = int(np.prod(shape)) * np.dtype(self.dtypes[name]).itemsize
            context.set_tensor_address(name, self._device_buffer(slot, name, nbytes))
        self._execute(slot, stream)
        return slot, shapes

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        cudart, stream = self.cudart, self.stream
        slot, shapes = self._enqueue(feeds, stream)
        outputs = []
        for name, shape in shapes.items():
            host = self._host_view(slot, name, shape)
            dev, _ = slot.buffers[name]
            kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            check_cuda(cudart.cudaMemcpyAsync(host.ctypes.data, dev, host.nbytes, kind, stream), "cudaMemcpyAsync")
            outputs.append(host)
        check_cuda(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return [o.copy() for o in outputs]

    def run_device(self, feeds: dict, device_context) -> list:
        """``run`` without the host: inputs may be device arrays (``cuda_arrays.DeviceArray``), the outputs are
        device arrays of ``device_context``, and all work is queued on its stream without waiting."""
        stream = device_context.stream
        slot, shapes = self._enqueue(feeds, stream, device_context)
        outputs = []
        for name, shape in shapes.items():
            out = device_context.empty(shape, self.dtypes[name])
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            check_cuda(self.cudart.cudaMemcpyAsync(out.ptr, slot.buffers[name][0], out.nbytes, kind, stream), "cudaMemcpyAsync")
            outputs.append(out)
        return outputs

    def _execute(self, slot: _Slot, stream) -> None:
        cudart, context = self.cudart, slot.context
        slot.runs += 1
        if not self.use_cuda_graph or slot.runs == 1:
            # A shape's first enqueue may set up resources and cannot be captured: run it plainly, capture
            # on the next call (so every call runs the network exactly once).
            if not context.execute_async_v3(int(stream)):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            return
        if slot.graph is None:
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            check_cuda(cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
            graph = None
            try:
                captured = context.execute_async_v3(int(stream))
            finally:
                graph = check_cuda(cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")  # always leave capture
            try:
                if not captured:
                    raise RuntimeError("TensorRT execute_async_v3 failed during CUDA-graph capture (see the TensorRT log)")
                slot.graph = check_cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            finally:
                cudart.cudaGraphDestroy(graph)  # the instantiated graph is independent of it
        check_cuda(cudart.cudaGraphLaunch(slot.graph, stream), "cudaGraphLaunch")

    @property
    def graphs(self) -> dict:
        """Captured graphs by input shapes."""
        return {key: slot.graph for key, slot in self.slots.items() if slot.graph is not None}

    def close(self) -> None:
        """Free the contexts, graphs, buffers and the stream (also done when the backend is collected)."""
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        cudart.cudaSetDevice(self.device)
        for slot in getattr(self, "slots", {}).values():
            self._free_slot(slot)
        self.slots = OrderedDict()
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self):
        self.close()
