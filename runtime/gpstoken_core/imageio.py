"""Reading images for gpstoken: every failure is a ``ImageError`` that names the file and the problem."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192; larger inputs are refused rather than risking memory


class ImageError(ValueError):
    """An input image could not be used; the message says which file and why."""


def to_rgb_uint8(array: np.ndarray, name: str = "image") -> np.ndarray:
    """Convert grey, RGBA, 16-bit, float or bool arrays to HxWx3 uint8.

    Floats are taken as [0, 1]; integer types are scaled from their full range.
    """
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ImageError(f"{name}: expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {a.shape}")
    if a.shape[2] in (2, 4):  # drop alpha
        a = a[..., :-1]
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError(f"{name}: float image contains NaN or Inf")
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer):
            raise ImageError(f"{name}: unsupported pixel type {a.dtype}")
        info = np.iinfo(a.dtype)
        a = (np.clip(a.astype(np.float64), 0, info.max) / info.max * 255.0 + 0.5).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 (grey, palette, RGBA and 16-bit are converted)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    try:
        with warnings.catch_warnings():
            # we refuse oversized images ourselves (MAX_PIXELS) with a one-line error; PIL's own bomb
            # guard would warn, or raise past our handlers above twice its limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"{path}: {im.width}x{im.height} is larger than the {MAX_PIXELS} pixel limit")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                return to_rgb_uint8(np.asarray(im).astype(np.uint16 if im.mode != "I" else np.int32), str(path))
            if im.mode == "F":
                return to_rgb_uint8(np.asarray(im), str(path))
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except ImageError:
        raise
    except Image.DecompressionBombError as err:  # header claims far more pixels than MAX_PIXELS
        raise ImageError(f"{path}: too large to decode safely ({err})".replace("\n", " ")) from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise ImageError(f"{path}: corrupt or truncated image ({err})") from None


def bundled_photo(name: str = "astronaut") -> np.ndarray:
    """A photo that scikit-image ships (no download): astronaut, coffee, chelsea, rocket, camera, ..."""
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None or not callable(loader):
        raise ImageError(f"skimage.data has no photo named {name!r}")
    return to_rgb_uint8(loader(), f"skimage.data.{name}")


def center_crop_resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize so the image covers ``size`` (a side, or (H, W)), bicubic with antialiasing, and crop the centre."""
    th, tw = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    h, w = image.shape[:2]
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    im = Image.fromarray(image).resize((nw, nh), Image.BICUBIC)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return np.asarray(im.crop((left, top, left + tw, top + th)))
