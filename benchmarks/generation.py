"""Generation: torch eager (GPSGenerator) vs the slim runtime on ONNX Runtime, same weights, one run.

    python benchmarks/generation.py [--quick] [--models digits sit-xl] [--batches 1 8] [--steps 8]
    python benchmarks/generation.py --gpu --plugin libgpstoken_trt.so     # torch CUDA vs TensorRT fp16

samples/s of the texture stage's sampling (the layout stage, calibration and decoding are the same work on
both sides and excluded: tokens only, ``sample_tokens``), at equal steps, for the shipped digits generator
(gpstoken/weights/digits, when present) and SiT-XL/2-gs with random weights (timing only). Both sides use the
same thread count; the ratio is runtime / torch from the same run. The GPU figures (TensorRT fp16 vs torch
eager at 250 SDE steps and Heun 16) come from ``--gpu`` (run by the GPU check script when a GPU is present):
torch eager fp32 on CUDA vs the runtime on TensorRT engines of the float16 export (device-resident sampling,
CUDA graphs), batch 8.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from gpstoken_export.generator_export import export_generator
from gpstoken_runtime import Generator

import gpstoken
from gpstoken.generation import GPSGenerator, SiT, preset


def _generators(names: list[str]) -> dict[str, GPSGenerator]:
    out = {}
    digits = Path(gpstoken.__file__).parent / "weights" / "digits"
    if "digits" in names:
        if (digits / "texture").is_dir():
            out["digits"] = GPSGenerator.from_pretrained(digits)
        else:
            print(f"digits: {digits} has no generator yet (skipped)")
    if "sit-xl" in names:
        torch.manual_seed(0)
        tokenizer = gpstoken.GPSTokenizer("m128").eval()  # 128 tokens x 16 channels: the SiT-XL/2-gs texture shape
        out["sit-xl"] = GPSGenerator(SiT(preset("SiT-XL/2-gs")).eval(), tokenizer, SiT(preset("SiT-S/layout")).eval())
    return out


def _rate(fn, batch: int, sync=lambda: None) -> float:
    fn()  # warm-up (session init, allocator, CUDA-graph capture)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return batch / (time.perf_counter() - start)


def gpu_table(names: list[str], batch: int, plugin: str | None, budget: float) -> None:
    """torch eager (fp32, CUDA) vs the runtime on TensorRT (fp16 engines), samples/s of the texture stage."""
    from gpstoken_export.build_engine import build_engines

    start = time.perf_counter()
    print(f"{'model':8} {'batch':>5} {'sampler':>9} {'torch cuda /s':>13} {'tensorrt fp16 /s':>16} {'ratio':>6}")
    for name, gen in _generators(names).items():
        if time.perf_counter() - start > budget:
            print(f"{name}: skipped (out of the time budget)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_generator(gen, Path(tmp) / "export", dtype="float16")
            build_engines(folder, plugin, max_batch=batch)
            runtime = Generator.load(folder, backend="tensorrt", plugin_library=plugin)
            gen.to("cuda")
            labels = [k % gen.num_classes for k in range(batch)]
            for sampler, steps in (("sde", 250), ("heun", 16)):
                common = dict(seed=0, cfg_scale=1.5, sampler=sampler)
                t = _rate(lambda: gen.sample_tokens(labels, texture_steps=steps, **common), batch, torch.cuda.synchronize)
                r = _rate(lambda: runtime.sample_tokens(labels, steps=steps, **common), batch)
                print(f"{name:8} {batch:5d} {sampler + ' ' + str(steps):>9} {t:13.3f} {r:16.3f} {r / t:6.2f}x")
            gen.to("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "sit-xl"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--steps", type=int, default=8, help="texture SDE steps (equal on both sides)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="batch 1 and 4 steps only")
    parser.add_argument("--gpu", action="store_true", help="torch CUDA vs TensorRT fp16 engines (250 SDE steps, Heun 16)")
    parser.add_argument("--plugin", help="libgpstoken_trt.so for --gpu (the tokenizer engines need it)")
    parser.add_argument("--budget", type=float, default=240, help="--gpu: seconds before further models are skipped")
    args = parser.parse_args()
    if args.gpu:
        return gpu_table(args.models, max(args.batches), args.plugin, args.budget)
    torch.set_num_threads(args.threads)
    batches, steps = ([1], 4) if args.quick else (args.batches, args.steps)
    print(f"{'model':8} {'batch':>5} {'steps':>5} {'torch /s':>9} {'runtime /s':>10} {'ratio':>6}")
    for name, gen in _generators(args.models).items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_generator(gen, Path(tmp) / "export")
            runtime = Generator.load(folder, threads=args.threads)
            for b in batches:
                labels = [k % gen.num_classes for k in range(b)]
                common = dict(seed=0, cfg_scale=1.5, sampler="sde")
                t = _rate(lambda: gen.sample_tokens(labels, texture_steps=steps, **common), b)
                r = _rate(lambda: runtime.sample_tokens(labels, steps=steps, **common), b)
                print(f"{name:8} {b:5d} {steps:5d} {t:9.3f} {r:10.3f} {r / t:6.2f}x")


if __name__ == "__main__":
    main()
