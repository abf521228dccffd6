"""``Tokens``: what the encoder produces and the decoder consumes.

g is kept in each token's *tile* coordinates (what a model trained on 256x256 tiles sees); a single-tile
image's tile is the image itself. ``image_g()`` gives the same Gaussians over the whole image. Tokens
are plain tensors, so they can be edited: drop or add tokens, move or scale Gaussians; ``decode``
accepts any count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from gpstoken_core.tiling import grid_shape, tile_to_image

Box = tuple[int, int, int, int]  # inclusive pixels (x0, y0, x1, y1)


@dataclass
class Tokens:
    g: torch.Tensor  # (B, L, 5) sigma_x, sigma_y, rho, mu_x, mu_y in tile coordinates
    f: torch.Tensor  # (B, L, C) texture features
    image_size: tuple[int, int]  # (H, W) of the image the tokens describe
    g_init: torch.Tensor | None = None  # (B, L, 5) the partition's Gaussians, when encoded from an image
    tiles: tuple[Box, ...] | None = None  # row-major tile boxes; None: one tile, the whole image
    tile_index: torch.Tensor | None = None  # (L,) tile of each token; None: all in tile 0

    def __post_init__(self):
        if self.g.ndim != 3 or self.g.shape[-1] != 5:
            raise ValueError(f"tokens.g must be (B, L, 5), got shape {tuple(self.g.shape)}")
        if self.f.ndim != 3 or self.f.shape[:2] != self.g.shape[:2]:
            raise ValueError(f"tokens.f must be (B, L, C) with (B, L) = {tuple(self.g.shape[:2])}, got {tuple(self.f.shape)}")
        h, w = (int(v) for v in self.image_size)
        if h < 2 or w < 2:
            raise ValueError(f"tokens.image_size must be at least 2x2, got {self.image_size}")
        self.image_size = (h, w)
        if self.tiles is not None:
            self.tiles = tuple(tuple(int(v) for v in t) for t in self.tiles)
        if self.tile_index is not None and self.tile_index.shape != (self.g.shape[1],):
            raise ValueError(f"tokens.tile_index must be (L,) = ({self.g.shape[1]},), got {tuple(self.tile_index.shape)}")

    def __len__(self) -> int:
        return self.g.shape[1]

    @property
    def tile_boxes(self) -> tuple[Box, ...]:
        h, w = self.image_size
        return self.tiles if self.tiles is not None else ((0, 0, w - 1, h - 1),)

    @property
    def tile_ids(self) -> torch.Tensor:
        if self.tile_index is not None:
            return self.tile_index.to(self.g.device)
        return torch.zeros(len(self), dtype=torch.long, device=self.g.device)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the tile grid."""
        return grid_shape(self.tile_boxes)

    def image_g(self, g: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, 5) Gaussians in whole-image coordinates (``gpstoken_core.tiling.tile_to_image``)."""
        g = self.g if g is None else g
        if len(self.tile_boxes) == 1:
            return g
        boxes = torch.tensor(self.tile_boxes, dtype=g.dtype, device=g.device)[self.tile_ids]  # (L, 4)
        return tile_to_image(g, boxes, self.image_size, torch.stack)

    def keep(self, index: torch.Tensor | list[int]) -> Tokens:
        """Tokens with only the given token indices (or boolean mask), in that order."""
        index = torch.as_tensor(index, device=self.g.device)
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        return replace(
            self,
            g=self.g[:, index],
            f=self.f[:, index],
            g_init=None if self.g_init is None else self.g_init[:, index],
            tile_index=None if self.tile_index is None else self.tile_index.to(index.device)[index],
        )

    def to(self, device: torch.device | str) -> Tokens:
        return replace(
            self,
            g=self.g.to(device),
            f=self.f.to(device),
            g_init=None if self.g_init is None else self.g_init.to(device),
            tile_index=None if self.tile_index is None else self.tile_index.to(device),
        )
