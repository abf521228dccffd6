"""Tiles of a large image, token placement, and how tokens of several tiles are decoded.

One definition for the library, the exporter and the runtime. An image larger than the model's tile
(256) is cut into a grid of nearly equal tiles; each tile is partitioned and encoded on its own, so a
token's g is in its tile's coordinates. Decoding then follows one of two modes:

- ``"merged"``: all tokens are moved to whole-image coordinates and rendered as one map, decoded with
  per-tile normalization statistics over the grid (the official S64/M128 high-resolution path);
- ``"tiles"``: each tile's tokens are decoded as their own tile-size image and the results are placed
  side by side (the official L256 path; also what a model never trained on merged maps does best).

A single-tile image is decoded the same way in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TILE = 256  # official training tile; larger images are partitioned and encoded per tile
DECODE_MODES = ("merged", "tiles")

Box = tuple[int, int, int, int]  # inclusive pixels (x0, y0, x1, y1)


def check_decode_mode(mode: str) -> str:
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    return mode


def tile_grid(height: int, width: int, tile: int = TILE) -> np.ndarray:
    """(T, 4) inclusive tile boxes, row-major. Sides that are not multiples of ``tile`` are cut into
    ceil(side / tile) nearly equal parts (no padding, no resizing), so boxes stay in image pixels."""
    ny, nx = -(-height // tile), -(-width // tile)
    ys = [round(i * height / ny) for i in range(ny + 1)]
    xs = [round(i * width / nx) for i in range(nx + 1)]
    return np.array([(xs[j], ys[i], xs[j + 1] - 1, ys[i + 1] - 1) for i in range(ny) for j in range(nx)], dtype=np.int32)


def grid_shape(tiles) -> tuple[int, int]:
    """(rows, cols) of row-major tile boxes."""
    return len({int(b[1]) for b in tiles}), len({int(b[0]) for b in tiles})


def tile_to_image(g, tile_boxes, image_size: tuple[int, int], stack):
    """Gaussians g (..., L, 5) in their tiles' coordinates -> whole-image coordinates.

    ``tile_boxes`` (L, 4) holds each token's tile (x0, y0, x1, y1), inclusive pixels, as the same array type
    as g (numpy or torch; ``stack`` is np.stack or torch.stack). A tile spanning x0..x1 of an image W wide
    covers [-1 + 2 x0 / W, -1 + 2 (x1 + 1) / W]: for equal tiles this is the official token merging
    (sigma / n, x' = -1 + (2 j + x + 1) / n).
    """
    h, w = image_size
    x0, y0 = tile_boxes[:, 0], tile_boxes[:, 1]
    sx, sy = (tile_boxes[:, 2] - x0 + 1) / w, (tile_boxes[:, 3] - y0 + 1) / h
    return stack(
        [
            g[..., 0] * sx,
            g[..., 1] * sy,
            g[..., 2],
            -1 + 2 * x0 / w + (g[..., 3] + 1) * sx,
            -1 + 2 * y0 / h + (g[..., 4] + 1) * sy,
        ],
        -1,
    )


@dataclass(frozen=True)
class DecoderSpec:
    """What one decoder run produces: an image of ``image_size`` (H, W) whose map is normalized with
    per-tile statistics over ``grid`` (rows, cols); grid (1, 1) is a plain single-tile decode."""

    image_size: tuple[int, int]
    grid: tuple[int, int] = (1, 1)

    @property
    def name(self) -> str:
        """Stable name of the graph that decodes this (file stem in an export)."""
        h, w = self.image_size
        ny, nx = self.grid
        return f"decoder_{w}x{h}" + ("" if (ny, nx) == (1, 1) else f"_grid{nx}x{ny}")


@dataclass(frozen=True)
class DecodeJob:
    """One decoder run of a decode: ``tile`` is the tile whose tokens (in tile coordinates) it decodes,
    or None for all tokens in whole-image coordinates; the output covers ``box`` of the image."""

    spec: DecoderSpec
    tile: int | None
    box: Box


def decode_jobs(image_size: tuple[int, int], tiles, mode: str) -> list[DecodeJob]:
    """The decoder runs that decode an image of ``image_size`` cut into ``tiles`` in ``mode``."""
    check_decode_mode(mode)
    h, w = (int(v) for v in image_size)
    tiles = [tuple(int(v) for v in t) for t in tiles]
    whole = (0, 0, w - 1, h - 1)
    if len(tiles) == 1:
        return [DecodeJob(DecoderSpec((h, w)), None, whole)]
    if mode == "merged":
        return [DecodeJob(DecoderSpec((h, w), grid_shape(tiles)), None, whole)]
    return [DecodeJob(DecoderSpec((y1 - y0 + 1, x1 - x0 + 1)), t, (x0, y0, x1, y1)) for t, (x0, y0, x1, y1) in enumerate(tiles)]


def decoder_specs(image_size: tuple[int, int], tile: int, mode: str) -> list[DecoderSpec]:
    """The distinct decoder graphs needed for images of ``image_size`` in ``mode`` (what an export must hold)."""
    h, w = image_size
    seen: dict[DecoderSpec, None] = {}
    for job in decode_jobs((h, w), tile_grid(h, w, tile), mode):
        seen.setdefault(job.spec)
    return list(seen)


def encode_groups(tiles, tile_index) -> list[list[int]]:
    """Tile ids grouped so that each group can be encoded as one batch (same tile size, same token count)."""
    index = np.asarray(tile_index)
    groups: dict[tuple, list[int]] = {}
    for t, (x0, y0, x1, y1) in enumerate(tiles):
        groups.setdefault((int(y1 - y0 + 1), int(x1 - x0 + 1), int((index == t).sum())), []).append(t)
    return list(groups.values())


def parse_image_size(text: str, allow_keep: bool = False) -> tuple[int, int] | None:
    """Command-line size: '512' -> (512, 512), '600x400' -> (400, 600) as (H, W) (written width x height);
    '0' -> None (keep the image's size) where ``allow_keep``. ValueError names the accepted forms."""
    forms = "N, WxH" + (" or 0" if allow_keep else "") + " (sides >= 16)"
    try:
        parts = [int(v) for v in str(text).lower().split("x")]
    except ValueError:
        raise ValueError(f"expected {forms}, e.g. 512 or 600x400; got {text!r}") from None
    if allow_keep and parts == [0]:
        return None
    if len(parts) not in (1, 2) or min(parts) < 16:
        raise ValueError(f"expected {forms}, e.g. 512 or 600x400; got {text!r}")
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[1], parts[0])
