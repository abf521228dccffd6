"""High-resolution reconstruction quality of a tokenizer (paper Table 3), both decode modes.

    python benchmarks/highres.py [--model DIR] [--quick] [--figure benchmarks/figures/highres.png]

Each photo is brought to 256x256, 512x512, 600x400 and 1024x1024 (short side resized, centre crop,
bicubic with antialiasing: larger sizes keep more of the photo's own detail, 1024 upsamples most of
them), partitioned per 256 tile with the model's tokens per tile (tokens scale with area), encoded once
and decoded both ways: "merged" (one map, per-tile statistics: official S64/M128) and "tiles" (each
tile on its own: official L256). Prints the mean PSNR / SSIM per size and mode for the scikit-image
photos (the demo model's training photos) and scikit-learn's two held-out photos, and writes a figure.
Default model: the shipped demo model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import gpstoken
from gpstoken_core.imageio import center_crop_resize
from gpstoken.imagesets import read_image
from gpstoken_core.metrics import psnr, ssim
from gpstoken_core.tiling import DECODE_MODES, tile_grid
from gpstoken.viz import panels

TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "immunohistochemistry", "hubble_deep_field")
HELD_OUT = ("china", "flower")
SIZES = ((256, 256), (512, 512), (400, 600), (1024, 1024))  # (H, W)
MODES = DECODE_MODES


def measure(model, names, sizes) -> dict:
    """{(size, mode): [(psnr, ssim) per photo]} and the reconstructions of the first photo."""
    results: dict = {}
    first: dict = {}
    for name in names:
        photo = read_image(name)
        for size in sizes:
            image = center_crop_resize(photo, size)
            with torch.inference_mode():
                tokens = model.encode(image)
                for mode in MODES:
                    recon = gpstoken.to_uint8(model.decode(tokens, mode))[0]
                    results.setdefault((size, mode), []).append((psnr(image, recon), ssim(image, recon)))
                    if name == names[0]:
                        first[(size, mode)] = (image, recon)
    return results, first


def table(title: str, results: dict, sizes, config) -> str:
    lines = [f"**{title}**", "", "| size | tiles | tokens | PSNR merged | PSNR tiles | SSIM merged | SSIM tiles |", "|---|---|---|---|---|---|---|"]
    for h, w in sizes:
        n = len(tile_grid(h, w, config.tile))
        row = [f"{w}x{h}", str(n), str(config.tokens_per_tile * n)]
        for k in (0, 1):
            row += [f"{np.mean([r[k] for r in results[((h, w), mode)]]):.2f}" if k == 0 else f"{np.mean([r[k] for r in results[((h, w), mode)]]):.4f}" for mode in MODES]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def figure(first: dict, path: Path) -> None:
    """One photo at 600x400: input, merged decode, per-tile decode (tile borders drawn on the input)."""
    image, merged = first[((400, 600), "merged")]
    _, tiles = first[((400, 600), "tiles")]
    marked = image.copy()
    for x0, y0, x1, y1 in gpstoken.partition(image, 6).tiles:
        marked[y0, x0 : x1 + 1] = marked[y1, x0 : x1 + 1] = (255, 255, 0)
        marked[y0 : y1 + 1, x0] = marked[y0 : y1 + 1, x1] = (255, 255, 0)
    pm, pt = psnr(image, merged), psnr(image, tiles)
    picture = panels([marked, merged, tiles], ["input (6 tiles of 200x200)", f"merged {pm:.2f} dB", f"tiles {pt:.2f} dB"])
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model folder (default: the shipped demo model)")
    parser.add_argument("--quick", action="store_true", help="two photos, 256 and 512 only")
    parser.add_argument("--figure", type=Path, default=Path("benchmarks/figures/highres.png"))
    args = parser.parse_args()
    path = args.model or Path(gpstoken.__file__).parent / "weights" / "tiny"
    model = gpstoken.GPSTokenizer.from_pretrained(path)
    print(f"model {path} ({model.config.name}, default decode mode {model.config.decode_mode!r})")
    sizes = SIZES[:2] if args.quick else SIZES
    t0 = time.perf_counter()
    train, first = measure(model, [f"skimage:{n}" for n in (TRAIN_PHOTOS[:2] if args.quick else TRAIN_PHOTOS)], sizes)
    print(table(f"scikit-image photos ({len(train[(sizes[0], 'merged')])}, the demo model's training set)", train, sizes, model.config))
    if not args.quick:
        held, _ = measure(model, [f"sklearn:{n}" for n in HELD_OUT], sizes)
        print()
        print(table("scikit-learn photos (2, held out)", held, sizes, model.config))
        figure(first, args.figure)
        print(f"\nwrote {args.figure}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
