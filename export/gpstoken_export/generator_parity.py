"""Parity of a generator export with the torch GPSGenerator (polygraphy Comparator, torch vs ONNX Runtime).

    gpstoken export-generator --model DIR --out EXPORT --check
    python -m gpstoken_export.generator_parity EXPORT --out parity/ [--model DIR]    # the TensorRT recipe

The recipe: per velocity graph, inputs at batch 3 and torch's outputs saved as polygraphy JSON, checked here
with ONNX Runtime, and ``run_on_gpu.sh`` running ``polygraphy run NAME.onnx --trt`` on them (no plugin: the
velocity networks are standard operators); benchmarks/gpu_check.sh runs it.

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


# TensorRT builds fp32 layers with its own kernels (and may pick TF32 where allowed): the recipe's bound.
TRT_RTOL, TRT_ATOL = 1e-3, 1e-3
RECIPE_BATCH = 3


def write_velocity_recipe(folder: str | Path, generator: GPSGenerator, out: str | Path) -> Path:
    """Inputs and torch outputs of every velocity graph of the export ``folder`` in ``out`` (polygraphy JSON)
    plus ``run_on_gpu.sh``; returns the script's path."""
    import torch
    from polygraphy.json import save_json

    from .trt_parity import _save_outputs

    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, _ = read_generator_manifest(folder)
    kind = manifest["generator"]["kind"]
    models = {TEXTURE: generator.texture, LAYOUT: generator.layout}
    lines = ["#!/usr/bin/env bash", "# TensorRT parity of the velocity graphs against torch outputs saved on the CPU.",
             "# usage: bash run_on_gpu.sh   (needs a GPU and the tensorrt + polygraphy packages)", "set -euo pipefail",
             'cd "$(dirname "$0")"']
    for name, entry in manifest["files"].items():
        model = models[name].eval().float().cpu()
        with_cond = "cond" in velocity_inputs(kind, name)
        types = {n: np.dtype(io["dtype"]) for n, io in entry["inputs"].items()}
        feed = velocity_feeds(model, RECIPE_BATCH, with_cond, seed=RECIPE_BATCH)
        with torch.inference_mode():
            tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
            v = VelocityGraph(model, with_cond)(tensors["x"], tensors["t"], tensors["y"], tensors.get("cond"))
        save_json([_cast(feed, types)], str(out / f"{name}_inputs.json"))
        _save_outputs(out / f"{name}_outputs.json", "torch", {"v": v.numpy().astype(types["x"])})
        for part in (entry, entry.get("external_data")):  # the graph and its external weights, if any
            if part is not None:
                (out / part["path"]).write_bytes((folder / part["path"]).read_bytes())
        shapes = " ".join(f"{k}:[{','.join(str(d) for d in a.shape)}]" for k, a in feed.items())
        lines += [f"polygraphy run {entry['path']} --trt --trt-min-shapes {shapes} --trt-opt-shapes {shapes} --trt-max-shapes {shapes} \\",
                  f"    --load-inputs {name}_inputs.json --load-outputs {name}_outputs.json --atol {TRT_ATOL} --rtol {TRT_RTOL}"]
    script = out / "run_on_gpu.sh"
    script.write_text("\n".join(lines) + "\n")
    return script


def check_velocity_recipe(out: str | Path) -> bool:
    """The recipe's saved inputs through ONNX Runtime against its saved torch outputs (what the GPU run does
    with TensorRT), so the files are known to be right before a GPU sees them."""
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.json import load_json

    out = Path(out)
    ok = True
    for inputs in sorted(out.glob("*_inputs.json")):
        name = inputs.name.removesuffix("_inputs.json")
        runner = OnnxrtRunner(SessionFromOnnx(str(out / f"{name}.onnx")), name=f"onnxrt-{name}")
        results = Comparator.run([runner], data_loader=load_json(str(inputs)))
        for runner_name, iterations in RunResults.load(str(out / f"{name}_outputs.json")).items():
            results.append((runner_name, iterations))
        ok &= bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=TRT_ATOL, rtol=TRT_RTOL)))
    return ok


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path, help="a `gpstoken export-generator` folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the recipe files")
    parser.add_argument("--model", type=Path, help="the exported GPSGenerator folder (default: the shipped demo generator)")
    args = parser.parse_args(argv)
    from gpstoken.generation import shipped_generator_folder

    generator = GPSGenerator.from_pretrained(args.model or shipped_generator_folder())
    script = write_velocity_recipe(args.export_dir, generator, args.out)
    ok = check_velocity_recipe(args.out)
    print(f"velocity graphs, saved inputs through ONNX Runtime vs torch outputs: {'PASS' if ok else 'FAIL'}; on a GPU: bash {script}")
    return 0 if ok else 1


__all__ = ["check_generator_export", "check_velocity_recipe", "write_velocity_recipe", "FP16_SCALE_ATOL", "FP32_RTOL",
           "FP32_SCALE_ATOL"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
