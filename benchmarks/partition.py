"""Partition (Alg. 1) time: the C++ module against the straightforward Python implementation of the
same rules (tests/partition_reference.py), on scikit-image photos at 256x256.

    python benchmarks/partition.py
"""

from __future__ import annotations

import importlib.util
import os
import statistics
from pathlib import Path

import numpy as np

from gpstoken_core import _gpstoken_partition as native
from gpstoken_core.imageio import bundled_photo, center_crop_resize
from gpstoken_core.official import MIN_REGION, PARTITION_LAMBDA
from gpstoken_core.partition import partition
from timing import median_ms

_spec = importlib.util.spec_from_file_location(
    "partition_reference", Path(__file__).resolve().parents[1] / "tests" / "partition_reference.py"
)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]


def main() -> None:
    images = [center_crop_resize(bundled_photo(n), 256) for n in PHOTOS]
    greys = [native.grey_from_rgb(im) for im in images]
    print(f"{os.cpu_count()} cores; per-image median over {len(PHOTOS)} photos (256x256)\n")
    print("| tokens | Python reference (ms) | C++ single image (ms) | speed-up | C++ batch of 32 (images/s, all cores) | C++ batch of 32 (images/s, 1 thread) |")
    print("|---|---|---|---|---|---|")
    batch = np.stack([images[i % len(images)] for i in range(32)])
    for tokens in (64, 128, 256):
        ref = statistics.median(median_ms(lambda g=g: reference.partition(g, tokens), 2, warmup=False) / 1000 for g in greys)
        ours = statistics.median(
            median_ms(lambda g=g: native.partition_many([g], [tokens], PARTITION_LAMBDA, MIN_REGION, [None], 1), 7, warmup=False) / 1000 for g in greys
        )
        many = median_ms(lambda: partition(batch, tokens), 3, warmup=False) / 1000
        one = median_ms(lambda: partition(batch, tokens, threads=1), 2, warmup=False) / 1000
        print(f"| {tokens} | {ref * 1e3:.0f} | {ours * 1e3:.1f} | {ref / ours:.1f}x | {32 / many:.0f} | {32 / one:.0f} |")


if __name__ == "__main__":
    main()
