"""RoIAlign in plain torch (torchvision cannot be used with our torch build).

Semantics of ``torchvision.ops.roi_align``: each box is cut into ``size x size`` bins, every bin
averages bilinear samples on a regular grid of ``gy x gx`` points, and ``aligned=True`` shifts boxes by
-0.5 px so pixel centres sit at integers (Detectron2 / ONNX ``half_pixel``). With the adaptive
``sampling_ratio=-1`` the grid is ``ceil(bin size)`` per side, so the number of samples differs per box;
boxes are grouped by their grid and each group is one ``grid_sample`` call. Because partition regions
tile the image, the total sample count is about one per pixel whatever the token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor,
    output_size: int,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> torch.Tensor:
    """Pool each box of ``features`` to ``output_size x output_size``.

    Args:
        features: (B, C, H, W).
        boxes: (B, N, 4) ``(x0, y0, x1, y1)`` in pixel units (pixel i has centre i), float.
        sampling_ratio: samples per bin side; <= 0 means adaptive ``ceil(bin size)``.

    Returns:
        (B, N, C, output_size, output_size).
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (B, C, H, W), got shape {tuple(features.shape)}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"boxes must be (B, N, 4) with B = {features.shape[0]}, got shape {tuple(boxes.shape)}")
    b, c, h, w = features.shape
    n, s = boxes.shape[1], int(output_size)
    boxes = boxes.to(features.dtype)
    offset = 0.5 if aligned else 0.0
    start = boxes[..., :2] - offset  # (B, N, 2) as (x, y)
    extent = boxes[..., 2:] - boxes[..., :2]
    if not aligned:  # the legacy mode forces boxes to be at least 1 px
        extent = extent.clamp(min=1.0)
    bin_size = extent / s  # (B, N, 2)
    if sampling_ratio > 0:
        grid_counts = torch.full_like(bin_size, sampling_ratio, dtype=torch.long)
    else:
        grid_counts = torch.ceil(bin_size).long().clamp(min=0)  # 0 for an empty or inverted box: output 0

    out = features.new_zeros(b, n, c, s, s)
    if n == 0:
        return out
    pairs = torch.unique(grid_counts.reshape(-1, 2), dim=0).tolist()
    for gx, gy in pairs:
        if gx == 0 or gy == 0:
            continue  # no samples: torchvision divides an empty sum by 1
        member = (grid_counts[..., 0] == gx) & (grid_counts[..., 1] == gy)  # (B, N)
        out[member] = _pool_group(features, start, bin_size, member, s, gx, gy)
    return out


def _pool_group(features, start, bin_size, member, s, gx, gy):
    """Pool the boxes in ``member`` (all with a gx x gy sample grid), batched per image."""
    b, c, h, w = features.shape
    per_image = member.sum(dim=1)  # (B,)
    slots = int(per_image.max())
    rank = member.long().cumsum(dim=1) - 1  # slot of each member box in its image
    bi, ni = member.nonzero(as_tuple=True)
    si = rank[bi, ni]

    # Sample offsets inside one box, in units of bins: bin p, sample k -> p + (k + 0.5) / g.
    dtype, device = features.dtype, features.device
    ox = (torch.arange(s, dtype=dtype, device=device)[:, None] + (torch.arange(gx, dtype=dtype, device=device) + 0.5) / gx).reshape(-1)
    oy = (torch.arange(s, dtype=dtype, device=device)[:, None] + (torch.arange(gy, dtype=dtype, device=device) + 0.5) / gy).reshape(-1)
    xs = start[bi, ni, 0, None] + ox[None] * bin_size[bi, ni, 0, None]  # (M, s*gx) pixel x
    ys = start[bi, ni, 1, None] + oy[None] * bin_size[bi, ni, 1, None]  # (M, s*gy) pixel y

    # torchvision: samples beyond one pixel outside the map are 0, the rest are clamped to the border,
    # which is what grid_sample's border padding does with align_corners=True.
    valid = ((ys >= -1) & (ys <= h))[:, :, None] & ((xs >= -1) & (xs <= w))[:, None, :]  # (M, s*gy, s*gx)
    gxn = xs * (2.0 / max(w - 1, 1)) - 1
    gyn = ys * (2.0 / max(h - 1, 1)) - 1
    grid = torch.stack(torch.broadcast_tensors(gxn[:, None, :], gyn[:, :, None]), dim=-1)  # (M, s*gy, s*gx, 2)

    padded = features.new_zeros(b, slots, s * gy, s * gx, 2)
    padded[bi, si] = grid
    sampled = F.grid_sample(
        features, padded.reshape(b, slots * s * gy, s * gx, 2), mode="bilinear", padding_mode="border", align_corners=True
    )  # (B, C, slots * s*gy, s*gx)
    sampled = sampled.reshape(b, c, slots, s * gy, s * gx).permute(0, 2, 1, 3, 4)[bi, si]  # (M, C, s*gy, s*gx)
    sampled = sampled * valid[:, None].to(dtype)
    return sampled.reshape(-1, c, s, gy, s, gx).mean(dim=(3, 5))  # (M, C, s, s)


class RoiAlignForExport(torch.autograd.Function):
    """``roi_align`` (aligned, adaptive sampling) that the TorchScript ONNX exporter writes as the standard
    ``RoiAlign`` node (opset >= 16, ``half_pixel``, ``sampling_ratio`` 0 = adaptive, average pooling)."""

    @staticmethod
    def forward(ctx, features, boxes, output_size: int, sampling_ratio: int):
        return roi_align(features, boxes, output_size, sampling_ratio, aligned=True)

    @staticmethod
    def symbolic(g, features, boxes, output_size: int, sampling_ratio: int):
        shape = g.op("Shape", boxes)
        zero, one, two = (g.op("Constant", value_t=torch.tensor([v])) for v in (0, 1, 2))
        batch = g.op("Slice", shape, zero, one)
        count = g.op("Slice", shape, one, two)
        rois = g.op("Reshape", boxes, g.op("Constant", value_t=torch.tensor([-1, 4])))
        # batch index of every box: range(B) repeated L times
        index = g.op("Range", g.op("Constant", value_t=torch.tensor(0)), g.op("Squeeze", batch), g.op("Constant", value_t=torch.tensor(1)))
        index = g.op("Expand", g.op("Unsqueeze", index, one), g.op("Concat", batch, count, axis_i=0))
        index = g.op("Reshape", index, g.op("Constant", value_t=torch.tensor([-1])))
        pooled = g.op(
            "RoiAlign", features, rois, index,
            coordinate_transformation_mode_s="half_pixel", mode_s="avg", output_height_i=output_size,
            output_width_i=output_size, sampling_ratio_i=max(sampling_ratio, 0), spatial_scale_f=1.0,
        )  # fmt: skip
        # (B*L, C, s, s) -> (B, L, C, s, s)
        tail = g.op("Slice", g.op("Shape", pooled), one, g.op("Constant", value_t=torch.tensor([4])))
        return g.op("Reshape", pooled, g.op("Concat", batch, count, tail, axis_i=0))
