"""Tokenizer timings on CPU, each against a baseline measured in the same run.

    python benchmarks/tokenizer.py [--quick]

1. RoIAlign (adaptive sampling, 8x8, as the official model) over a real partition: our grouped
   grid_sample implementation vs one grid_sample call per box (the straightforward port).
2. Decoding with the compiled splat op vs the same model rendering with the dense torch reference.
3. Encode / decode latency of the tiny model (shipped demo) and of M128 at 256x256, batch 1.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import gpstoken
from gpstoken_core.imageio import bundled_photo, center_crop_resize
from gpstoken.roi_align import roi_align
from timing import median_ms


def roi_align_per_box(features, boxes, size):
    """Baseline: each box on its own, with its own adaptive sample grid."""
    b, c, h, w = features.shape
    out = features.new_zeros(b, boxes.shape[1], c, size, size)
    for i in range(b):
        for n in range(boxes.shape[1]):
            x0, y0, x1, y1 = boxes[i, n].tolist()
            gx, gy = max(1, int(np.ceil((x1 - x0) / size))), max(1, int(np.ceil((y1 - y0) / size)))
            xs = x0 - 0.5 + (torch.arange(size * gx) + 0.5) * (x1 - x0) / (size * gx)
            ys = y0 - 0.5 + (torch.arange(size * gy) + 0.5) * (y1 - y0) / (size * gy)
            grid = torch.stack(torch.meshgrid(xs * 2 / (w - 1) - 1, ys * 2 / (h - 1) - 1, indexing="xy"), -1)
            s = F.grid_sample(features[i : i + 1], grid[None].to(features.dtype), padding_mode="border", align_corners=True)
            out[i, n] = s.reshape(c, size, gy, size, gx).mean(dim=(2, 4))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    torch.manual_seed(0)
    photo = center_crop_resize(bundled_photo("astronaut"), 256)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    print("| RoIAlign, 256x256, 128 channels | per-box loop (ms) | gpstoken grouped (ms) | speed-up |")
    print("|---|---|---|---|")
    feats = torch.randn(1, 128, 256, 256)
    for tokens in (64, 128, 256):
        boxes = torch.from_numpy(gpstoken.partition(photo, tokens).boxes.astype(np.float32))[None]
        base = median_ms(lambda: roi_align_per_box(feats, boxes, 8), repeats)
        ours = median_ms(lambda: roi_align(feats, boxes, 8), repeats)
        print(f"| {tokens} tokens | {base:.1f} | {ours:.1f} | {base / ours:.1f}x |")

    model = gpstoken.GPSTokenizer("tiny").eval()
    with torch.inference_mode():
        tokens = model.encode(photo)
        dense = lambda: model.decoder(gpstoken.splat_reference(tokens.g, tokens.f, (64, 64)))  # noqa: E731
        op = lambda: model.decode(tokens)  # noqa: E731
        base, ours = median_ms(dense, repeats), median_ms(op, repeats)
    print("\n| tiny decode, 256x256, 128 tokens | dense splat reference (ms) | splat op (ms) | speed-up |")
    print("|---|---|---|---|")
    print(f"| batch 1 | {base:.1f} | {ours:.1f} | {base / ours:.2f}x |")

    print("\n| model, 256x256, batch 1 | parameters | encode incl. partition (ms) | decode (ms) |")
    print("|---|---|---|---|")
    for name in ("tiny", "m128"):
        model = gpstoken.GPSTokenizer(name).eval()
        with torch.inference_mode():
            enc = median_ms(lambda: model.encode(photo), max(2, repeats // 2))
            tokens = model.encode(photo)
            dec = median_ms(lambda: model.decode(tokens), max(2, repeats // 2))
        print(f"| {name} | {model.num_parameters() / 1e6:.1f}M | {enc:.0f} | {dec:.0f} |")


if __name__ == "__main__":
    main()
