"""Timing for the benchmark scripts (imported as a sibling: `python benchmarks/NAME.py` puts this folder
on sys.path). Medians of a few repeats after one warm-up call: this VM is noisy."""

from __future__ import annotations

import statistics
import time


def median_ms(fn, repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls (after one warm-up call)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000
