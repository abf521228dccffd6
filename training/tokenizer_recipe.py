"""The tokenizer's training recipe around its losses: which step trains what, warm-up, the perceptual
nets, one generator or discriminator step, the EMA's step count and the picture that is logged.

After ``disc_start`` the official code alternates steps: odd steps train the PatchGAN, even ones the
tokenizer. ``recipe`` official adds LPIPS + the Inception loss from step 0, paper only from disc_start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

import gpstoken
from gpstoken.config import preset
from training.distributed import all_reduce_mean
from training.losses import adaptive_weight, hinge_d_loss
from training.progress import log

if TYPE_CHECKING:
    from training.train_tokenizer import TrainConfig


def build_model(model: str) -> gpstoken.GPSTokenizer:
    """A preset name (new weights) or a model folder (fine-tuning)."""
    if Path(model).is_dir():
        return gpstoken.GPSTokenizer.from_pretrained(model)
    return gpstoken.GPSTokenizer(preset(model))


def perceptual_nets(cfg: TrainConfig, device: torch.device):
    """(LPIPS, Inception features) from local weights; None for a term without weights (and a note)."""
    lpips = inception = None
    if cfg.lpips_weights:
        from gpstoken.perceptual import LPIPS

        lpips = LPIPS.from_weights(cfg.lpips_weights).to(device)
    if cfg.inception_weights:
        from gpstoken.perceptual import InceptionFeatures

        inception = InceptionFeatures.from_weights(cfg.inception_weights).to(device)
    off = [n for n, m in (("LPIPS", lpips), ("Inception-feature", inception)) if m is None]
    if off:
        log.info(f"note: {' and '.join(off)} loss off (no local weights given: --lpips-weights / --inception-weights)")
    return lpips, inception


def lr_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else cfg.lr


def discriminator_turn(cfg: TrainConfig, step: int) -> bool:
    return step >= cfg.disc_start and step % 2 == 1


def autoencoder_steps(cfg: TrainConfig, step: int) -> int:
    """Autoencoder updates before ``step``: all steps until disc_start, then every other one. The EMA decay
    ramp counts these, as the official EMA (updated after autoencoder steps only) does."""
    return step if step <= cfg.disc_start else cfg.disc_start + (step - cfg.disc_start + 1) // 2


def discriminator_step(model, disc, disc_opt, x, g_init, boxes) -> dict[str, float]:
    """One hinge-loss step of the PatchGAN (``model`` / ``disc`` may be DDP wrappers)."""
    with torch.no_grad():
        recon, _, _ = model(x, g_init, boxes)
    # one forward for real and fake: two DDP forwards before a backward would clash over BatchNorm buffers
    real_logits, fake_logits = disc(torch.cat([x, recon.detach()])).chunk(2)
    d_loss = hinge_d_loss(real_logits, fake_logits)
    disc_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    disc_opt.step()
    return {"loss/disc": d_loss.item()}


def generator_step(cfg: TrainConfig, step: int, model, bare, disc, opt, x, g_init, boxes, lpips, inception):
    """One tokenizer step: L2 (+ LPIPS + Inception) (+ adaptive-weighted GAN term); returns
    (stats, recon, g). ``model`` / ``disc`` may be DDP wrappers, ``bare`` is the tokenizer itself."""
    recon, g, _ = model(x, g_init, boxes)
    gan_on = step >= cfg.disc_start
    l2 = F.mse_loss(recon, x)
    perceptual_on = cfg.recipe == "official" or gan_on
    loss = l2
    stats = {"loss/l2": l2.item(), "psnr": 10 * math.log10(4 / max(l2.item(), 1e-12))}
    if perceptual_on and lpips is not None:
        lp = lpips(recon, x).mean()
        loss = loss + cfg.lpips_weight * lp
        stats["loss/lpips"] = lp.item()
    if perceptual_on and inception is not None:
        fid_loss = F.mse_loss(inception(recon), inception(x))
        loss = loss + cfg.inception_weight * fid_loss
        stats["loss/inception"] = fid_loss.item()
    if gan_on:
        gen = -disc(recon).mean()
        w = adaptive_weight(loss, gen, bare.decoder.conv_out.weight, average=all_reduce_mean) * cfg.disc_weight
        loss = loss + w * gen
        stats |= {"loss/gen": gen.item(), "gan_weight": w.item()}
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(bare.parameters(), cfg.grad_clip).item()
    opt.step()
    stats["loss/total"] = loss.item()
    return stats, recon, g


def picture(x, recon, g_init, g, count: int = 2) -> np.ndarray:
    """Rows of input | reconstruction | g_init drawn | g drawn, (H, W, 3) uint8."""
    from gpstoken.tokenizer import to_uint8
    from gpstoken.viz import draw_gaussians

    rows = []
    src, rec = to_uint8(x[:count]), to_uint8(recon[:count])
    for i in range(len(src)):
        init_map = np.asarray(draw_gaussians(src[i], g_init[i].detach().cpu().numpy(), color=(64, 160, 255)))
        ref_map = np.asarray(draw_gaussians(src[i], g[i].detach().cpu().numpy()))
        rows.append(np.concatenate([src[i], rec[i], init_map, ref_map], axis=1))
    return np.concatenate(rows, axis=0)
