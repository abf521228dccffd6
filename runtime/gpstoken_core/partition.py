"""Spatially-adaptive initialization (paper Alg. 1) and Gaussian calibration (Alg. 2).

The rules run in C++ (``_gpstoken_partition``, numpy only, shared with the slim runtime); this module
handles images, tiles, user priority and errors. Defaults are the official training values of
``gpstoken_core.official`` (lambda 2.5, minimum region size 8 where the paper says 4, 128 tokens per
tile) and the 256x256 tile of ``gpstoken_core.tiling``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import _gpstoken_partition as _native  # the C++ module, installed into this package
from .imageio import MAX_PIXELS, ImageError, to_rgb_uint8
from .official import MIN_REGION, PARTITION_LAMBDA, TOKENS_PER_TILE
from .tiling import TILE, tile_grid

DEFAULT_PRIORITY_WEIGHT = 200.0  # per pixel; typical photo regions have m / area = H^2.5 of ~30..90


@dataclass
class Partition:
    """Result of Alg. 1 on one image.

    boxes: (L, 4) int32 inclusive pixel boxes (x0, y0, x1, y1) in image coordinates.
    g_init: (L, 5) float32 official g_init (sigma_x, sigma_y, rho, mu_x, mu_y), normalized to each
        token's own tile (what an encoder trained on 256x256 tiles expects).
    tile_index: (L,) int32, the tile of each token; tiles: (T, 4) inclusive tile boxes, row-major.
    """

    boxes: np.ndarray
    g_init: np.ndarray
    tile_index: np.ndarray
    tiles: np.ndarray
    image_size: tuple[int, int]  # (H, W)

    def __len__(self) -> int:
        return len(self.boxes)

    def gaussians_in_image(self) -> np.ndarray:
        """(L, 5) the same Gaussians normalized to the whole image (for drawing, merging tiles)."""
        return _native.regions_to_gaussians(self.boxes, *self.image_size).astype(np.float32)


def _split_count(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (k < extra) for k in range(parts)]


def _check_priority(priority, height: int, width: int) -> np.ndarray | None:
    if priority is None:
        return None
    p = np.asarray(priority, dtype=np.float64)
    if p.shape != (height, width):
        raise ValueError(f"priority must be an (H, W) = {(height, width)} map, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("priority contains NaN or Inf")
    return p


def partition(
    image: np.ndarray,
    num_tokens: int | None = None,
    lam: float = PARTITION_LAMBDA,
    min_size: int = MIN_REGION,
    priority: np.ndarray | None = None,
    *,
    tile: int = TILE,
    threads: int | None = None,
) -> Partition | list[Partition]:
    """Alg. 1 on one HxWx3 image or a batch (N, H, W, 3); a batch returns a list, computed in parallel.

    Args:
        num_tokens: total tokens; default 128 (``TOKENS_PER_TILE``) per tile, so scaled with area. Spread
            over tiles as evenly as possible, each tile partitioned on its own (the official
            high-resolution scheme).
        lam: entropy exponent lambda. min_size: no region side is split below this (official 8).
        priority: optional (H, W) map added to region complexity (official ``cdbias``); see
            ``priority_from_boxes`` / ``priority_from_mask``. For a batch, one map or a list.
        tile: tile side; images no larger than it are one tile.
    Grey, RGBA, 16-bit and float [0, 1] images are converted; see ``gpstoken_core.imageio.to_rgb_uint8``.
    """
    arr = np.asarray(image)
    batch = arr.ndim == 4
    images = list(arr) if batch else [arr]
    priorities = priority if (batch and isinstance(priority, (list, tuple))) else [priority] * len(images)
    if len(priorities) != len(images):
        raise ValueError(f"got {len(priorities)} priority maps for {len(images)} images")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if tile < 2 * min_size:
        raise ValueError(f"tile must be at least 2 * min_size = {2 * min_size}, got {tile}")

    jobs, layout = [], []
    for k, (img, pri) in enumerate(zip(images, priorities)):
        name = f"image {k}" if batch else "image"
        rgb = to_rgb_uint8(img, name)
        h, w = rgb.shape[:2]
        if h * w > MAX_PIXELS:
            raise ImageError(f"{name}: {w}x{h} is larger than the {MAX_PIXELS} pixel limit")
        if h < 2 * min_size or w < 2 * min_size:
            raise ImageError(f"{name}: {w}x{h} is too small: both sides must be >= 2 * min_size = {2 * min_size}")
        pri = _check_priority(pri, h, w)
        tiles = tile_grid(h, w, tile)
        total = TOKENS_PER_TILE * len(tiles) if num_tokens is None else int(num_tokens)
        if total < len(tiles):
            raise ValueError(f"num_tokens must be >= 1 per tile ({len(tiles)} tiles), got {total}")
        counts = _split_count(total, len(tiles))
        grey = _native.grey_from_rgb(rgb)
        for (x0, y0, x1, y1), count in zip(tiles, counts):
            th, tw = y1 - y0 + 1, x1 - x0 + 1
            limit = _native.max_tokens(th, tw, min_size)
            if count > limit:
                raise ValueError(
                    f"num_tokens {total} is too many: a {tw}x{th} tile holds at most {limit} regions with "
                    f"min_size {min_size} ({limit * len(tiles)} for this image)"
                )
            crop = np.ascontiguousarray(grey[y0 : y1 + 1, x0 : x1 + 1])
            pcrop = None if pri is None else np.ascontiguousarray(pri[y0 : y1 + 1, x0 : x1 + 1])
            jobs.append((crop, count, pcrop))
        layout.append(((h, w), tiles))

    threads = threads or min(len(jobs), os.cpu_count() or 1)
    results = _native.partition_many(
        [j[0] for j in jobs], [j[1] for j in jobs], float(lam), int(min_size), [j[2] for j in jobs], threads
    )

    out, cursor = [], 0
    for (h, w), tiles in layout:
        boxes, gaussians, index = [], [], []
        for t, (x0, y0, x1, y1) in enumerate(tiles):
            local = results[cursor]
            cursor += 1
            gaussians.append(_native.regions_to_gaussians(local, y1 - y0 + 1, x1 - x0 + 1))
            boxes.append(local + np.array([x0, y0, x0, y0], dtype=np.int32))
            index.append(np.full(len(local), t, dtype=np.int32))
        out.append(
            Partition(
                boxes=np.concatenate(boxes),
                g_init=np.concatenate(gaussians).astype(np.float32),
                tile_index=np.concatenate(index),
                tiles=tiles,
                image_size=(h, w),
            )
        )
    return out if batch else out[0]


def priority_from_boxes(
    size: tuple[int, int], boxes: Sequence[Sequence[int]], weight: float = DEFAULT_PRIORITY_WEIGHT
) -> np.ndarray:
    """(H, W) priority map: ``weight`` per pixel inside each inclusive box (x0, y0, x1, y1)."""
    h, w = size
    p = np.zeros((h, w), dtype=np.float64)
    for box in boxes:
        x0, y0, x1, y1 = (int(v) for v in box)
        if not (0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h):
            raise ValueError(f"focus box {(x0, y0, x1, y1)} is not inside the {w}x{h} image")
        p[y0 : y1 + 1, x0 : x1 + 1] += weight
    return p


def priority_from_mask(mask: np.ndarray, weight: float = DEFAULT_PRIORITY_WEIGHT) -> np.ndarray:
    """(H, W) priority map: ``weight`` where the mask is set (non-zero; RGB masks use any channel)."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W) or (H, W, C), got shape {np.asarray(mask).shape}")
    return (m > 0).astype(np.float64) * weight


def calibrate(g_pred: np.ndarray, size: tuple[int, int], s_min: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Alg. 2 on one tile: snap predicted means to the ``s_min`` grid, re-partition by mean counts.

    Returns (g_cal (L, 5) float32 in the official g_init convention, boxes (L, 4) inclusive pixels).
    The sigmas follow the official initialization (region width / 3), not the paper's w / 6.
    """
    g = np.asarray(g_pred, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] != 5:
        raise ValueError(f"g_pred must be (L, 5), got shape {g.shape}")
    if not np.isfinite(g[:, 3:]).all():
        raise ValueError("g_pred has NaN or Inf means")
    h, w = size
    boxes = _native.calibrate(np.ascontiguousarray(g), int(h), int(w), int(s_min))
    return _native.regions_to_gaussians(boxes, h, w).astype(np.float32), boxes
