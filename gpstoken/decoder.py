"""The GPSToken decoder: splat the tokens into a feature map (paper Eq. 2-3), then a CNN to pixels.

The CNN is the official ``DecoderNP``: conv_in, a mid block (residual, single-head attention,
residual), then levels from the lowest resolution up (res_blocks + 1 residual blocks each, nearest x2 +
conv between levels), then norm, swish, conv_out. Every norm except the attention's is a
``TiledGroupNorm``. The map is image size / upsample_factor (64x64 for a 256x256 tile).

On a merged map of several tiles every norm takes per-tile statistics except the final ``norm_out``,
which takes statistics of the whole map: the official ``DecoderNP.forward`` calls it without the tile
count, and released weights are tuned to that (per-tile statistics there change a 512x512 decode by up
to 0.11).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import TokenizerConfig
from .layers import Grid, MapAttention, ResBlock, TiledGroupNorm, Upsample, swish
from .splatting import splat


class DecoderStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, groups, tiled=True) for i in range(blocks)
        )
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, grid)
        return x if self.upsample is None else self.upsample(x)


class GaussianDecoder(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        dec = config.decoder
        self.support = config.support
        self.upsample_factor = dec.upsample_factor
        widths = [dec.channels * m for m in reversed(dec.channel_mult)]  # lowest resolution first
        self.conv_in = nn.Conv2d(config.feature_channels, widths[0], kernel_size=3, padding=1)
        self.mid_block1 = ResBlock(widths[0], widths[0], dec.groups, tiled=True)
        self.mid_attn = MapAttention(widths[0], dec.groups) if dec.mid_attention else None
        self.mid_block2 = ResBlock(widths[0], widths[0], dec.groups, tiled=True)
        self.stages = nn.ModuleList()
        for i, width in enumerate(widths):
            previous = widths[max(i - 1, 0)]
            self.stages.append(DecoderStage(previous, width, dec.res_blocks + 1, dec.groups, upsample=i < len(widths) - 1))
        self.norm_out = TiledGroupNorm(widths[-1], dec.groups)
        self.conv_out = nn.Conv2d(widths[-1], 3, kernel_size=3, padding=1)

    def map_size(self, height: int, width: int) -> tuple[int, int]:
        """Feature map size for an image; sides that don't divide are rounded up (the output is resized)."""
        f = self.upsample_factor
        return max(2, -(-height // f)), max(2, -(-width // f))

    def render(self, g: torch.Tensor, f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, C, h, w) feature map of tokens g (B, L, 5), f (B, L, C)."""
        return splat(g, f, size, self.support)

    def forward(self, feature_map: torch.Tensor, grid: Grid = (1, 1)) -> torch.Tensor:
        """(B, C, h, w) map -> (B, 3, h * f, w * f) image, roughly in [-1, 1] (not clamped)."""
        h = self.conv_in(feature_map)
        h = self.mid_block1(h, grid)
        if self.mid_attn is not None:
            h = self.mid_attn(h, grid)
        h = self.mid_block2(h, grid)
        for stage in self.stages:
            h = stage(h, grid)
        return self.conv_out(swish(self.norm_out(h)))  # whole-map statistics, as the official code
