"""Pictures: Gaussians drawn as ellipses over an image, and side-by-side panels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def gaussian_ellipse_points(g: Sequence[float], width: int, height: int, radius: float = 1.0, n: int = 24):
    """Pixel-space points of the ``radius``-sigma contour of g = (sigma_x, sigma_y, rho, mu_x, mu_y)."""
    sx, sy, rho, mx, my = (float(v) for v in g)
    rho = max(-0.999999, min(0.999999, rho))
    points = []
    for k in range(n):
        t = 2 * math.pi * k / n
        # Cholesky factor of [[sx^2, rho sx sy], [rho sx sy, sy^2]] applied to the unit circle.
        x = mx + radius * sx * math.cos(t)
        y = my + radius * sy * (rho * math.cos(t) + math.sqrt(1 - rho * rho) * math.sin(t))
        points.append(((x + 1) * (width - 1) / 2, (y + 1) * (height - 1) / 2))
    return points


def draw_gaussians(
    image: np.ndarray, gaussians: np.ndarray, color=(255, 64, 64), boxes: np.ndarray | None = None
) -> Image.Image:
    """The image with each Gaussian's 1-sigma ellipse (and optional pixel boxes x0, y0, x1, y1)."""
    im = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(im)
    if boxes is not None:
        for x0, y0, x1, y1 in np.asarray(boxes):
            draw.rectangle([float(x0), float(y0), float(x1), float(y1)], outline=(255, 255, 255))
    for g in np.asarray(gaussians, dtype=np.float64):
        draw.polygon(gaussian_ellipse_points(g, im.width, im.height), outline=color)
    return im


def panels(images: Sequence[np.ndarray | Image.Image], titles: Sequence[str], scale: int = 1) -> Image.Image:
    """Images side by side with a caption above each."""
    ims = [(im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))).convert("RGB") for im in images]
    ims = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in ims]
    font = ImageFont.load_default()
    caption = 16
    out = Image.new("RGB", (sum(im.width for im in ims) + 4 * (len(ims) - 1), max(im.height for im in ims) + caption), "white")
    draw = ImageDraw.Draw(out)
    x = 0
    for im, title in zip(ims, titles):
        out.paste(im, (x, caption))
        draw.text((x + 2, 2), title, fill=(0, 0, 0), font=font)
        x += im.width + 4
    return out


# Black -> purple -> orange -> yellow -> white, like perceptual "inferno"-style maps.
_HEAT_STOPS = np.array(
    [[0, 0, 0], [80, 18, 123], [190, 55, 82], [250, 140, 10], [252, 255, 164]], dtype=np.float64
)


def heatmap(values: np.ndarray, vmax: float) -> np.ndarray:
    """(H, W) non-negative values -> (H, W, 3) uint8 colours, ``vmax`` and above at the top colour."""
    t = np.clip(np.asarray(values, dtype=np.float64) / max(vmax, 1e-12), 0, 1) * (len(_HEAT_STOPS) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_HEAT_STOPS) - 2)
    frac = (t - lo)[..., None]
    return (_HEAT_STOPS[lo] * (1 - frac) + _HEAT_STOPS[lo + 1] * frac).round().astype(np.uint8)


def error_map(reference: np.ndarray, image: np.ndarray, vmax: float = 64.0) -> np.ndarray:
    """Per-pixel mean absolute error of two uint8 images as a heat map (``vmax`` grey levels = brightest)."""
    diff = np.abs(np.asarray(reference, np.float64) - np.asarray(image, np.float64)).mean(axis=-1)
    return heatmap(diff, vmax)
