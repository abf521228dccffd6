"""Training side of the Linear path (SiT): x_t = t x1 + (1 - t) x0, velocity target x1 - x0, t ~ U[0, 1].

``velocity_loss`` is the generators' training objective (label dropout happens inside the model in
training mode); ``channel_stats`` computes the per-channel normalization a config stores;
``texture_targets`` builds the texture model's (dg, f) from encoded tokens.
"""

from __future__ import annotations

import torch

from .models import SiT


def linear_path(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target velocity) for noise x0, data x1 (B, L, C) and t (B,)."""
    tt = t.reshape(-1, *([1] * (x1.ndim - 1))).to(x1)
    return tt * x1 + (1 - tt) * x0, x1 - x0


def velocity_loss(
    model: SiT,
    x1: torch.Tensor,
    y: torch.Tensor,
    cond: torch.Tensor | None = None,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    cond_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared velocity error on normalized data x1 (B, L, C) (``model.normalize(tokens)``).

    ``cond_noise``: std of Gaussian noise added to the layout condition, in the condition's normalized
    units (the paper adds 0.5 to keep the texture model from trusting the layout too much).
    """
    b = x1.shape[0]
    if t is None:
        t = torch.rand(b, generator=generator, device=x1.device)
    if noise is None:
        noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    if cond is not None and cond_noise > 0:
        jitter = torch.randn(cond.shape, generator=generator, device=cond.device, dtype=cond.dtype)
        cond = cond + cond_noise * jitter * model.cond_std.to(cond)
    x_t, target = linear_path(noise, x1, t)
    v = model(x_t, t, y, cond)
    return ((v.float() - target.float()) ** 2).mean()


def channel_stats(tokens: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) over every other axis of tokens (..., C), accumulated in float64."""
    x = tokens.detach().reshape(-1, tokens.shape[-1]).double()
    if x.shape[0] < 2:
        raise ValueError("channel_stats needs at least two token vectors")
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel is left unscaled
    return tuple(mean.tolist()), tuple(std.tolist())


def texture_targets(g_init: torch.Tensor, g: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """(B, L, 5 + C) texture-model data: (g - g_init, f)."""
    return torch.cat([g - g_init, f], dim=-1)
