"""The official ``DecoderNP`` forward written as plain functions over an official-layout state dict
(``decoder.*`` keys, see official_layout.py), from shared/reference/official-gpstoken-facts.md section 3
and section 8 item 10 -- independently of gpstoken.decoder / gpstoken.layers.

With ``np_`` tiles per side every ``_NormalizeNP`` takes per-tile, per-group mean and (biased) std, lays
them out as an np x np grid, resizes that grid bicubically to the map and normalizes as
(x - mean) / (std + 1e-6); the mid attention runs on each tile alone; the final ``norm_out`` is called
without the tile count, so it uses the whole map's statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def normalize_np(x, weight, bias, groups, np_):
    """``_NormalizeNP`` over ``np_`` tiles per side (or an explicit (rows, cols) grid, for our
    non-square generalization)."""
    b, c, h, w = x.shape
    ny, nx = (np_, np_) if isinstance(np_, int) else np_
    th, tw = h // ny, w // nx
    mean = torch.empty(b, groups, ny, nx, dtype=x.dtype)
    std = torch.empty_like(mean)
    for i in range(ny):
        for j in range(nx):
            cell = x[:, :, i * th : (i + 1) * th, j * tw : (j + 1) * tw].reshape(b, groups, -1)
            m = cell.mean(dim=-1)
            mean[:, :, i, j] = m
            std[:, :, i, j] = ((cell - m[..., None]) ** 2).mean(dim=-1).sqrt()
    if (ny, nx) != (1, 1):
        mean = F.interpolate(mean, size=(h, w), mode="bicubic", align_corners=False)
        std = F.interpolate(std, size=(h, w), mode="bicubic", align_corners=False)
    per_channel = c // groups
    mean = mean.repeat_interleave(per_channel, dim=1)
    std = std.repeat_interleave(per_channel, dim=1)
    return (x - mean) / (std + EPS) * weight[None, :, None, None] + bias[None, :, None, None]


def _conv(sd, name, x):
    w = sd[f"{name}.weight"]
    return F.conv2d(x, w, sd[f"{name}.bias"], padding=w.shape[-1] // 2)


def _swish(x):
    return x * torch.sigmoid(x)


def resnet_block(sd, name, x, groups, np_):
    h = _conv(sd, f"{name}.conv1", _swish(normalize_np(x, sd[f"{name}.norm1.weight"], sd[f"{name}.norm1.bias"], groups, np_)))
    h = _conv(sd, f"{name}.conv2", _swish(normalize_np(h, sd[f"{name}.norm2.weight"], sd[f"{name}.norm2.bias"], groups, np_)))
    if f"{name}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{name}.nin_shortcut", x)
    return x + h


def attention_block(sd, name, x, groups):
    """Single-head attention over all positions of x, plain GroupNorm (eps 1e-6)."""
    b, c, h, w = x.shape
    n = F.group_norm(x, groups, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"], eps=EPS)
    q = _conv(sd, f"{name}.q", n).reshape(b, c, h * w)
    k = _conv(sd, f"{name}.k", n).reshape(b, c, h * w)
    v = _conv(sd, f"{name}.v", n).reshape(b, c, h * w)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c**-0.5, dim=-1)  # (B, query, key)
    out = torch.einsum("bcj,bij->bci", v, weights).reshape(b, c, h, w)
    return x + _conv(sd, f"{name}.proj_out", out)


def attention_per_tile(sd, name, x, groups, np_):
    out = torch.empty_like(x)
    th, tw = x.shape[2] // np_, x.shape[3] // np_
    for i in range(np_):
        for j in range(np_):
            rows, cols = slice(i * th, (i + 1) * th), slice(j * tw, (j + 1) * tw)
            out[:, :, rows, cols] = attention_block(sd, name, x[:, :, rows, cols].contiguous(), groups)
    return out


def decoder_np_forward(sd, feature_map, np_, levels, res_blocks, groups):
    """``DecoderNP.forward(z, _np=np_)``: (B, C_f, h, w) rendered map -> (B, 3, 4h, 4w) image."""
    sd = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    h = _conv(sd, "conv_in", feature_map)
    h = resnet_block(sd, "mid.block_1", h, groups, np_)
    if "mid.attn_1.q.weight" in sd:
        h = attention_per_tile(sd, "mid.attn_1", h, groups, np_)
    h = resnet_block(sd, "mid.block_2", h, groups, np_)
    for level in reversed(range(levels)):
        for j in range(res_blocks + 1):
            h = resnet_block(sd, f"up.{level}.block.{j}", h, groups, np_)
        if level != 0:
            h = _conv(sd, f"up.{level}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    h = normalize_np(h, sd["norm_out.weight"], sd["norm_out.bias"], groups, 1)  # called without _np
    return _conv(sd, "conv_out", _swish(h))
