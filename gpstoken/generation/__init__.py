"""Two-stage generation with GPSToken: a layout SiT makes g_init, Alg. 2 calibrates it, a texture SiT
makes (dg, f) under that layout, the tokenizer decodes. Also the one-stage baseline and the official
generator's converter. Sampler math lives in ``gpstoken_core.sampling`` (shared with the runtime).

Names load on first use, so ``gpstoken.generation.cli`` (argument parsing) does not import torch.
"""

from __future__ import annotations

from pathlib import Path

from .._lazy import lazy_attributes


def shipped_generator_folder() -> Path | None:
    """The small digits demo generator shipped in the package (tokenizer/, layout/, texture/), if installed."""
    folder = Path(__file__).resolve().parents[1] / "weights" / "digits"
    return folder if (folder / "texture").is_dir() else None


_LAZY = {
    "PRESETS": ".config",
    "SiTConfig": ".config",
    "preset": ".config",
    "SiT": ".models",
    "sample_ode": ".samplers",
    "sample_sde": ".samplers",
    "model_velocity": ".samplers",
    "channel_stats": ".transport",
    "linear_path": ".transport",
    "velocity_loss": ".transport",
    "texture_targets": ".transport",
    "GPSGenerator": ".pipeline",
    "Generation": ".pipeline",
    "pipeline_picture": ".pictures",
    "LayoutBank": ".layouts",
    "calibrate_layouts": ".layouts",
    "check_layout": ".layouts",
    "convert_official_generator": ".convert",
    "convert_official_layout_bank": ".convert",
    "convert_official_generator_folder": ".convert",
    "restricted_pickle_load": ".convert",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

__all__ = sorted(_LAZY)
