"""Wide 3x3 convolutions exported as Winograd F(4x4, 3x3), for ONNX Runtime on CPUs (opt-in).

Winograd's minimal filtering (Lavin & Gray 2016, points 0, +-1, +-2, inf) computes each 4x4 output tile
of a 3x3 convolution from the 6x6 input tile around it as A^T [(G g G^T) * (B^T d B)] A: 36 multiplies
per tile and channel pair instead of 144. In ONNX: the input transform is a 6x6 stride-4 convolution of
every channel with the 36 fixed B^T x B^T kernels, the multiplies are 36 batched matrix products over
the channels (MLAS's GEMM), the output transform is one matrix product with A^T x A^T, and the 4x4 tiles
are interleaved back into the map. The transforms move ~(36/16) x the map through memory, so the gain
grows with the channel count (``benchmarks/winograd.py``: 1.3x at 128 channels, 2x at 512 on this
project's 2-core AVX2 VM against ONNX Runtime's own convolution).

Float32 error: ~1e-5 relative per convolution against float64 (direct: ~3e-7), from the transforms'
coefficients (up to 8 in A^T, 5 in B^T). Not for TensorRT engines, which choose their own convolution
algorithms (Winograd among them), nor for float16 or int8 graphs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpstoken.layers import Upsample

MIN_CHANNELS = 128  # in and out; below, the transforms cost about what they save here

# F(4x4, 3x3): data transform B^T (6x6), filter transform G (6x3), output transform A^T (4x6).
_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
TILE = 4  # output tile side
WINDOW = 6  # input tile side (TILE + 3 - 1)


def winograd_matrices(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(m, dtype=dtype) for m in (_BT, _G, _AT))


class WinogradConv3x3(nn.Module):
    """Same output as ``conv`` (3x3, stride 1, padding 1, no groups/dilation) by Winograd F(4x4, 3x3);
    any map size (the tile grid is padded up to a multiple of 4 and the output cropped)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError(f"Winograd F(4x4, 3x3) needs a plain 3x3 convolution with padding 1, got {conv}")
        bt, g, at = winograd_matrices()
        weight = conv.weight.detach().to(torch.float64)
        dtype = conv.weight.dtype
        # (36, out, in): the transformed filters, one matrix per position of the 6x6 tile
        self.register_buffer("filters", torch.einsum("ur,oirs,vs->uvoi", g, weight, g).reshape(WINDOW * WINDOW, *weight.shape[:2]).to(dtype))
        # (36, 1, 6, 6): B^T d B as 36 convolution kernels applied to every channel alone
        self.register_buffer("input_transform", torch.einsum("ur,vs->uvrs", bt, bt).reshape(WINDOW * WINDOW, 1, WINDOW, WINDOW).to(dtype))
        # (16, 36): A^T M A flattened
        self.register_buffer("output_transform", torch.einsum("iu,jv->ijuv", at, at).reshape(TILE * TILE, WINDOW * WINDOW).to(dtype))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        h, w = int(x.shape[2]), int(x.shape[3])  # static in an export: the tile grid's padding becomes constant
        rows, cols = -(-h // TILE), -(-w // TILE)
        # every channel alone through the input transform: (n*c, 36, rows, cols)
        tiles = F.conv2d(F.pad(x.reshape(n * c, 1, h, w), (1, TILE * cols + 1 - w, 1, TILE * rows + 1 - h)), self.input_transform, stride=TILE)
        tiles = tiles.reshape(n, c, WINDOW * WINDOW, rows * cols).transpose(1, 2)  # (n, 36, c, tiles)
        products = torch.matmul(self.filters, tiles)  # (n, 36, out, tiles)
        out_channels = products.shape[2]
        outputs = torch.matmul(self.output_transform, products.reshape(n, WINDOW * WINDOW, -1))  # (n, 16, out*tiles)
        outputs = outputs.reshape(n, TILE, TILE, out_channels, rows, cols)
        # Interleave the tiles by concatenating along new last axes (contiguous copies; a 6-D transpose
        # was slower on ONNX Runtime).
        lines = [torch.stack([outputs[:, i, j] for j in range(TILE)], dim=-1).reshape(n, out_channels, rows, TILE * cols) for i in range(TILE)]
        y = torch.stack(lines, dim=3).reshape(n, out_channels, TILE * rows, TILE * cols)
        if TILE * rows != h or TILE * cols != w:
            y = y[:, :, :h, :w]
        return y if self.bias is None else y + self.bias


def wide_convolutions(model: nn.Module, min_channels: int = MIN_CHANNELS) -> list[tuple[nn.Module, str, nn.Conv2d]]:
    """(parent, attribute, conv) of every plain 3x3 convolution of ``model`` with at least ``min_channels``
    in and out, except those of ``Upsample`` blocks (exported in sub-pixel form instead)."""
    found = []
    for parent in model.modules():
        if isinstance(parent, Upsample):
            continue
        for name, child in parent.named_children():
            if (isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3) and child.stride == (1, 1) and child.padding == (1, 1)
                    and child.dilation == (1, 1) and child.groups == 1 and min(child.in_channels, child.out_channels) >= min_channels):
                found.append((parent, name, child))
    return found


@contextmanager
def winograd_convolutions(model: nn.Module, min_channels: int = MIN_CHANNELS):
    """Within the block, the wide 3x3 convolutions of ``model`` run as ``WinogradConv3x3`` (for tracing an
    export with static map sizes: the tile grid's padding is fixed at trace time); the originals are put
    back afterwards, also on error."""
    swapped = wide_convolutions(model, min_channels)
    for parent, name, conv in swapped:
        setattr(parent, name, WinogradConv3x3(conv))
    try:
        yield model
    finally:
        for parent, name, conv in swapped:
            setattr(parent, name, conv)
