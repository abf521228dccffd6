"""GPSToken: images as 2D Gaussian tokens (sigma_x, sigma_y, rho, mu_x, mu_y) plus texture features.

Importing the package is light: the partition (C++, numpy only) is loaded at once, torch and the
compiled splat operators (``gpstoken._C``) on first use of ``splat`` or the tokenizer. So the slim
runtime's core (``gpstoken_core``) never needs torch.
"""

from __future__ import annotations

from gpstoken_core.partition import Partition, calibrate, partition

from ._lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "splat": ".splatting",
    "splat_reference": ".splatting",
    "GPSTokenizer": ".tokenizer",
    "to_uint8": ".tokenizer",
    "Tokens": ".tokens",
    "TokenizerConfig": ".config",
    "GPSGenerator": ".generation",
    "SiT": ".generation",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

__all__ = ["GPSGenerator", "GPSTokenizer", "SiT", "Partition", "Tokens", "TokenizerConfig", "calibrate", "partition", "splat", "splat_reference", "to_uint8", "__version__"]
