"""GPSToken: images as 2D Gaussian tokens (sigma_x, sigma_y, rho, mu_x, mu_y) plus texture features.

The compiled operators live in ``gpstoken._C``; importing this package loads them.
"""

from __future__ import annotations

import torch  # noqa: F401  (must come before the extension: it links against libtorch)

from ._ext import load_extension

load_extension()

from .partition import Partition, calibrate, partition  # noqa: E402
from .splat import splat, splat_reference  # noqa: E402
from .config import TokenizerConfig  # noqa: E402
from .tokenizer import GPSTokenizer, to_uint8  # noqa: E402
from .tokens import Tokens  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "GPSTokenizer",
    "Partition",
    "Tokens",
    "TokenizerConfig",
    "calibrate",
    "partition",
    "splat",
    "splat_reference",
    "to_uint8",
    "__version__",
]
