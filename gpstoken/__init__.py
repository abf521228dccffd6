"""GPSToken: images as 2D Gaussian tokens (sigma_x, sigma_y, rho, mu_x, mu_y) plus texture features.

Importing the package is light: the partition (C++, numpy only) is loaded at once, torch and the
compiled splat operators (``gpstoken._C``) on first use of ``splat`` or the tokenizer. So the slim
runtime's core (``gpstoken_core``) never needs torch.
"""

from __future__ import annotations

import importlib

from gpstoken_core.partition import Partition, calibrate, partition

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


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gpstoken' has no attribute {name!r}")


__all__ = ["GPSGenerator", "GPSTokenizer", "SiT", "Partition", "Tokens", "TokenizerConfig", "calibrate", "partition", "splat", "splat_reference", "to_uint8", "__version__"]
