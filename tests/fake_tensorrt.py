"""Stand-ins for the `tensorrt` and `cuda.bindings.runtime` modules, so the runtime's TensorRT backend
(buffers, copies, shapes, profiles, CUDA-graph capture and replay) runs on a machine without either.

"Device" memory is host memory (ctypes buffers); an "engine" file holds the path of an ONNX graph that
ONNX Runtime executes, reading its inputs from and writing its outputs to the addresses the backend
set, so data only arrives if the backend moved it correctly. Stream capture records launches instead
of running them, as CUDA does, and graph launches replay them.
"""

from __future__ import annotations

import ctypes
import enum
import types
from pathlib import Path

import numpy as np

ENGINE_MAGIC = b"fake-trt-engine:"
VERSION = "11.1.0.106"
GPU = ("Fake GPU 80GB", (9, 0))


def engine_bytes(onnx_path: Path, profile: dict[str, tuple]) -> bytes:
    import json

    return ENGINE_MAGIC + json.dumps({"onnx": str(onnx_path), "profile": profile}).encode()


# ---------------------------------------------------------------- cuda.bindings.runtime
class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1


class FakeStream:
    _next = 1

    def __init__(self):
        self.handle = FakeStream._next
        FakeStream._next += 1
        self.capturing: list | None = None

    def __int__(self):
        return self.handle


class CudaState:
    def __init__(self):
        self.buffers: dict[int, ctypes.Array] = {}
        self.streams: dict[int, FakeStream] = {}
        self.graph_launches = 0
        self.captures = 0
        self.executions = 0
        self.graphs_destroyed = 0
        self.execs_destroyed = 0


def make_cudart(state: CudaState) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")
    ok = cudaError_t.cudaSuccess
    rt.cudaError_t, rt.cudaMemcpyKind, rt.cudaStreamCaptureMode = cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode

    def alloc(size):
        buf = ctypes.create_string_buffer(int(size))
        state.buffers[ctypes.addressof(buf)] = buf
        return ok, ctypes.addressof(buf)

    def free(ptr):
        state.buffers.pop(int(ptr), None)
        return (ok,)

    def stream_of(handle) -> FakeStream:
        return state.streams[int(handle)]

    def create_stream():
        s = FakeStream()
        state.streams[s.handle] = s
        return ok, s

    def memcpy(dst, src, count, kind, stream):
        assert kind in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToHost)
        assert stream_of(stream).capturing is None, "copies are not captured by the backend"
        ctypes.memmove(int(dst), int(src), int(count))
        return (ok,)

    def begin_capture(stream, mode):
        assert isinstance(mode, cudaStreamCaptureMode)
        stream_of(stream).capturing = []
        return (ok,)

    def end_capture(stream):
        s = stream_of(stream)
        graph, s.capturing = s.capturing, None
        state.captures += 1
        return ok, graph

    def instantiate(graph, flags):
        return ok, list(graph)

    def launch(graph_exec, stream):
        state.graph_launches += 1
        for work in graph_exec:
            work()
        return (ok,)

    props = types.SimpleNamespace(name=GPU[0].encode() + b"\x00" * 8, major=GPU[1][0], minor=GPU[1][1])
    rt.cudaMalloc = rt.cudaMallocHost = alloc
    rt.cudaFree = rt.cudaFreeHost = free
    rt.cudaStreamCreate = create_stream
    rt.cudaMemcpyAsync = memcpy
    rt.cudaStreamSynchronize = lambda stream: (ok,)
    rt.cudaSetDevice = lambda device: (ok,) if device == 0 else (cudaError_t.cudaErrorInvalidValue,)
    rt.cudaGetDeviceProperties = lambda device: (ok, props)
    rt.cudaStreamBeginCapture = begin_capture
    rt.cudaStreamEndCapture = end_capture
    rt.cudaGraphInstantiate = instantiate
    rt.cudaGraphLaunch = launch

    def destroy_graph(graph):
        assert isinstance(graph, list)
        state.graphs_destroyed += 1
        return (ok,)

    def destroy_exec(graph_exec):
        assert isinstance(graph_exec, list)
        state.execs_destroyed += 1
        return (ok,)

    rt.cudaGraphDestroy = destroy_graph
    rt.cudaGraphExecDestroy = destroy_exec
    rt.cudaStreamDestroy = lambda stream: (state.streams.pop(int(stream)) and (ok,))
    rt._state = state
    return rt


# ---------------------------------------------------------------- tensorrt
class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = np.float32
    HALF = np.float16


class Logger:
    WARNING = 2
    VERBOSE = 4

    def __init__(self, severity=WARNING):
        self.severity = severity


class PluginRegistry:
    def __init__(self):
        self.loaded: list[str] = []

    def load_library(self, path):
        if path in self.loaded:
            return None  # TensorRT refuses a second registration of the same creators
        self.loaded.append(path)
        return object()


class FakeEngine:
    def __init__(self, spec: dict, cudart):
        import onnxruntime as ort

        self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.profile = {k: [tuple(s) for s in v] for k, v in spec["profile"].items()}
        self.cudart = cudart
        self.num_io_tensors = len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, i):
        return (list(self.inputs) + self.outputs)[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        kind = self.inputs[name].type if name in self.inputs else next(o.type for o in self.session.get_outputs() if o.name == name)
        return DataType.HALF if "float16" in kind else DataType.FLOAT

    def get_tensor_profile_shape(self, name, profile_index):
        assert profile_index == 0
        return self.profile[name]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.pending: dict | None = None

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile[name]
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(int(s) for s in shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)

    def _read(self, name):
        dtype = self.engine.get_tensor_dtype(name).value
        shape = self.shapes[name]
        n = int(np.prod(shape))
        raw = (ctypes.c_byte * (n * np.dtype(dtype).itemsize)).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=dtype, count=n).reshape(shape).copy()

    def _outputs(self) -> dict:
        feeds = {name: self._read(name) for name in self.engine.inputs}
        return dict(zip(self.engine.outputs, self.engine.session.run(self.engine.outputs, feeds)))

    def get_tensor_shape(self, name):
        # Output shapes follow from the input shapes; running the graph on the current inputs is the
        # simplest way to know them here (the values are recomputed at execution).
        return self._outputs()[name].shape

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int), "TensorRT takes the stream as an integer handle"
        stream = self.engine.cudart._state.streams[stream_handle]
        addresses = dict(self.addresses)

        def work():
            self.engine.cudart._state.executions += 1
            saved, self.addresses = self.addresses, addresses
            try:
                for name, value in self._outputs().items():
                    value = np.ascontiguousarray(value)
                    ctypes.memmove(addresses[name], value.ctypes.data, value.nbytes)
            finally:
                self.addresses = saved

        if stream.capturing is not None:
            stream.capturing.append(work)
        else:
            work()
        return True


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes):
        import json

        if not plan.startswith(ENGINE_MAGIC):
            return None
        return FakeEngine(json.loads(plan[len(ENGINE_MAGIC):]), _CUDART)


_CUDART = None


def install(monkeypatch) -> CudaState:
    """Put the fakes in sys.modules for this test; returns the CUDA state to inspect."""
    global _CUDART
    state = CudaState()
    _CUDART = make_cudart(state)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION
    trt.Logger, trt.Runtime, trt.TensorIOMode, trt.DataType = Logger, Runtime, TensorIOMode, DataType
    registry = PluginRegistry()
    trt.get_plugin_registry = lambda: registry
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = _CUDART
    cuda.bindings = bindings
    for name, module in {"tensorrt": trt, "cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": _CUDART}.items():
        monkeypatch.setitem(__import__("sys").modules, name, module)
    return state
