"""Image quality metrics on uint8 images (H, W, 3), computed with scikit-image's implementations."""

from __future__ import annotations

import numpy as np


def _pair(reference: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(reference), np.asarray(image)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"metrics expect uint8 images, got {a.dtype} and {b.dtype}")
    return a, b


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels (data range 255)."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _pair(reference, image)
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=255))


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004 settings: Gaussian window sigma 1.5), mean over channels."""
    from skimage.metrics import structural_similarity

    a, b = _pair(reference, image)
    return float(
        structural_similarity(
            a, b, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
    )
