"""The decoder's up-sampling (nearest x2, then a 3x3 convolution) exported in sub-pixel form.

Every pixel of the nearest-up-sampled map repeats a low-resolution pixel, so each output pixel of the
3x3 convolution sees only a 2x2 window of the low-resolution map, and which window and which summed
weights depend only on its phase (row and column parity). The export therefore runs four 2x2
convolutions on the low-resolution map (16 multiply-adds per low-resolution pixel and channel pair
instead of 36: 2.25x fewer FLOPs) and interleaves their outputs. Same function, summed in a different
order: outputs differ by float rounding only.

Row phase 0 (output row 2i) covers up-sampled rows 2i-1, 2i, 2i+1 = low-resolution rows i-1, i, i: the
kernel's row 0 lands on row i-1, rows 1 + 2 on row i. Row phase 1 (2i+1) covers i, i, i+1: rows 0 + 1 on
row i, row 2 on row i+1. Columns likewise. Zero padding of the up-sampled map at its borders is zero
padding of the low-resolution map on the side each phase reaches past (phase 0: before, phase 1: after).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpstoken.layers import Upsample

# PHASE_TAPS[p][k, t]: 1 where tap t (0..2) of the 3x3 kernel lands on low-resolution offset k (0..1) for phase p.
PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) -> (2, 2, O, I, 2, 2): the 2x2 kernel of each (row phase, column phase)."""
    taps = PHASE_TAPS.to(weight)
    return torch.einsum("aky,oiyx,blx->aboikl", taps, weight, taps)


def phase_padding(row_phase: int, col_phase: int) -> tuple[int, int, int, int]:
    """F.pad's (left, right, top, bottom) for one phase's 2x2 convolution, so its output keeps the input's size."""
    return (1 - col_phase, col_phase, 1 - row_phase, row_phase)


class SubpixelUpsample(nn.Module):
    """Same output as ``Upsample`` (nearest x2 then conv3x3) from four 2x2 convolutions at low resolution."""

    def __init__(self, upsample: Upsample):
        super().__init__()
        conv = upsample.conv
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError(f"sub-pixel form needs a plain 3x3 convolution with padding 1, got {conv}")
        self.register_buffer("kernels", phase_kernels(conv.weight.detach()))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        rows = []
        for a in (0, 1):
            phases = [F.conv2d(F.pad(x, phase_padding(a, b)), self.kernels[a, b], self.bias) for b in (0, 1)]
            # Concatenating along new last axes keeps every copy a contiguous run (a DepthToSpace-style
            # transpose instead was slower than the convolutions it saves on ONNX Runtime).
            rows.append(torch.stack(phases, dim=-1).reshape(n, -1, h, 2 * w))  # columns 2j + b
        return torch.stack(rows, dim=3).reshape(n, -1, 2 * h, 2 * w)  # rows 2i + a


@contextmanager
def subpixel_upsampling(model: nn.Module):
    """Within the block, every ``Upsample`` of ``model`` is replaced by its ``SubpixelUpsample``
    (for tracing the export); the originals are put back afterwards, also on error."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Upsample):
                swapped.append((parent, name, child))
                setattr(parent, name, SubpixelUpsample(child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
