"""Building blocks shared by the encoder stem and the decoder (LDM / taming-transformers style).

``grid`` arguments are the (rows, cols) of 256x256 tiles the map covers. A single-tile map is the
training case; a larger image decoded as one map normalizes with per-tile statistics that are
interpolated bicubically over the map (the official "resized GroupNorm"), so tiles neither shift
colour against each other nor show seams.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

GN_EPS = 1e-6
Grid = tuple[int, int]


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class TiledGroupNorm(nn.GroupNorm):
    """GroupNorm as (x - mean) / (std + eps) (the official form: eps on the std, not the variance),
    with statistics taken per tile of ``grid`` and bicubically interpolated over the map."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__(groups, channels, eps=GN_EPS, affine=True)

    def forward(self, x: torch.Tensor, grid: Grid = (1, 1)) -> torch.Tensor:
        b, c, h, w = x.shape
        g = self.num_groups
        xg = x.reshape(b, g, c // g, h, w)
        if tuple(grid) == (1, 1):
            std, mean = torch.std_mean(xg, dim=(2, 3, 4), keepdim=True, unbiased=False)
        else:
            mean, std = self._tile_stats(xg, grid)
        out = ((xg - mean) / (std + self.eps)).reshape(b, c, h, w)
        return out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    @staticmethod
    def _tile_stats(xg: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        b, g, cg, h, w = xg.shape
        ny, nx = grid
        if h % ny == 0 and w % nx == 0:
            cells = xg.reshape(b, g, cg, ny, h // ny, nx, w // nx)
            std, mean = torch.std_mean(cells, dim=(2, 4, 6), unbiased=False)  # (B, G, ny, nx)
        else:  # uneven tiles: adaptive pooling bins
            flat = xg.reshape(b, g * cg, h, w)
            m1 = F.adaptive_avg_pool2d(flat, (ny, nx)).reshape(b, g, cg, ny, nx).mean(dim=2)
            m2 = F.adaptive_avg_pool2d(flat * flat, (ny, nx)).reshape(b, g, cg, ny, nx).mean(dim=2)
            mean, std = m1, (m2 - m1 * m1).clamp(min=0).sqrt()
        mean = F.interpolate(mean, size=(h, w), mode="bicubic", align_corners=False)
        std = F.interpolate(std, size=(h, w), mode="bicubic", align_corners=False)
        return mean[:, :, None], std[:, :, None]


class ResBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a (1x1 when channels change) shortcut.

    ``tiled=False`` uses torch's GroupNorm (the official encoder stem); ``tiled=True`` the decoder's
    TiledGroupNorm.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, tiled: bool = False):
        super().__init__()
        self.tiled = tiled
        norm = (lambda ch: TiledGroupNorm(ch, groups)) if tiled else (lambda ch: nn.GroupNorm(groups, ch, eps=GN_EPS))
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def _norm(self, norm: nn.Module, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return norm(x, grid) if self.tiled else norm(x)

    def forward(self, x: torch.Tensor, grid: Grid = (1, 1)) -> torch.Tensor:
        h = self.conv1(swish(self._norm(self.norm1, x, grid)))
        h = self.conv2(swish(self._norm(self.norm2, h, grid)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class MapAttention(nn.Module):
    """Single-head self-attention over the positions of a map (1x1-conv q/k/v/out), run per tile."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=GN_EPS)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, grid: Grid = (1, 1)) -> torch.Tensor:
        b, c, h, w = x.shape
        ny, nx = grid
        if (ny, nx) != (1, 1) and h % ny == 0 and w % nx == 0:
            tiles = x.reshape(b, c, ny, h // ny, nx, w // nx).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, h // ny, w // nx)
            out = self._attend(tiles)
            return out.reshape(b, ny, nx, c, h // ny, w // nx).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return self._attend(x)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as the official block
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Upsample(nn.Module):
    """Nearest x2 then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
