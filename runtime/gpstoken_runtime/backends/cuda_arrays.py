"""Device arrays for sampling on the GPU without torch: the sampler state stays in device memory between
steps, and the sampler math (``gpstoken_core.sampling``, written once for numpy and torch) runs on it
through this module's array namespace (``DeviceOps``).

The sampler only needs linear combinations of whole arrays (``x + v * dt``, ``(v * t - x) / (1 - t)``,
``u + (c - u) * s``), leading-axis slices, row concatenation and a constant fill. Each is one launch of a
tiny element-wise kernel compiled at first use with NVRTC for the running GPU (``cuda.bindings.nvrtc`` /
``cuda.bindings.driver``, the binding TensorRT's samples use), on one stream shared with the engines, so
no step waits for the host. Buffers come from a pool (no cudaMalloc per operation); a buffer returns to it
when its last array is dropped, which is safe because every reader runs on the same stream.
"""

from __future__ import annotations

import ctypes
from collections import defaultdict

import numpy as np

from gpstoken_core.tensorrt import check_cuda, import_cudart

# float16 conversions use PTX's cvt so the source needs no header (NVRTC ships none for cuda_fp16.h).
KERNEL_SOURCE = r"""
typedef long long i64;

extern "C" __global__ void gps_axpby(float* out, const float* x, float a, const float* y, float b, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = y ? a * x[i] + b * y[i] : a * x[i];
}

extern "C" __global__ void gps_div(float* out, const float* x, float d, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = x[i] / d;
}

extern "C" __global__ void gps_fill(float* out, float value, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = value;
}

extern "C" __global__ void gps_f32_to_f16(unsigned short* out, const float* x, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x[i]));
        out[i] = h;
    }
}

extern "C" __global__ void gps_f16_to_f32(float* out, const unsigned short* x, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x[i]));
        out[i] = f;
    }
}
"""
KERNELS = ("gps_axpby", "gps_div", "gps_fill", "gps_f32_to_f16", "gps_f16_to_f32")
THREADS = 256
MAX_BLOCKS = 1024  # grid-stride loops cover the rest


class DeviceUnavailable(RuntimeError):
    """Device-resident sampling cannot run here (no NVRTC / driver API); the caller falls back to host."""


def _nvrtc_driver():
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as err:
        raise DeviceUnavailable(f"cuda.bindings.nvrtc / .driver are not importable ({err}); pip install cuda-python") from None
    return nvrtc, driver


def _nvrtc_check(nvrtc, result, what: str, program=None):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        log = ""
        if program is not None:
            _, size = nvrtc.nvrtcGetProgramLogSize(program)
            buf = b" " * size
            nvrtc.nvrtcGetProgramLog(program, buf)
            log = ": " + buf.decode(errors="replace").strip()
        raise DeviceUnavailable(f"{what} failed ({err}){log}")
    return rest[0] if len(rest) == 1 else rest


class DeviceContext:
    """One GPU, one stream, the compiled kernels and a buffer pool: what device arrays of one sampler share."""

    def __init__(self, device: int = 0, stream=None):
        self.cudart = cudart = import_cudart()
        self.device = device
        check_cuda(cudart.cudaSetDevice(device), "cudaSetDevice")
        check_cuda(cudart.cudaFree(0), "cudaFree(0)")  # makes the primary context current for the driver API
        self.stream = stream if stream is not None else check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._own_stream = stream is None
        self.free: dict[int, list[int]] = defaultdict(list)  # nbytes -> device pointers
        self.allocated: list[int] = []
        self.nvrtc, self.driver = _nvrtc_driver()
        self.functions = self._compile()
        self.ops = DeviceOps(self)

    # ---------------------------------------------------------------- kernels
    def _compile(self) -> dict:
        nvrtc, driver, cudart = self.nvrtc, self.driver, self.cudart
        props = check_cuda(cudart.cudaGetDeviceProperties(self.device), "cudaGetDeviceProperties")
        arch = f"--gpu-architecture=sm_{props.major}{props.minor}".encode()
        _nvrtc_check(driver, driver.cuInit(0), "cuInit")
        program = _nvrtc_check(nvrtc, nvrtc.nvrtcCreateProgram(KERNEL_SOURCE.encode(), b"gpstoken_arrays.cu", 0, [], []),
                               "nvrtcCreateProgram")
        _nvrtc_check(nvrtc, nvrtc.nvrtcCompileProgram(program, 2, [arch, b"--std=c++17"]), "NVRTC compilation", program)
        size = _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        nvrtc.nvrtcDestroyProgram(program)
        self._cubin = np.frombuffer(cubin, dtype=np.uint8).copy()  # kept alive while the module is loaded
        module = _nvrtc_check(driver, driver.cuModuleLoadData(self._cubin.ctypes.data), "cuModuleLoadData")
        self.module = module
        return {name: _nvrtc_check(driver, driver.cuModuleGetFunction(module, name.encode()), "cuModuleGetFunction")
                for name in KERNELS}

    def launch(self, name: str, n: int, *args) -> None:
        """One grid-stride launch of kernel ``name`` over ``n`` elements on the shared stream. ``args`` are
        ctypes values in the kernel's parameter order (pointers as c_void_p)."""
        if n == 0:
            return
        check_cuda(self.cudart.cudaSetDevice(self.device), "cudaSetDevice")  # the current device is per thread
        holders = [a if isinstance(a, ctypes._SimpleCData) else ctypes.c_void_p(a) for a in args]
        params = np.array([ctypes.addressof(h) for h in holders], dtype=np.uint64)
        blocks = min(MAX_BLOCKS, (n + THREADS - 1) // THREADS)
        stream = self.driver.CUstream(int(self.stream))
        _nvrtc_check(self.driver, self.driver.cuLaunchKernel(self.functions[name], blocks, 1, 1, THREADS, 1, 1, 0, stream,
                                                             params.ctypes.data, 0), f"cuLaunchKernel({name})")

    # ---------------------------------------------------------------- memory
    def take(self, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)
        if self.free[nbytes]:
            return self.free[nbytes].pop()
        ptr = int(check_cuda(self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
        self.allocated.append(ptr)
        return ptr

    def give_back(self, ptr: int, nbytes: int) -> None:
        self.free[max(int(nbytes), 1)].append(ptr)

    def empty(self, shape, dtype=np.float32) -> DeviceArray:
        return DeviceArray(self, _Block(self, int(np.prod(shape)) * np.dtype(dtype).itemsize), 0, tuple(shape), dtype)

    def upload(self, array: np.ndarray) -> DeviceArray:
        """A device copy of a host array (a synchronous copy: the host array may change right after)."""
        array = np.ascontiguousarray(array)
        check_cuda(self.cudart.cudaSetDevice(self.device), "cudaSetDevice")
        out = self.empty(array.shape, array.dtype)
        check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check_cuda(self.cudart.cudaMemcpy(out.ptr, array.ctypes.data, array.nbytes, kind), "cudaMemcpy")
        return out

    def copy_into(self, dst: int, src: DeviceArray) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check_cuda(self.cudart.cudaMemcpyAsync(dst, src.ptr, src.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def close(self) -> None:
        cudart = self.cudart
        cudart.cudaSetDevice(self.device)
        cudart.cudaStreamSynchronize(self.stream)
        for ptr in self.allocated:
            cudart.cudaFree(ptr)
        self.allocated, self.free = [], defaultdict(list)
        if getattr(self, "module", None) is not None:
            self.driver.cuModuleUnload(self.module)
            self.module = None
        if self._own_stream and self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None


class _Block:
    """A pooled device allocation; back to the pool when the last array on it is gone."""

    def __init__(self, ctx: DeviceContext, nbytes: int):
        self.ctx, self.nbytes, self.ptr = ctx, nbytes, ctx.take(nbytes)

    def __del__(self):
        if self.ctx.stream is not None:
            self.ctx.give_back(self.ptr, self.nbytes)


class DeviceArray:
    """A C-contiguous float32 / float16 / int array in device memory with the operations the samplers use."""

    def __init__(self, ctx: DeviceContext, block: _Block, offset: int, shape: tuple, dtype):
        self.ctx, self.block, self.offset, self.shape, self.dtype = ctx, block, offset, tuple(shape), np.dtype(dtype)

    # ---------------------------------------------------------------- properties
    @property
    def ptr(self) -> int:
        return self.block.ptr + self.offset

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def gpstoken_ops(self):
        return self.ctx.ops  # gpstoken_core.sampling.ops_for finds the namespace here

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device={self.ctx.device})"

    def get(self) -> np.ndarray:
        """The array on the host (waits for the stream)."""
        out = np.empty(self.shape, self.dtype)
        cudart = self.ctx.cudart
        check_cuda(cudart.cudaSetDevice(self.ctx.device), "cudaSetDevice")
        check_cuda(cudart.cudaStreamSynchronize(self.ctx.stream), "cudaStreamSynchronize")
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check_cuda(cudart.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes, kind), "cudaMemcpy")
        return out

    # ---------------------------------------------------------------- views
    def __getitem__(self, index):
        """Leading-axis slices with step 1 (contiguous views): ``x[:b]``, ``x[b:]``."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"device arrays support leading-axis slices x[a:b] only, got {index!r}")
        start, stop, _ = index.indices(self.shape[0])
        stop = max(stop, start)
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return DeviceArray(self.ctx, self.block, self.offset + start * row, (stop - start, *self.shape[1:]), self.dtype)

    def reshape(self, shape) -> DeviceArray:
        shape = tuple(int(d) for d in shape)
        if int(np.prod(shape)) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return DeviceArray(self.ctx, self.block, self.offset, shape, self.dtype)

    # ---------------------------------------------------------------- arithmetic (float32)
    def _require_float32(self, other: DeviceArray | None = None) -> None:
        if self.dtype != np.float32 or (other is not None and (other.dtype != np.float32 or other.shape != self.shape)):
            raise TypeError(f"device arithmetic needs float32 arrays of one shape, got {self!r} and {other!r}")

    def _axpby(self, a: float, other: DeviceArray | None, b: float) -> DeviceArray:
        self._require_float32(other)
        out = self.ctx.empty(self.shape)
        c_float, c_i64 = ctypes.c_float, ctypes.c_longlong
        self.ctx.launch("gps_axpby", self.size, out.ptr, self.ptr, c_float(a), 0 if other is None else other.ptr,
                        c_float(b), c_i64(self.size))
        return out

    def __add__(self, other):
        if not isinstance(other, DeviceArray):
            return NotImplemented
        return self._axpby(1.0, other, 1.0)

    def __sub__(self, other):
        if not isinstance(other, DeviceArray):
            return NotImplemented
        return self._axpby(1.0, other, -1.0)

    def __mul__(self, scalar):
        if isinstance(scalar, DeviceArray) or not np.isscalar(scalar):
            return NotImplemented
        return self._axpby(float(scalar), None, 0.0)

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        if isinstance(scalar, DeviceArray) or not np.isscalar(scalar):
            return NotImplemented
        self._require_float32()
        out = self.ctx.empty(self.shape)  # a true division, as numpy's (1 / d as a factor rounds differently)
        self.ctx.launch("gps_div", self.size, out.ptr, self.ptr, ctypes.c_float(float(scalar)), ctypes.c_longlong(self.size))
        return out

    def __neg__(self):
        return self._axpby(-1.0, None, 0.0)

    def astype(self, dtype) -> DeviceArray:
        """float32 <-> float16 on the device (the engines of an fp16 export take float16)."""
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        pair = (self.dtype, dtype)
        kernel = {(np.dtype(np.float32), np.dtype(np.float16)): "gps_f32_to_f16",
                  (np.dtype(np.float16), np.dtype(np.float32)): "gps_f16_to_f32"}.get(pair)
        if kernel is None:
            raise TypeError(f"device arrays convert float32 <-> float16 only, not {self.dtype} -> {dtype}")
        out = self.ctx.empty(self.shape, dtype)
        self.ctx.launch(kernel, self.size, out.ptr, self.ptr, ctypes.c_longlong(self.size))
        return out


class DeviceOps:
    """The ``gpstoken_core.sampling`` array namespace for device arrays."""

    name = "cuda"

    def __init__(self, ctx: DeviceContext):
        self.ctx = ctx

    def concat(self, arrays) -> DeviceArray:
        arrays = list(arrays)
        rest = arrays[0].shape[1:]
        if any(a.shape[1:] != rest or a.dtype != arrays[0].dtype for a in arrays):
            raise ValueError("concat needs arrays of one dtype and trailing shape")
        out = self.ctx.empty((sum(a.shape[0] for a in arrays), *rest), arrays[0].dtype)
        offset = 0
        for a in arrays:
            self.ctx.copy_into(out.ptr + offset, a)
            offset += a.nbytes
        return out

    def time(self, t: float, like: DeviceArray):
        return np.float32(t)  # a host scalar: the velocity wrapper fills the per-row time on the device

    def rows(self, like: DeviceArray, value: float) -> DeviceArray:
        """(B,) float32 filled with ``value`` on the device (B = like's rows)."""
        out = self.ctx.empty((like.shape[0],))
        self.ctx.launch("gps_fill", out.size, out.ptr, ctypes.c_float(value), ctypes.c_longlong(out.size))
        return out

    def from_float32(self, a, like: DeviceArray) -> DeviceArray:
        if isinstance(a, DeviceArray):
            return a.astype(like.dtype)
        return self.ctx.upload(np.asarray(a, dtype=like.dtype))

    def _host_only(self, what: str):
        raise TypeError(f"{what} runs on the host: download the sampled state first (DeviceArray.get())")

    def concat_last(self, arrays):
        self._host_only("concat_last")

    def clip(self, a, low, high):
        self._host_only("clip")

    def full_like(self, a, value):
        self._host_only("full_like")

    def constant(self, values, like):
        self._host_only("constant")
