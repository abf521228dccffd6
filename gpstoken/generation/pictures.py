"""The pipeline picture of one generated sample: sampled g_init, calibrated g_init, refined g, image.

Layouts are drawn as 1-sigma ellipses: the two g_init panels on a plain grey canvas (a layout has no image
yet), the refined Gaussians over a dimmed copy of the image they decode to, so one sees which structure the
texture stage kept and where it moved or stretched Gaussians.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..viz import draw_gaussians, panels
from .pipeline import Generation

CANVAS = 236  # grey of the layout panels
LAYOUT_COLOR = (30, 90, 200)
CALIBRATED_COLOR = (0, 130, 60)
REFINED_COLOR = (255, 60, 60)
PANEL_MIN = 192  # small images (the 32x32 digits) are enlarged to this, so ellipses and captions fit


def pipeline_picture(gen: Generation, k: int, source: str = "layout model", header: str = "") -> Image.Image:
    """Panels for sample ``k`` of ``gen`` with a title each, and an optional header line above them.

    ``source`` names where the sampled layout came from ("layout model", "layout bank", "given").
    """
    image = gen.images[k]
    zoom = max(1, -(-PANEL_MIN // max(image.shape[:2])))  # nearest-neighbour, ellipses drawn at the panel size
    image = np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1)
    h, w = image.shape[:2]
    canvas = np.full((h, w, 3), CANVAS, np.uint8)
    dimmed = (image.astype(np.float32) * 0.55 + 255 * 0.45).astype(np.uint8)  # ellipses stay visible on any image
    label = int(gen.labels[k])
    pictures, titles = [], []
    if gen.layout_sampled is not None:
        sampled = gen.layout_sampled[k].detach().cpu().numpy()
        used = gen.tokens.g_init[k].detach().cpu().numpy()
        pictures.append(draw_gaussians(canvas, sampled, color=LAYOUT_COLOR))
        titles.append(f"1. sampled g_init ({source})")
        same = np.array_equal(sampled, used)
        pictures.append(draw_gaussians(canvas, used, color=CALIBRATED_COLOR))
        titles.append("2. g_init used as is (no Alg. 2)" if same else "2. calibrated g_init (Alg. 2)")
        pictures.append(draw_gaussians(dimmed, gen.tokens.g[k].detach().cpu().numpy(), color=REFINED_COLOR))
        titles.append("3. refined g = g_init + dg")
    else:
        pictures.append(draw_gaussians(dimmed, gen.tokens.g[k].detach().cpu().numpy(), color=REFINED_COLOR))
        titles.append("1. g (one-stage model)")
    pictures.append(Image.fromarray(image))
    titles.append(f"{len(pictures)}. image, class {label}")
    body = panels(pictures, titles)
    if not header:
        return body
    line = 18
    out = Image.new("RGB", (body.width, body.height + line), "white")
    ImageDraw.Draw(out).text((4, 3), header, fill=(0, 0, 0), font=ImageFont.load_default())
    out.paste(body, (0, line))
    return out
