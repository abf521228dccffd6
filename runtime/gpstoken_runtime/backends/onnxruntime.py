"""ONNX Runtime backend: runs the export's ONNX files on the CPU (or CUDA with onnxruntime-gpu)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import Backend


def winograd_channels(manifest: dict, device: str, winograd: bool | int | None) -> int | None:
    """The channel count from which the runtime rewrites an export's 3x3 convolutions as Winograd F(4x4, 3x3)
    (``gpstoken_core.winograd``), or None. ``winograd``: None (default) rewrites those with >= 128 channels in
    and out (``MIN_CHANNELS``, as ``gpstoken export --winograd``) of float32 tokenizer graphs on the CPU and
    leaves other graphs alone; True the same, but asking for it where it does not apply (GPU, float16, int8)
    is an error; an int: from that many channels; False never."""
    from gpstoken_core.manifest import GENERATOR, has_winograd
    from gpstoken_core.winograd import MIN_CHANNELS

    if winograd is False:
        return None
    if isinstance(winograd, bool) or winograd is None:
        channels = MIN_CHANNELS
    elif isinstance(winograd, int) and winograd >= 1:
        channels = winograd
    else:
        raise ValueError(f"winograd must be None, True, False or a channel count >= 1, got {winograd!r}")
    unfit = ("it runs on the CPU only" if device != "cpu" else
             f"the graphs are {manifest.get('dtype')}" if manifest.get("dtype") != "float32" else
             "the graphs are int8" if manifest.get("precision") == "int8" else None)
    if GENERATOR in manifest or has_winograd(manifest):
        return None  # no wide 3x3 convolutions / already rewritten by the export
    if unfit:
        if winograd is None:
            return None
        raise ValueError(f"Winograd convolutions are for float32 graphs on ONNX Runtime's CPU provider; {unfit}")
    return channels


def _widest_convolution(manifest: dict, graph: str) -> float:
    """The most channels a tokenizer graph's convolutions can have, from the model config (inf if unknown)."""
    from gpstoken_core.manifest import ENCODER

    config = manifest.get("model_config", {})
    try:
        if graph == ENCODER:
            return int(config["encoder"]["stem_channels"])
        decoder = config["decoder"]
        return int(decoder["channels"]) * max(int(m) for m in decoder["channel_mult"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


def _serialize_with_weights_in_memory(proto, arrays: dict, options, min_bytes: int = 1 << 16) -> tuple[bytes, list]:
    """``proto`` serialized without its large float32 weights, which go to ``options`` as OrtValues
    (``add_external_initializers``) with the ``arrays`` its placeholders stand for: a graph rewritten in
    memory reaches ONNX Runtime without a protobuf round trip of its weights (M128's encoder: 1.3 s to
    serialize, as long again to parse). The OrtValues (returned) must outlive the session's creation: the
    options only point at them."""
    import onnx
    import onnxruntime as ort

    from gpstoken_core.winograd import in_memory_placeholder

    names, values = list(arrays), [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays.values()]
    for index, init in enumerate(proto.graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT or len(init.raw_data) < min_bytes:
            continue
        weights = np.frombuffer(init.raw_data, np.float32).reshape(tuple(init.dims))  # keeps the bytes alive
        names.append(init.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(weights))
        proto.graph.initializer[index].CopyFrom(in_memory_placeholder(init.name, weights))
    if names:
        options.add_external_initializers(names, values)
    return proto.SerializeToString(), values


class OnnxRuntimeBackend(Backend):
    @classmethod
    def from_manifest(cls, folder: Path, manifest: dict, graph: str, device: str = "cpu", threads: int | None = None,
                      custom_ops_library: str | None = None, stop_spinning: bool = True,
                      winograd: bool | int | None = None) -> OnnxRuntimeBackend:
        channels = winograd_channels(manifest, device, winograd)
        if channels and _widest_convolution(manifest, graph) < channels:
            channels = None  # nothing to rewrite: spare parsing the file
        return cls(Path(folder) / manifest["files"][graph]["path"], device, threads, custom_ops_library, stop_spinning, channels)

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, custom_ops_library: str | None = None,
                 stop_spinning: bool = True, winograd_min_channels: int | None = None):
        """``custom_ops_library``: libgpstoken_ort_ops.so (default: $GPSTOKEN_ORT_OPS if set) runs GaussianSplat
        with the compiled kernel instead of the file's dense standard-op function.

        ``winograd_min_channels``: the graph's plain 3x3 convolutions with at least that many channels in and
        out run as Winograd F(4x4, 3x3) (rewritten when loading; ``gpstoken_core.winograd``): 4x fewer
        multiplies there, ~1e-5 relative error per convolution; None: as the file has them.

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
        model, weights = str(path), None
        self.winograd_convolutions = 0
        if winograd_min_channels:
            import onnx

            from gpstoken_core.winograd import rewrite_convolutions

            proto = onnx.load(model)
            filters = {}  # computed here: ONNX Runtime took ~1.4 s to fold M128's decoder's
            self.winograd_convolutions = rewrite_convolutions(proto, winograd_min_channels, filters)
            if self.winograd_convolutions:
                model, weights = _serialize_with_weights_in_memory(proto, filters, options)
        self.session = ort.InferenceSession(model, options, providers=providers)
        del weights  # the session holds its own copy
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)
