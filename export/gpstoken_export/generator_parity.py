"""Parity of a generator export with the torch GPSGenerator (polygraphy Comparator, torch vs ONNX Runtime).

    gpstoken export-generator --model DIR --out EXPORT --check

Per velocity graph at batch 1 and 3 (labels include the null class; cond plausible layouts):
fp32 graphs within rtol 1e-4, atol 1e-4 x the output's scale; fp16 graphs within atol FP16_SCALE_ATOL x the
output's scale (fp16 rounding of inputs, weights and activations: measured ~1e-3, bound 5e-2). Then end to
end: the runtime's tokens for a fixed seed against ``GPSGenerator.sample_tokens`` (same bounds, fp32; the
fp16 deviation is printed, not bounded, as it compounds over the sampling steps).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata

from gpstoken.generation.pipeline import GPSGenerator
from gpstoken_core.manifest import LAYOUT, TEXTURE, read_generator_manifest, velocity_inputs

from .generator_export import VelocityGraph, velocity_feeds
from .parity import TorchRunner, _compare

FP32_RTOL, FP32_SCALE_ATOL = 1e-4, 1e-4
FP16_SCALE_ATOL = 5e-2
PARITY_BATCHES = (1, 3)


class VelocityTorchRunner(TorchRunner):
    """TorchRunner with the velocity graphs' input types (y is int64)."""

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name, shape in self.inputs.items():
            meta.add(name, np.int64 if name == "y" else np.float32, shape)
        return meta


def _cast(feeds: dict, types: dict) -> dict:
    return {k: v.astype(types[k]) for k, v in feeds.items()}


def check_generator_export(folder: str | Path, generator: GPSGenerator, seed: int = 0, steps: int = 4) -> bool:
    """True when every velocity graph and the runtime's sampled tokens agree with ``generator``."""
    folder = Path(folder)
    manifest, _ = read_generator_manifest(folder)
    kind, fp16 = manifest["generator"]["kind"], manifest["dtype"] == "float16"
    rtol, scale_atol = (0.0, FP16_SCALE_ATOL) if fp16 else (FP32_RTOL, FP32_SCALE_ATOL)
    models = {TEXTURE: generator.texture, LAYOUT: generator.layout}
    ok = True
    for name in manifest["files"]:
        model = models[name].eval().float().cpu()
        names = velocity_inputs(kind, name)
        with_cond = "cond" in names
        shapes = {n: (None, None, None) if n in ("x", "cond") else (None,) for n in names}
        types = {n: np.dtype(io["dtype"]) for n, io in manifest["files"][name]["inputs"].items()}
        # the torch runner takes the float32 inputs; the ORT runner the graph's dtypes (fp16 inputs rounded)
        feeds = [velocity_feeds(model, b, with_cond, seed=b) for b in PARITY_BATCHES]
        torch_runner = VelocityTorchRunner(VelocityGraph(model, with_cond).eval(), shapes, ["v"], f"torch-{name}")
        ort_runner = OnnxrtRunner(SessionFromOnnx(str(folder / manifest["files"][name]["path"])), name=f"onnxrt-{name}")
        if fp16:
            feeds = [_cast(f, types) for f in feeds]
            torch_runner.infer_impl = _widening(torch_runner.infer_impl)
        ok &= _compare(name, [torch_runner, ort_runner], feeds, rtol, scale_atol)
    ok &= _end_to_end(folder, generator, seed, steps, rtol, scale_atol, bounded=not fp16)
    return bool(ok)


def _widening(infer):
    """The torch runner's infer on fp16 feeds: widened to float32 first (fp16 outputs compared in float32)."""

    def run(feed_dict):
        return infer({k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in feed_dict.items()})

    return run


def _end_to_end(folder: Path, generator: GPSGenerator, seed: int, steps: int, rtol: float, scale_atol: float, bounded: bool) -> bool:
    from gpstoken_runtime import Generator  # the deployed runtime itself

    runtime = Generator.load(folder)
    labels = [k % generator.num_classes for k in (1, 3, 7)]
    got = runtime.sample_tokens(labels, seed=seed, steps=steps, sampler="sde")
    ref = generator.sample_tokens(labels, seed=seed, texture_steps=steps, sampler="sde")
    ok = True
    for key in ("g", "f"):
        a, b = getattr(ref, key).numpy(), getattr(got, key)
        atol = scale_atol * max(float(np.abs(a).max()), 1e-6)
        passed = (not bounded) or bool(np.allclose(b, a, rtol=rtol, atol=atol))
        ok &= passed
        verdict = ("PASS" if passed else "FAIL") if bounded else "(fp16 deviation, reported)"
        print(f"end2end  sde {steps} steps, seed {seed}, batch {len(labels)}  tokens {key}  max abs {float(np.abs(a - b).max()):.3g}  {verdict}")
    return ok


__all__ = ["check_generator_export", "FP16_SCALE_ATOL", "FP32_RTOL", "FP32_SCALE_ATOL"]
