"""Partition (Alg. 1) time: the C++ module against the straightforward Python implementation of the
same rules (tests/partition_reference.py), on scikit-image photos at 256x256, and optionally against the
official code.

    python benchmarks/partition.py
    python benchmarks/partition.py --official GPSToken/datasets/adaptivegps.py --official-python ENV/bin/python

``--official``: the official repository's file (github.com/xtudbxk/GPSToken, not part of this project; fetch it
yourself), run by a Python that has numpy and OpenCV (``pip install numpy opencv-python-headless`` in a scratch
environment). Only its two functions ``calculate_complexity_degree`` and ``adaptive_initialize`` are taken
(the file's dataset class needs the training code), and they get the same grey tiles as float32 in [-1, 1],
as its dataset gives them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
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


OFFICIAL_RUNNER = r"""
import ast, json, math, statistics, sys, time
import cv2, numpy as np
source, greys_path, tokens_list = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tree = ast.parse(open(source).read())
wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("calculate_complexity_degree", "adaptive_initialize")]
namespace = {"cv2": cv2, "np": np, "math": math}
exec(compile(ast.Module(body=wanted, type_ignores=[]), source, "exec"), namespace)
greys = list(np.load(greys_path).values())
out = {}
for tokens in tokens_list:
    per_image = []
    for g in greys:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            namespace["adaptive_initialize"](tokens, img=g, minhw=8, weight=2.5)
            times.append(time.perf_counter() - t0)
        per_image.append(statistics.median(times))
    out[str(tokens)] = statistics.median(per_image)
print(json.dumps(out))
"""


def official_seconds(source: Path, python: str, greys: list[np.ndarray], tokens: list[int]) -> dict[int, float]:
    """Median seconds per image of the official partition, run by ``python`` (numpy + OpenCV)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "greys.npz"
        np.savez(path, *[g.astype(np.float32) for g in greys])
        proc = subprocess.run([python, "-c", OFFICIAL_RUNNER, str(source), str(path), json.dumps(tokens)],
                              capture_output=True, text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"the official partition did not run: {proc.stderr.strip().splitlines()[-1:]}")
    return {int(k): v for k, v in json.loads(proc.stdout).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, help="the official datasets/adaptivegps.py")
    parser.add_argument("--official-python", default=sys.executable, help="a Python with numpy and OpenCV for --official")
    args = parser.parse_args()
    images = [center_crop_resize(bundled_photo(n), 256) for n in PHOTOS]
    greys = [native.grey_from_rgb(im) for im in images]
    official = official_seconds(args.official, args.official_python, greys, [64, 128, 256]) if args.official else None
    print(f"{os.cpu_count()} cores; per-image median over {len(PHOTOS)} photos (256x256)\n")
    extra = ("official Python/OpenCV (ms) | vs official | ") if official else ""
    print(f"| tokens | Python reference (ms) | C++ single image (ms) | speed-up | {extra}C++ batch of 32 (images/s, all cores) | C++ batch of 32 (images/s, 1 thread) |")
    print("|---|---|---|---|---|---|" + ("---|---|" if official else ""))
    batch = np.stack([images[i % len(images)] for i in range(32)])
    for tokens in (64, 128, 256):
        ref = statistics.median(median_ms(lambda g=g: reference.partition(g, tokens), 2, warmup=False) / 1000 for g in greys)
        ours = statistics.median(
            median_ms(lambda g=g: native.partition_many([g], [tokens], PARTITION_LAMBDA, MIN_REGION, [None], 1), 7, warmup=False) / 1000 for g in greys
        )
        many = median_ms(lambda: partition(batch, tokens), 3, warmup=False) / 1000
        one = median_ms(lambda: partition(batch, tokens, threads=1), 2, warmup=False) / 1000
        vs = f"{official[tokens] * 1e3:.1f} | {official[tokens] / ours:.1f}x | " if official else ""
        print(f"| {tokens} | {ref * 1e3:.0f} | {ours * 1e3:.1f} | {ref / ours:.1f}x | {vs}{32 / many:.0f} | {32 / one:.0f} |")


if __name__ == "__main__":
    main()
