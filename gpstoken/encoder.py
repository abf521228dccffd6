"""The GPSToken encoder: refines the partition's Gaussians and extracts each token's texture feature.

image --stem (conv + residual blocks, full resolution)--> feature map
feature map --RoIAlign over each token's region--> (L, roi_size^2) samples per channel
g_init --MLP--> queries; each attention block first adds a learned pooling of the token's region
samples, then self-attention and an MLP (pre-norm). Two heads give the refinement and f.

The refinement follows the official model (not the paper's plain g_init + dg): sigmas move in logit
space, rho and the means in logit((1 + v) / 2) space, so the output stays in (0, 1) and (-1, 1), and the
zero-initialized head makes g == g_init at the start of training.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TokenizerConfig
from .layers import ResBlock
from .roi_align import RoiAlignForExport, roi_align

GAUSSIAN_PARAMS = 5  # sigma_x, sigma_y, rho, mu_x, mu_y


class ImageStem(nn.Module):
    """Conv3x3 to ``channels`` then residual blocks, all at the input resolution."""

    def __init__(self, channels: int, blocks: int, groups: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(channels, channels, groups) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h)
        return h


class SelfAttention(nn.Module):
    """Multi-head self-attention with a packed qkv projection (same layout as nn.MultiheadAttention)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TokenBlock(nn.Module):
    """Add the token's pooled region features, then pre-norm self-attention and MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, roi_cells: int):
        super().__init__()
        self.roi_pool = nn.Linear(roi_cells, 1)  # learned weights over the RoI grid
        self.norm_attn = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, tokens: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        # regions: (B, L, width, roi_cells)
        tokens = tokens + self.roi_pool(regions).squeeze(-1)
        tokens = tokens + self.attn(self.norm_attn(tokens))
        return tokens + self.mlp(self.norm_mlp(tokens))


def refine(g_init: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Official refinement: sigma = sigmoid(logit(sigma0) + d); v = 2 sigmoid(logit((1 + v0) / 2) + d) - 1."""
    eps = 1e-6  # keeps logit finite for user-supplied g_init on the boundary
    sigma = torch.sigmoid(torch.logit(g_init[..., :2], eps=eps) + delta[..., :2])
    rest = 2 * torch.sigmoid(torch.logit((1 + g_init[..., 2:5]) / 2, eps=eps) + delta[..., 2:5]) - 1
    # In float32 the sigmoids saturate to exactly 0 or 1 for large |logit|; a Gaussian needs sigma > 0 and
    # |rho| < 1, so those two are kept inside by a hair (no effect on values that are not saturated).
    sigma = sigma.clamp(min=1e-6)
    rho = rest[..., :1].clamp(-1 + 1e-6, 1 - 1e-6)
    return torch.cat([sigma, rho, rest[..., 1:]], dim=-1)


class GaussianEncoder(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        enc = config.encoder
        self.roi_size = enc.roi_size
        self.roi_sampling_ratio = enc.roi_sampling_ratio
        self.stem = ImageStem(enc.stem_channels, enc.stem_blocks, config.decoder.groups)
        self.roi_proj = nn.Conv2d(enc.stem_channels, enc.width, kernel_size=1)
        self.query_base = nn.Parameter(torch.randn(1, enc.width))  # official nn.Embedding(1, width)
        self.query_mlp = nn.Sequential(nn.Linear(GAUSSIAN_PARAMS, enc.width), nn.GELU(), nn.Linear(enc.width, enc.width))
        self.blocks = nn.ModuleList(
            TokenBlock(enc.width, enc.heads, enc.mlp_ratio, enc.roi_size**2) for _ in range(enc.depth)
        )
        self.to_delta = nn.Linear(enc.width, GAUSSIAN_PARAMS)
        self.to_texture = nn.Linear(enc.width, config.feature_channels)
        nn.init.zeros_(self.to_delta.weight)
        nn.init.zeros_(self.to_delta.bias)

    def region_features(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B, L, width, roi_size^2): projected RoIAlign samples of each token's region."""
        b, n = boxes.shape[:2]
        features = self.stem(image)
        if torch.jit.is_tracing():  # ONNX export: one standard RoiAlign node
            pooled = RoiAlignForExport.apply(features, boxes, self.roi_size, self.roi_sampling_ratio)
        else:
            pooled = roi_align(features, boxes, self.roi_size, self.roi_sampling_ratio, aligned=True)
        projected = self.roi_proj(pooled.flatten(0, 1))  # (B*L, width, s, s)
        return projected.reshape(b, n, projected.shape[1], -1)

    def forward(self, image: torch.Tensor, g_init: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, 3, H, W) in [-1, 1]; g_init (B, L, 5); boxes (B, L, 4) inclusive pixels (x0, y0, x1, y1).

        Returns g (B, L, 5) and f (B, L, feature_channels).
        """
        regions = self.region_features(image, boxes)
        tokens = self.query_base + self.query_mlp(g_init)
        for block in self.blocks:
            tokens = block(tokens, regions)
        return refine(g_init, self.to_delta(tokens)), self.to_texture(tokens)
