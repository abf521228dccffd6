"""Fitting Gaussian tokens directly to one image through the differentiable splat.

This is no tokenizer (there is no encoder): it shows what the splat op and its gradients can do,
and is what ``gpstoken fit`` runs (``gpstoken demo`` runs the tokenizer instead).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from gpstoken_core.metrics import psnr
from gpstoken_core.official import SUPPORT

from .splatting import splat


@dataclass
class FitResult:
    gaussians_init: np.ndarray  # (L, 5) grid placement, sigma = cell width / 3 (official convention)
    gaussians: np.ndarray  # (L, 5) after optimization
    render_init: np.ndarray  # (H, W, 3) uint8: best colours for the initial grid (least squares)
    render: np.ndarray  # (H, W, 3) uint8 after optimization
    psnr_init: float
    psnr: float
    seconds: float


def grid_gaussians(per_side: int) -> torch.Tensor:
    """(per_side^2, 5) Gaussians on a regular grid, each with the official sigma = cell width / 3."""
    cell = 2.0 / per_side
    centers = -1 + cell * (torch.arange(per_side, dtype=torch.float64) + 0.5)
    my, mx = torch.meshgrid(centers, centers, indexing="ij")
    sigma = torch.full_like(mx, cell / 3)
    return torch.stack([sigma, sigma, torch.zeros_like(mx), mx, my], dim=-1).reshape(-1, 5)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def fit_gaussians(
    image: np.ndarray, tokens: int = 256, steps: int = 300, support: float = SUPPORT, progress: bool = True
) -> FitResult:
    """Fit ``tokens`` (rounded to a square number) RGB Gaussians to an HxWx3 uint8 image."""
    start = time.perf_counter()
    per_side = max(1, round(math.sqrt(tokens)))
    image = np.array(image, dtype=np.uint8)
    h, w = image.shape[:2]
    target = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
    g0 = grid_gaussians(per_side).float()  # (L, 5)
    L = g0.shape[0]
    # Least-squares colours for the fixed initial Gaussians: render each one alone, then solve.
    basis = splat(g0[None], torch.eye(L)[None], (h, w), support)[0].reshape(L, -1)  # (L, H*W)
    colors = torch.linalg.lstsq(basis.T, target.reshape(3, -1).T).solution  # (L, 3)
    render_init = splat(g0[None], colors[None], (h, w), support)[0]

    # Unconstrained parameters keep sigma > 0 and |rho| < 1 during optimization.
    log_sigma = g0[:, :2].log().clone().requires_grad_()
    atanh_rho = torch.zeros(L, requires_grad=True)
    mu = g0[:, 3:].clone().requires_grad_()
    feats = colors.clone().requires_grad_()
    opt = torch.optim.Adam(
        [{"params": [log_sigma, atanh_rho], "lr": 0.02}, {"params": [mu], "lr": 0.002}, {"params": [feats], "lr": 0.02}]
    )

    def gaussians() -> torch.Tensor:
        return torch.cat([log_sigma.exp(), torch.tanh(atanh_rho)[:, None] * 0.99, mu], dim=1)

    bar = tqdm(range(steps), desc="fitting Gaussians", disable=not progress, unit="step", mininterval=0.5)
    for step in bar:
        loss = (splat(gaussians()[None], feats[None], (h, w), support)[0] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(psnr=f"{10 * math.log10(4 / max(loss.item(), 1e-12)):.2f} dB", refresh=False)
    with torch.no_grad():
        g = gaussians()
        render = splat(g[None], feats[None], (h, w), support)[0]
    r0, r1 = _to_uint8(render_init), _to_uint8(render)
    return FitResult(
        gaussians_init=g0.numpy(),
        gaussians=g.numpy(),
        render_init=r0,
        render=r1,
        psnr_init=psnr(r0, image),
        psnr=psnr(r1, image),
        seconds=time.perf_counter() - start,
    )
