"""Decode throughput on a GPU: torch eager (CUDA) vs the runtime's TensorRT backend, fp32 and fp16 engines.

    python benchmarks/tensorrt.py --plugin build/libgpstoken_trt.so [--model DIR] [--batch 8]

Needs an NVIDIA GPU, torch with CUDA, tensorrt and cuda-bindings; exports the model (fp32 and fp16),
builds engines, checks the outputs agree, then prints decoded images/s at the batch size and the
ratios against torch eager measured in the same run. Without a GPU it says so and exits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import gpstoken
from gpstoken_core.imageio import bundled_photo, center_crop_resize

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "brick", "page")


def per_second(fn, batch: int, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugin", type=Path, required=True, help="libgpstoken_trt.so (getCreators build)")
    parser.add_argument("--model", type=Path, help="model folder (default: the shipped demo model)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/tensorrt.py needs an NVIDIA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from gpstoken_export.build_engine import build_engines
    from gpstoken_export.export import export_model
    from gpstoken_runtime import Tokenizer

    model = gpstoken.GPSTokenizer.from_pretrained(args.model or Path(gpstoken.__file__).parent / "weights" / "tiny").eval()
    photos = np.stack([center_crop_resize(bundled_photo(p), 256) for p in (PHOTOS * args.batch)[: args.batch]])
    with torch.inference_mode():
        tokens = model.encode(photos)
    cuda_model = model.cuda()
    cuda_tokens = tokens.to("cuda")

    def eager():
        with torch.inference_mode():
            return cuda_model.decode(cuda_tokens)

    rows = [("torch eager, fp32", per_second(eager, args.batch, args.repeats, torch.cuda.synchronize), None)]
    reference = gpstoken.to_uint8(eager().float().cpu()).astype(int)
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            folder = export_model(model.cpu(), Path(tmp) / dtype, dtype=dtype)
            model.cuda()
            build_engines(folder, args.plugin, max_batch=args.batch, opt_batch=args.batch)
            runtime = Tokenizer.load(folder, backend="tensorrt", plugin_library=args.plugin)
            rt_tokens = runtime.encode(photos)
            diff = int(np.abs(runtime.decode(rt_tokens).astype(int) - reference).max())
            rows.append((f"TensorRT, {dtype}", per_second(lambda: runtime.decode(rt_tokens), args.batch, args.repeats), diff))
    print(f"{torch.cuda.get_device_name()}, decode 256x256, batch {args.batch}\n")
    print("| decoder | images/s | vs torch eager | max |diff| vs torch (grey levels) |")
    print("|---|---|---|---|")
    base = rows[0][1]
    for name, rate, diff in rows:
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {'-' if diff is None else diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
