"""Stand-ins for the `tensorrt` and `cuda.bindings.runtime` modules, so the runtime's TensorRT backend
(buffers, copies, shapes, profiles, CUDA-graph capture and replay) runs on a machine without either.

"Device" memory is host memory (ctypes buffers); an "engine" file holds the path of an ONNX graph that
ONNX Runtime executes, reading its inputs from and writing its outputs to the addresses the backend
set, so data only arrives if the backend moved it correctly. Stream capture records launches instead
of running them, as CUDA does, and graph launches replay them.
"""

from __future__ import annotations

import collections
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
    cudaMemcpyDeviceToDevice = 3


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
        self.copies: collections.Counter = collections.Counter()  # by cudaMemcpyKind name
        self.kernels: collections.Counter = collections.Counter()  # NVRTC kernels launched, by name
        self.contexts = 0  # execution contexts created
        self.device_calls: list[int] = []  # cudaSetDevice arguments, in order


def make_cudart(state: CudaState) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")
    ok = cudaError_t.cudaSuccess
    rt.cudaError_t, rt.cudaMemcpyKind, rt.cudaStreamCaptureMode = cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode

    def alloc(size):
        buf = ctypes.create_string_buffer(int(size))
        state.buffers[ctypes.addressof(buf)] = buf
        return ok, ctypes.addressof(buf)

    def free(ptr):
        state.buffers.pop(int(ptr), None)  # cudaFree(0) (context set-up) frees nothing
        return (ok,)

    def stream_of(handle) -> FakeStream:
        return state.streams[int(handle)]

    def create_stream():
        s = FakeStream()
        state.streams[s.handle] = s
        return ok, s

    def memcpy(dst, src, count, kind, stream):
        assert isinstance(kind, cudaMemcpyKind)
        assert stream_of(stream).capturing is None, "copies are not captured by the backend"
        state.copies[kind.name] += 1
        ctypes.memmove(int(dst), int(src), int(count))
        return (ok,)

    def memcpy_sync(dst, src, count, kind):
        assert isinstance(kind, cudaMemcpyKind)
        assert all(s.capturing is None for s in state.streams.values()), "a synchronous copy during capture"
        state.copies[kind.name] += 1
        ctypes.memmove(int(dst), int(src), int(count))
        return (ok,)

    def set_device(device):
        state.device_calls.append(device)
        return (ok,) if device == 0 else (cudaError_t.cudaErrorInvalidValue,)

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
    rt.cudaMemcpy = memcpy_sync
    rt.cudaStreamSynchronize = lambda stream: (ok,)
    rt.cudaSetDevice = set_device
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


# ---------------------------------------------------------------- cuda.bindings.nvrtc / .driver
# What the runtime's NVRTC kernels (gpstoken_runtime.backends.cuda_arrays) compute, by kernel name: the
# parameter types in order and the effect on host-backed "device" memory. Their CUDA source is compiled
# by nvcc in tests/test_runtime_generation_tensorrt.py; here they only need to do what they promise.
def _view(ptr, n, dtype):
    raw = (ctypes.c_byte * (n * np.dtype(dtype).itemsize)).from_address(int(ptr))
    return np.frombuffer(raw, dtype=dtype, count=n)


def _axpby(out, x, a, y, b, n):
    result = np.float32(a) * _view(x, n, np.float32)
    if y:
        result = result + np.float32(b) * _view(y, n, np.float32)
    _view(out, n, np.float32)[:] = result


KERNEL_EFFECTS = {
    "gps_axpby": (("p", "p", "f", "p", "f", "q"), _axpby),
    "gps_div": (("p", "p", "f", "q"), lambda out, x, d, n: _view(out, n, np.float32).__setitem__(slice(None), _view(x, n, np.float32) / np.float32(d))),
    "gps_fill": (("p", "f", "q"), lambda out, value, n: _view(out, n, np.float32).__setitem__(slice(None), value)),
    "gps_f32_to_f16": (("p", "p", "q"), lambda out, x, n: _view(out, n, np.float16).__setitem__(slice(None), _view(x, n, np.float32))),
    "gps_f16_to_f32": (("p", "p", "q"), lambda out, x, n: _view(out, n, np.float32).__setitem__(slice(None), _view(x, n, np.float16))),
}
_CTYPES = {"p": ctypes.c_uint64, "f": ctypes.c_float, "q": ctypes.c_int64}


def make_nvrtc_driver(state: CudaState) -> tuple[types.ModuleType, types.ModuleType]:
    nvrtc = types.ModuleType("cuda.bindings.nvrtc")
    driver = types.ModuleType("cuda.bindings.driver")
    ok = cudaError_t.cudaSuccess
    programs = {}

    def create(src, name, n_headers, headers, include_names):
        programs[len(programs) + 1] = src
        return ok, len(programs)

    def compile_(program, n_options, options):
        assert any(o.startswith(b"--gpu-architecture=sm_") for o in options)
        return (ok,)

    nvrtc.nvrtcCreateProgram = create
    nvrtc.nvrtcCompileProgram = compile_
    nvrtc.nvrtcGetCUBINSize = lambda program: (ok, len(programs[program]))
    nvrtc.nvrtcGetCUBIN = lambda program, buf: (ok,)
    nvrtc.nvrtcDestroyProgram = lambda program: (ok,)
    nvrtc.nvrtcGetProgramLogSize = lambda program: (ok, 1)
    nvrtc.nvrtcGetProgramLog = lambda program, buf: (ok,)

    driver.cuInit = lambda flags: (ok,)
    driver.CUstream = lambda handle: int(handle)
    driver.cuModuleLoadData = lambda image: (ok, "module")
    driver.cuModuleUnload = lambda module: (ok,)
    driver.cuModuleGetFunction = lambda module, name: (ok, name.decode())

    def launch(function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        assert state.streams[int(stream)].capturing is None, "sampler kernels are not captured"
        kinds, effect = KERNEL_EFFECTS[function]
        pointers = _view(params, len(kinds), np.uint64)
        args = [_CTYPES[k].from_address(int(p)).value for k, p in zip(kinds, pointers)]
        state.kernels[function] += 1
        effect(*args)
        return (ok,)

    driver.cuLaunchKernel = launch
    return nvrtc, driver


# ---------------------------------------------------------------- tensorrt
class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = np.float32
    HALF = np.float16
    INT64 = np.int64


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
        return DataType.HALF if "float16" in kind else DataType.INT64 if "int64" in kind else DataType.FLOAT

    def get_tensor_profile_shape(self, name, profile_index):
        assert profile_index == 0
        return self.profile[name]

    def create_execution_context(self):
        self.cudart._state.contexts += 1
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
    bindings.nvrtc, bindings.driver = make_nvrtc_driver(state)
    cuda.bindings = bindings
    modules = {"tensorrt": trt, "cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": _CUDART,
               "cuda.bindings.nvrtc": bindings.nvrtc, "cuda.bindings.driver": bindings.driver}
    for name, module in modules.items():
        monkeypatch.setitem(__import__("sys").modules, name, module)
    return state
