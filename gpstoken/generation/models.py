"""SiT over Gaussian tokens: the layout, texture and one-stage generators of GPSToken.

One readable file, as DiT/SiT: embedders, the adaLN-Zero block, the model, CFG, files. Tokens are the
sequence (patch size 1), states are tokens-first (B, L, C). Module names follow the official
``SiT-XL/2-gs`` so its weights map one to one (``gpstoken.generation.convert``); only ``x_embedder`` is a
Linear where the official model has a 1x1 conv.

The model predicts the Linear-path velocity of *normalized* tokens ((x - mean) / std with the config's
statistics); ``normalize`` / ``denormalize`` convert. The layout condition is raw g_init unless the config
carries condition statistics (the official model reads raw g_init).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpstoken_core import sampling as core

from ..modeling import PretrainedModel
from .config import SiTConfig, preset


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                     Embedders: time, class label, layout                      #
#################################################################################


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) t -> (B, dim) [cos | sin] features; t in [0, 1] goes in directly (SiT, not DiT's 0..999)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null class (= num_classes), for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout > 0:
            # Label dropout teaches the null row the unconditional velocity.
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)  # (B, D)


def layout_embedder(cond_channels: int, hidden: int) -> nn.Sequential:
    """g_init (B, L, 5) -> (B, L, D): Linear, SiLU, Linear (the official cond_embedder)."""
    return nn.Sequential(nn.Linear(cond_channels, hidden), nn.SiLU(), nn.Linear(hidden, hidden))


#################################################################################
#                                 Core SiT block                                #
#################################################################################


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, d/H)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, L, d/H)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Pre-LN attention + MLP, each shifted, scaled and gated by the (t, y) embedding (adaLN-Zero)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, L, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, L, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, L, out)


#################################################################################
#                                   The model                                   #
#################################################################################


class SiT(PretrainedModel):
    """Scalable interpolant transformer over L tokens of C channels.

    forward(x (B, L, C), t (B,) in [0, 1] (0 noise, 1 data), y (B,) int64, cond (B, L, 5) or None)
    returns the velocity (B, L, C). A float or 0-d t is broadcast to the batch.
    """

    config_class = SiTConfig
    config_metadata_key = "gpstoken_generator_config"  # the key of every saved generator model
    kind = "generator"
    official_converter = "gpstoken convert-official-generator FILE --out DIR"

    def __init__(self, config: SiTConfig | str | None = None):
        super().__init__()
        if config is None or isinstance(config, str):
            config = preset(config or "SiT-XL/2-gs")
        self.config = cfg = config
        d = cfg.hidden
        self.x_embedder = nn.Linear(cfg.in_channels, d)  # patch size 1: one token -> one embedding
        self.t_embedder = TimestepEmbedder(d, cfg.frequency_dim)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout)
        # Learnable; with cond_mode "input" the layout embedding takes its place (unused, as official).
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))
        self.cond_embedder = layout_embedder(cfg.cond_channels, d) if cfg.cond_channels else None
        self.blocks = nn.ModuleList([SiTBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(d, cfg.out_channels)
        for name, values, size in (
            ("mean", cfg.mean, cfg.in_channels),
            ("std", cfg.std, cfg.in_channels),
            ("cond_mean", cfg.cond_mean, cfg.cond_channels),
            ("cond_std", cfg.cond_std, cfg.cond_channels),
        ):
            default = 1.0 if name.endswith("std") else 0.0
            data = torch.tensor(values, dtype=torch.float32) if values is not None else torch.full((size,), default)
            self.register_buffer(name, data, persistent=False)  # from the config, not the weights file
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Transformer linears: xavier, zero bias (DiT).
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # Token order carries the partition's coarse-to-fine order: start from 1D sin-cos positions.
        with torch.no_grad():
            self.pos_embed.copy_(sincos_1d(self.config.hidden, self.config.num_tokens)[None])
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero velocity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ----------------------------------------------------------------- normalization
    def normalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Model space from token space: (x - mean) / std per channel; x (..., C)."""
        return (tokens - self.mean.to(tokens)) / self.std.to(tokens)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x) + self.mean.to(x)

    def normalize_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return (cond - self.cond_mean.to(cond)) / self.cond_std.to(cond)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, t, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        b = x.shape[0]
        if x.ndim != 3 or tuple(x.shape[1:]) != (cfg.num_tokens, cfg.in_channels):
            raise ValueError(f"x must be (B, {cfg.num_tokens}, {cfg.in_channels}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t.reshape(b)
        if y.shape != (b,):
            raise ValueError(f"y must be (B,) = ({b},) class ids, got shape {tuple(y.shape)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) > cfg.num_classes):
            raise ValueError(f"class ids must be in [0, {cfg.num_classes}] ({cfg.num_classes} = null), got {y.tolist()}")

        h = self.x_embedder(x)  # (B, L, D)
        e = None
        if cond is not None:
            if self.cond_embedder is None:
                raise ValueError(f"the {cfg.name} model takes no layout condition")
            if tuple(cond.shape) != (b, cfg.num_tokens, cfg.cond_channels):
                raise ValueError(f"cond must be (B, L, 5) = {(b, cfg.num_tokens, cfg.cond_channels)}, got {tuple(cond.shape)}")
            e = self.cond_embedder(self.normalize_cond(cond.to(h.dtype)))  # (B, L, D)
        if e is not None and cfg.cond_mode == "input":
            h = h + e  # official: the layout replaces the positional embedding
            e = None
        else:
            h = h + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
        for block in self.blocks:
            h = block(h if e is None else h + e, c)  # (B, L, D); paper: layout before every block
        out = self.final_layer(h, c)  # (B, L, out_channels)
        return out[..., : cfg.in_channels]  # learn_sigma's extra channels are never used

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t,
        y: torch.Tensor,
        cond: torch.Tensor | None = None,
        cfg_scale: float = 1.0,
        guidance_low: float = 0.0,
        guidance_high: float = 1.0,
    ) -> torch.Tensor:
        """Guided velocity of 2B rows [conditional; unconditional] (labels [y; null], cond [g; g]).

        Inside the interval (t units, inclusive, tested on the first row's t) the conditional half is run with
        both labels and u + s (c - u) is returned in both halves; outside, a plain forward of all rows.
        """
        core.check_guidance(cfg_scale, guidance_low, guidance_high)
        t0 = float(torch.as_tensor(t).reshape(-1)[0])
        return core.cfg_velocity(
            lambda rows: self.forward(rows, t, y, cond), x, t0, float(cfg_scale), guidance_low, guidance_high
        )

    # ----------------------------------------------------------------- files
    # save_pretrained / from_pretrained / load_weights: gpstoken.modeling.PretrainedModel
    @classmethod
    def looks_official(cls, tensors: dict) -> bool:
        return "x_embedder.proj.weight" in tensors or any(k.startswith("ema_model.") for k in tensors)


#################################################################################
#                                    Helpers                                    #
#################################################################################


def sincos_1d(dim: int, length: int) -> torch.Tensor:
    """(length, dim) sin-cos embedding of positions 0..length-1 (MAE's 1D form, [sin | cos])."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]  # (L, dim/2)
    emb = torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros(length, 1, dtype=emb.dtype)], dim=1)
    return emb.float()
