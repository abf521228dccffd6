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


__all__ = ["BACKENDS", "Backend", "backend_class"]
