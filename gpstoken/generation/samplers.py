"""Torch entry points of the samplers; the math is ``gpstoken_core.sampling`` (shared with the runtime).

``velocity(x, t)`` is any callable: x (B, L, C), t a 0-d tensor of x's dtype on x's device (a model
expands it to (B,)), returning the velocity (B, L, C). Sampling runs without autograd.
"""

from __future__ import annotations

import numpy as np
import torch

from gpstoken_core import sampling as core

from .models import SiT


def sample_ode(
    velocity,
    x: torch.Tensor,
    steps: int,
    method: str = "euler",
    t_start: float = 0.0,
    t_end: float = 1.0,
    progress=None,
) -> torch.Tensor:
    """Fixed-step ODE from t_start to t_end: ``steps`` integration steps, "euler" (1 call per step) or
    "heun" (2 calls per step, second order). ``progress()``, if given, runs after each step."""
    with torch.no_grad():
        return core.sample_ode(velocity, x, steps, method=method, t_start=t_start, t_end=t_end, progress=progress)


def noise_source(generator, device: torch.device):
    """draw(shape) -> float32 standard normal, from a torch.Generator, a numpy Generator, or (None) the
    global torch CPU RNG as the official sampler."""
    if generator is None:
        return lambda shape: torch.randn(shape, dtype=torch.float32)
    if isinstance(generator, torch.Generator):
        return lambda shape: torch.randn(shape, dtype=torch.float32, generator=generator, device=generator.device)
    if isinstance(generator, np.random.Generator):
        return lambda shape: core.normal_float32(generator, shape)
    if callable(generator):
        return generator
    raise TypeError(f"generator must be a torch.Generator, numpy Generator or None, got {type(generator).__name__}")


def sample_sde(
    velocity,
    x: torch.Tensor,
    steps: int = core.SDE_STEPS,
    generator=None,
    t_start: float = core.SDE_T_START,
    t_end: float = core.SDE_T_END,
    diffusion: str = "sbdm",
    last_step: str = "mean",
    progress=None,
) -> torch.Tensor:
    """Euler-Maruyama on the official grid (``steps`` points linspace(t_start, t_end)), then the last step.

    Per step one float32 standard normal of x's shape is drawn from ``generator`` (None: torch's global
    CPU RNG, as the official code) and cast to x's dtype; one velocity call per step (the official code
    calls the model twice, for drift and score, with the same result). ``progress()``, if given, runs
    after each of the ``steps`` steps.
    """
    with torch.no_grad():
        return core.sample_sde(
            velocity,
            x,
            noise_source(generator, x.device),
            steps=steps,
            t_start=t_start,
            t_end=t_end,
            diffusion=diffusion,
            last_step=last_step,
            progress=progress,
        )


def model_velocity(
    model: SiT,
    y: torch.Tensor,
    cond: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    guidance: tuple[float, float] = (0.0, 1.0),
):
    """velocity(x, t) of a SiT for labels y (B,). With cfg_scale != 1 the state has 2B rows
    [conditional; unconditional] and the null label and the same layout are used for the second half."""
    core.check_guidance(cfg_scale, *guidance)
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y, cond)
    y2 = torch.cat([y, torch.full_like(y, model.config.num_classes)])
    cond2 = None if cond is None else torch.cat([cond, cond])
    return lambda x, t: model.forward_with_cfg(x, t, y2, cond2, cfg_scale, guidance[0], guidance[1])
