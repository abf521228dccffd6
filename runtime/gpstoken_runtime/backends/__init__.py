"""Inference backends by name. Each builds itself from an export's manifest (``Backend.from_manifest``);
the TensorRT one imports tensorrt only when it is asked for."""

from __future__ import annotations

import importlib

from .base import Backend

_MODULES = {"onnxruntime": (".onnxruntime", "OnnxRuntimeBackend"), "tensorrt": (".tensorrt", "TensorRTBackend")}
BACKENDS = tuple(_MODULES)


def backend_class(name: str) -> type[Backend]:
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    module, cls = _MODULES[name]
    return getattr(importlib.import_module(module, __name__), cls)


def load_graphs(folder, manifest: dict, backend: str, device: str = "cpu", threads: int | None = None,
                **options) -> dict[str, Backend]:
    """Every graph of an export's manifest on ``backend``, each checked to take the inputs the manifest names."""
    from gpstoken_core.manifest import MANIFEST_FILE, ExportError

    make = backend_class(backend)
    graphs = {}
    for name, entry in manifest["files"].items():
        graph = make.from_manifest(folder, manifest, name, device=device, threads=threads, **options)
        expected = list(entry["inputs"])
        if graph.input_names != expected:
            raise ExportError(f"{folder}/{MANIFEST_FILE}: {name} graph inputs {graph.input_names} differ from field 'files.{name}.inputs' {expected}")
        graphs[name] = graph
    return graphs


__all__ = ["BACKENDS", "Backend", "backend_class", "load_graphs"]
