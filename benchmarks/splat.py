"""Forward+backward time of the compiled CPU GaussianSplat op against the dense torch reference.

    python benchmarks/splat.py            # full table (about a minute on 2 cores)
    python benchmarks/splat.py --quick    # fewer repeats

Tokens are placed like the paper's partition (Alg. 1): a 256x256 tile is split in halves, largest
region first with random tie-breaking, until L regions remain; each becomes a Gaussian with the
official sigma = (region width in normalized units) / 3, rho = 0, mean at the region centre. The
partition proper lives in gpstoken.partition; this keeps the benchmark independent of it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpstoken import splat, splat_reference


def partition_like_tokens(batch: int, tokens: int, channels: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    gaussians = []
    for _ in range(batch):
        regions = [(0, 0, 256, 256)]  # x0, y0, w, h in pixels
        while len(regions) < tokens:
            areas = torch.tensor([w * h for _, _, w, h in regions], dtype=torch.float64)
            # Prefer large regions, as entropy-weighted area does on natural photos.
            i = int(torch.multinomial(areas**1.5, 1, generator=gen))
            x0, y0, w, h = regions.pop(i)
            if w >= h:
                regions += [(x0, y0, w // 2, h), (x0 + w // 2, y0, w - w // 2, h)]
            else:
                regions += [(x0, y0, w, h // 2), (x0, y0 + h // 2, w, h - h // 2)]
        g = [
            [(w - 1) / 256 * 2 / 3, (h - 1) / 256 * 2 / 3, 0.0, (2 * x0 + w - 1) / 255 - 1, (2 * y0 + h - 1) / 255 - 1]
            for x0, y0, w, h in regions
        ]
        gaussians.append(g)
    g = torch.tensor(gaussians, dtype=torch.float32)
    f = torch.randn(batch, tokens, channels, generator=gen)
    return g, f


def time_fwd_bwd(fn, g, f, size, repeats: int) -> float:
    """Median seconds of one forward + backward."""
    grad_out = torch.randn(g.shape[0], f.shape[2], *size)
    times = []
    for i in range(repeats + 2):
        gg, ff = g.clone().requires_grad_(), f.clone().requires_grad_()
        start = time.perf_counter()
        out = fn(gg, ff, size)
        out.backward(grad_out)
        if i >= 2:  # two warm-up rounds
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    size = (64, 64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {repeats} runs, fp32\n")

    print("| setting | dense torch reference (ms) | gpstoken CPU op (ms) | speed-up |")
    print("|---|---|---|---|")
    for batch, tokens, channels in [(8, 128, 16), (8, 256, 32)]:
        g, f = partition_like_tokens(batch, tokens, channels)
        ref = time_fwd_bwd(splat_reference, g, f, size, repeats)
        ours = time_fwd_bwd(splat, g, f, size, repeats)
        print(f"| B={batch} L={tokens} C={channels} 64x64 | {ref * 1e3:.2f} | {ours * 1e3:.3f} | {ref / ours:.1f}x |")

    print("\nFixed coverage (the tokens tile the image), B=8, C=16, 64x64:\n")
    print("| L | dense torch reference (ms) | gpstoken CPU op (ms) | speed-up | op time / time at L=64 |")
    print("|---|---|---|---|---|")
    base = None
    for tokens in [64, 128, 256, 512, 1024]:
        g, f = partition_like_tokens(8, tokens, 16, seed=tokens)
        ref = time_fwd_bwd(splat_reference, g, f, size, max(3, repeats // 3))
        ours = time_fwd_bwd(splat, g, f, size, repeats)
        base = base or ours
        print(f"| {tokens} | {ref * 1e3:.1f} | {ours * 1e3:.3f} | {ref / ours:.1f}x | {ours / base:.2f} |")


if __name__ == "__main__":
    main()
