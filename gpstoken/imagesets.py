"""Image sets for training and evaluation: a folder (recursive), a list file, or bundled photos.

``skimage:`` names the photographs scikit-image ships in its wheel (our training photos), ``sklearn:``
scikit-learn's two sample photos (our held-out set); a single ``skimage:NAME`` entry also works.
``digits:train`` / ``digits:test`` are scikit-learn's 8x8 digits upscaled to 32x32 (``gpstoken.generation.digits``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpstoken_core.imageio import load_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
# Photographs that scikit-image ships in its wheel (no download); synthetic test patterns are left out.
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle_left", "motorcycle_right",
    "page", "retina", "rocket", "text",
)  # fmt: skip
SKLEARN_PHOTOS = ("china", "flower")  # scikit-learn's two sample photos: our held-out set


class DataError(ValueError):
    """The data source is empty or unusable; the message says which and why."""


def list_images(source: str) -> list[str]:
    """Image paths from a folder (recursive), a text file with one path per line, or ``skimage:``
    (the bundled photos) / ``sklearn:`` (scikit-learn's sample photos) / ``digits:SPLIT`` (the digits demo)."""
    if source.startswith("digits:"):
        return _digits().image_names(source)
    if source in ("skimage:", "sklearn:"):
        return [f"{source}{name}" for name in (SKIMAGE_PHOTOS if source == "skimage:" else SKLEARN_PHOTOS)]
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such folder or list file")
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)")
        return files
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    files = [ln if Path(ln).is_absolute() else str(path.parent / ln) for ln in lines if ln and not ln.startswith("#")]
    if not files:
        raise DataError(f"{path}: the list file names no images")
    return files


def read_image(name: str) -> np.ndarray:
    """HxWx3 uint8 from a path or a ``skimage:NAME`` / ``sklearn:NAME`` bundled photo, or ``digits:SPLIT:i``."""
    if name.startswith("digits:"):
        return _digits().read_digit(name)
    if name.startswith("skimage:"):
        from gpstoken_core.imageio import bundled_photo

        photo = name[len("skimage:") :]
        if photo in ("motorcycle_left", "motorcycle_right"):  # the two views of skimage's stereo pair
            import skimage.data

            return np.ascontiguousarray(skimage.data.stereo_motorcycle()[photo == "motorcycle_right"])
        return bundled_photo(photo)
    if name.startswith("sklearn:"):
        try:
            from sklearn.datasets import load_sample_image
        except ImportError:
            raise DataError("sklearn: photos need scikit-learn (pip install scikit-learn)") from None

        return np.ascontiguousarray(load_sample_image(name[len("sklearn:") :] + ".jpg"))
    return load_image(name)


def _digits():
    # lazy: the digits module needs scikit-learn, which only the digits sources use
    from .generation import digits

    return digits
