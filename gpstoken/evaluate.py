"""Reconstruction quality of a tokenizer over an image set (the paper's Table 1 columns we can compute)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from gpstoken_core.imageio import ImageError, center_crop_resize
from .imagesets import read_image
from gpstoken_core.metrics import psnr, ssim
from .tokenizer import GPSTokenizer, to_uint8


@dataclass
class EvalResult:
    images: int
    tokens: int
    size: int
    psnr: float
    ssim: float
    lpips: float | None = None
    rfid: float | None = None
    seconds_per_image: float = 0.0
    skipped: list[str] = field(default_factory=list)
    per_image: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (PSNR, SSIM)

    def table(self) -> str:
        cols = [("images", f"{self.images}"), ("tokens", f"{self.tokens}"), ("size", f"{self.size}")]
        if self.rfid is not None:
            cols.append(("rFID", f"{self.rfid:.2f}"))
        cols += [("PSNR", f"{self.psnr:.2f}"), ("SSIM", f"{self.ssim:.4f}")]
        if self.lpips is not None:
            cols.append(("LPIPS", f"{self.lpips:.4f}"))
        cols.append(("s/image", f"{self.seconds_per_image:.2f}"))
        widths = [max(len(a), len(b)) for a, b in cols]
        head = " | ".join(a.rjust(w) for (a, _), w in zip(cols, widths))
        rule = "-|-".join("-" * w for w in widths)
        body = " | ".join(b.rjust(w) for (_, b), w in zip(cols, widths))
        return f"| {head} |\n|-{rule}-|\n| {body} |"


@torch.inference_mode()
def evaluate(
    model: GPSTokenizer,
    files: list[str],
    size: int = 256,
    tokens: int | None = None,
    lpips=None,
    inception=None,
    progress: bool = True,
) -> EvalResult:
    """Resize + centre-crop each image to ``size``, reconstruct, and average the metrics."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    psnrs, ssims, lpipss, feats_real, feats_fake, skipped, per_image = [], [], [], [], [], [], {}
    start = time.perf_counter()
    count = tokens
    for name in tqdm(files, desc="eval", unit="img", disable=not progress, dynamic_ncols=True):
        try:
            image = center_crop_resize(read_image(name), size)
        except (ImageError, OSError) as err:
            skipped.append(f"{name}: {err}")
            continue
        encoded = model.encode(image, tokens)
        count = len(encoded)
        recon = model.decode(encoded)
        out = to_uint8(recon)[0]
        psnrs.append(psnr(image, out))
        ssims.append(ssim(image, out))
        per_image[name] = (psnrs[-1], ssims[-1])
        if lpips is not None or inception is not None:
            real = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].to(device).float() / 127.5 - 1
            fake = torch.from_numpy(out.copy()).permute(2, 0, 1)[None].to(device).float() / 127.5 - 1
            if lpips is not None:
                lpipss.append(float(lpips(fake, real).mean()))
            if inception is not None:
                feats_real.append(inception(real).cpu())
                feats_fake.append(inception(fake).cpu())
    if not psnrs:
        raise ImageError("no image could be evaluated" + (f" ({skipped[0]})" if skipped else ""))
    rfid = None
    if inception is not None and len(feats_real) >= 2:
        from .perceptual import frechet_distance

        rfid = frechet_distance(torch.cat(feats_real), torch.cat(feats_fake))
    return EvalResult(
        images=len(psnrs),
        tokens=int(count) if count else 0,
        size=size,
        psnr=float(np.mean(psnrs)),
        ssim=float(np.mean(ssims)),
        lpips=float(np.mean(lpipss)) if lpipss else None,
        rfid=rfid,
        seconds_per_image=(time.perf_counter() - start) / len(psnrs),
        skipped=skipped,
        per_image=per_image,
    )
