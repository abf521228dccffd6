"""Encode + decode: torch eager (GPSTokenizer) vs the slim runtime on ONNX Runtime, same weights, one run.

    python benchmarks/runtime.py [--quick] [--models tiny m128] [--batches 1 8]

Latency at batch 1 and throughput at batch 8 on 256x256 photos, for the tiny model and M128 (random
weights: timing only). Both sides include the partition; outputs are checked to agree before timing.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from gpstoken_export.export import export_model
from gpstoken_runtime import Tokenizer

import gpstoken
from gpstoken_core.imageio import bundled_photo, center_crop_resize
from timing import median_ms

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "camera", "coins", "brick")


def photos(n: int) -> np.ndarray:
    import skimage.data

    out = []
    for name in PHOTOS[:n]:
        image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else bundled_photo(name)
        out.append(center_crop_resize(gpstoken_core.imageio.to_rgb_uint8(image), 256))
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--models", nargs="+", default=["tiny", "m128"], help="configs to time (default: tiny m128)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes (default: 1 8)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    batch8 = photos(max(args.batches))
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), 256x256, encode + decode incl. partition\n")
    print("| model | batch | torch eager (ms) | runtime, ONNX Runtime (ms) | speed-up | images/s torch | images/s runtime | max |diff| (grey levels) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = gpstoken.GPSTokenizer(name).eval()
        with tempfile.TemporaryDirectory() as tmp:
            runtime = Tokenizer.load(export_model(model, Path(tmp) / name))
            for batch in args.batches:
                images = batch8[:batch]

                def eager():
                    with torch.inference_mode():
                        return gpstoken.to_uint8(model.reconstruct(images))

                def slim():
                    return runtime.reconstruct(images)

                diff = int(np.abs(eager().astype(int) - slim().astype(int)).max())
                reps = repeats if (name == "tiny" or batch == 1) else max(2, repeats // 3)
                t_eager, t_slim = median_ms(eager, reps), median_ms(slim, reps)
                print(
                    f"| {name} | {batch} | {t_eager:.0f} | {t_slim:.0f} | {t_eager / t_slim:.2f}x | "
                    f"{1000 * batch / t_eager:.1f} | {1000 * batch / t_slim:.1f} | {diff} |"
                )


if __name__ == "__main__":
    main()
