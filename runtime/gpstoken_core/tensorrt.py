"""TensorRT helpers shared by the engine builder (export) and the runtime's TensorRT backend.

Imports neither TensorRT nor cuda-bindings until asked, so importing this module works everywhere;
without them the error says what to install.
"""

from __future__ import annotations

import os
from pathlib import Path

PLUGIN_LIBRARY = "libgpstoken_trt.so"  # exports getCreators: loaded with IPluginRegistry.load_library
PLUGIN_ENV = "GPSTOKEN_TRT_PLUGIN"


class TensorRTUnavailable(RuntimeError):
    """TensorRT, cuda-bindings, a GPU or the plugin library is missing."""


class EngineMismatch(RuntimeError):
    """The engine was built for another TensorRT version or GPU."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTUnavailable(
            "the TensorRT backend needs the `tensorrt` Python package (TensorRT 11, e.g. pip install tensorrt-cu13) "
            f"and an NVIDIA GPU; it could not be imported ({err}). Without a GPU use backend='onnxruntime'."
        ) from None
    return trt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as err:
        raise TensorRTUnavailable(f"the TensorRT backend needs cuda-bindings (pip install cuda-bindings): {err}") from None
    return cudart


def find_plugin_library(explicit: str | os.PathLike | None = None) -> Path:
    """The getCreators plugin library: ``explicit``, else $GPSTOKEN_TRT_PLUGIN, else the one installed with
    gpstoken_runtime (present when pip found TensorRT and nvcc at build time)."""
    if explicit:
        candidates = [Path(explicit)]
    elif os.environ.get(PLUGIN_ENV):
        candidates = [Path(os.environ[PLUGIN_ENV])]
    else:
        candidates = [Path(__file__).parent / "lib" / PLUGIN_LIBRARY]  # installed by CMake next to the core
    for path in candidates:
        if path.is_file():
            return path
    raise TensorRTUnavailable(
        f"GaussianSplat plugin library not found ({candidates[0]} does not exist). Build it with CMake: "
        "cmake -S . -B build -DGPSTOKEN_CUDA=ON -DTensorRT_ROOT=/path/to/TensorRT && cmake --build build "
        f"--target gpstoken_trt, then pass plugin_library=build/{PLUGIN_LIBRARY} or set ${PLUGIN_ENV}"
    )


def check_cuda(result, what: str):
    """cuda-bindings calls return (err, *values)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: CUDA error {int(err)} ({err})")
    return values[0] if len(values) == 1 else values


def gpu_properties(device: int = 0) -> tuple[str, tuple[int, int]]:
    cudart = import_cudart()
    err, props = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        raise TensorRTUnavailable(f"no CUDA device {device} ({err})")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), (int(props.major), int(props.minor))


def check_engine_compatibility(section: dict | None, trt_version: str, gpu_name: str, capability: tuple[int, int]) -> None:
    """Refuse engines from another TensorRT version or GPU model, naming the manifest field."""
    if not section:
        raise EngineMismatch("manifest.json has no 'tensorrt' section: build the engines first (gpstoken export --tensorrt)")
    built = str(section.get("version", "?"))
    if built.split(".")[:3] != trt_version.split(".")[:3]:
        raise EngineMismatch(
            f"manifest field tensorrt.version: the engines were built with TensorRT {built}, this is {trt_version}; "
            "rebuild them (python -m gpstoken_export.build_engine EXPORT_DIR)"
        )
    cc = f"{capability[0]}.{capability[1]}"
    if section.get("compute_capability") != cc or section.get("gpu") != gpu_name:
        raise EngineMismatch(
            f"manifest fields tensorrt.gpu / compute_capability: the engines were built on {section.get('gpu')} "
            f"(sm {section.get('compute_capability')}), this GPU is {gpu_name} (sm {cc}); rebuild them on this GPU"
        )


_loaded_plugins: dict[str, object] = {}


def load_plugin(trt, path: Path) -> None:
    """Register the plugin's creators once per process (TensorRT refuses a second registration)."""
    key = str(path.resolve())
    if key in _loaded_plugins:
        return
    handle = trt.get_plugin_registry().load_library(key)
    if handle is None:
        raise TensorRTUnavailable(f"{path}: TensorRT could not load the plugin library")
    _loaded_plugins[key] = handle
