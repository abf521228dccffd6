"""Two-stage generation with GPSToken: a layout SiT makes g_init, Alg. 2 calibrates it, a texture SiT
makes (dg, f) under that layout, the tokenizer decodes. Also the one-stage baseline and the official
generator's converter. Sampler math lives in ``gpstoken_core.sampling`` (shared with the runtime)."""

from __future__ import annotations

import importlib

from .config import PRESETS, SiTConfig, preset
from .models import SiT
from .samplers import sample_ode, sample_sde
from .transport import channel_stats, linear_path, velocity_loss

_LAZY = {
    "GPSGenerator": ".pipeline",
    "LayoutBank": ".layouts",
    "calibrate_layouts": ".layouts",
    "check_layout": ".layouts",
    "convert_official_generator": ".convert",
    "convert_official_layout_bank": ".convert",
    "restricted_pickle_load": ".convert",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gpstoken.generation' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "SiT",
    "SiTConfig",
    "channel_stats",
    "linear_path",
    "preset",
    "sample_ode",
    "sample_sde",
    "velocity_loss",
    *_LAZY,
]
