"""Generator configurations (dataclasses) and presets.

A generator model is a SiT over tokens (patch size 1). Its ``role`` says what its channels are:
  layout   - g_init (5 channels), class-conditional; the first stage.
  texture  - (dg, f) (5 + C_f channels) conditioned on a layout g_init (5 channels); the second stage.
  onestage - (g, f) jointly, no layout; the baseline.
Per-channel normalization statistics live in the config: the model works on (x - mean) / std. The
official texture model's 21 means/stds are from configs/gpstoken_generator.yaml of the official code;
our models get theirs from token data (``gpstoken.generation.transport.channel_stats``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from gpstoken_core.official import TOKENS_PER_TILE

CONFIG_FORMAT = "gpstoken-generator"
ROLES = ("layout", "texture", "onestage")
COND_MODES = ("input", "blocks")  # input: official code (in place of pos_embed); blocks: the paper
G_CHANNELS = 5  # sigma_x, sigma_y, rho, mu_x, mu_y

# configs/gpstoken_generator.yaml (pretrained_gpstoken_means / _stds): 5 dg then 16 f channels.
OFFICIAL_MEANS = (
    -0.0211, -0.0196, 0.0107, -0.0052, -0.0044,
    1.8017, 2.4036, 2.0145, 1.2402, -4.2579, -1.2646, -3.0395, 2.2928,
    3.2168, -0.1431, 0.1600, 1.3924, 3.2345, 1.6994, 0.8237, 0.3222,
)  # fmt: skip
OFFICIAL_STDS = (
    0.0121, 0.0108, 0.2533, 0.0119, 0.0114,
    2.7334, 2.6400, 2.7963, 2.9325, 2.8337, 2.8269, 3.1082, 3.1412,
    2.8038, 2.6501, 2.6163, 2.4718, 2.6958, 2.8157, 2.4744, 2.8200,
)  # fmt: skip

# SiT's size table: the head count is not visible in a state dict, the width is.
HEADS_BY_HIDDEN = {384: 6, 768: 12, 1024: 16, 1152: 16}


@dataclass(frozen=True)
class SiTConfig:
    name: str = "SiT-XL/2-gs"
    role: str = "texture"
    num_tokens: int = TOKENS_PER_TILE  # L; the tokenizer's tokens per tile
    in_channels: int = 21  # layout 5; texture / one-stage 5 + feature channels
    hidden: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the null class (CFG) is num_classes
    class_dropout: float = 0.1  # label dropout while training (the null class's training signal)
    cond_channels: int = 5  # layout condition width; 0: none
    cond_mode: str = "input"
    learn_sigma: bool = False  # only for official weights: the final layer has 2x channels, extras dropped
    frequency_dim: int = 256  # sinusoidal t embedding width
    mean: tuple[float, ...] | None = None  # per-channel statistics of the modelled tokens; None: 0 / 1
    std: tuple[float, ...] | None = None
    cond_mean: tuple[float, ...] | None = None  # of the layout condition; None: raw g_init (official)
    cond_std: tuple[float, ...] | None = None

    def __post_init__(self):
        for key in ("mean", "std", "cond_mean", "cond_std"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, tuple(float(v) for v in value))
        problems = []
        if self.role not in ROLES:
            problems.append(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.cond_mode not in COND_MODES:
            problems.append(f"cond_mode must be one of {', '.join(COND_MODES)}, got {self.cond_mode!r}")
        for key in ("num_tokens", "in_channels", "hidden", "depth", "heads", "num_classes", "frequency_dim"):
            if int(getattr(self, key)) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden % max(self.heads, 1):
            problems.append(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.frequency_dim % 2:
            problems.append(f"frequency_dim must be even, got {self.frequency_dim}")
        if not 0.0 <= self.class_dropout < 1.0:
            problems.append(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        if self.role == "layout" and (self.in_channels != G_CHANNELS or self.cond_channels):
            problems.append("a layout model has in_channels 5 (g_init) and no layout condition (cond_channels 0)")
        if self.role == "texture" and (self.in_channels <= G_CHANNELS or self.cond_channels != G_CHANNELS):
            problems.append("a texture model has in_channels 5 + feature channels and cond_channels 5")
        if self.role == "onestage" and (self.in_channels <= G_CHANNELS or self.cond_channels):
            problems.append("a one-stage model has in_channels 5 + feature channels and no layout condition")
        for key, size in (("mean", self.in_channels), ("std", self.in_channels), ("cond_mean", self.cond_channels), ("cond_std", self.cond_channels)):
            value = getattr(self, key)
            if value is None:
                continue
            if len(value) != size:
                problems.append(f"{key} has {len(value)} values, expected {size}")
            elif not all(math.isfinite(v) for v in value):
                problems.append(f"{key} has non-finite values")
            elif key.endswith("std") and min(value) <= 0:
                problems.append(f"{key} must be > 0")
        if (self.mean is None) != (self.std is None) or (self.cond_mean is None) != (self.cond_std is None):
            problems.append("give means and stds together")
        if problems:
            raise ValueError("invalid generator config: " + "; ".join(problems))

    @property
    def feature_channels(self) -> int:
        """C_f: the texture feature width (0 for a layout model)."""
        return 0 if self.role == "layout" else self.in_channels - G_CHANNELS

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def replace(self, **changes) -> SiTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {"format": CONFIG_FORMAT, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> SiTConfig:
        data = dict(data)
        fmt = data.pop("format", None)
        if fmt != CONFIG_FORMAT:
            raise ValueError(f"not a gpstoken generator config (format {fmt!r}, expected {CONFIG_FORMAT!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown generator config field(s): {', '.join(unknown)}")
        return cls(**data)


# ----------------------------------------------------------------------------- presets
def sit_xl_gs() -> SiTConfig:
    """The official texture model SiT-XL/2-gs (patch size 1 over 128 tokens, 5 dg + 16 f channels);
    676,334,634 parameters with its learn_sigma head."""
    return SiTConfig(learn_sigma=True, mean=OFFICIAL_MEANS, std=OFFICIAL_STDS)


def sit_s_layout() -> SiTConfig:
    """Layout model: SiT-S (depth 12, width 384, 6 heads) over g_init, about 33M parameters (paper)."""
    return SiTConfig(
        name="SiT-S/layout", role="layout", in_channels=5, hidden=384, depth=12, heads=6, cond_channels=0
    )


def sit_xl_onestage() -> SiTConfig:
    """One-stage baseline: SiT-XL over (g, f) of M128 tokens, no layout stage."""
    return SiTConfig(name="SiT-XL/onestage", role="onestage", cond_channels=0)


def small_stage(family: str, role: str, hidden: int, depth: int, heads: int = 4) -> SiTConfig:
    """A small SiT of one stage (``family/role``): the layout model takes g_init (5 channels), the texture model
    (dg, f) conditioned on a layout, the one-stage baseline (g, f) without one. Channel and class counts are
    fitted to the token shards by the trainer."""
    g_only = {"in_channels": G_CHANNELS, "cond_channels": 0} if role == "layout" else {}
    no_layout = {"cond_channels": 0} if role == "onestage" else {}
    return SiTConfig(name=f"{family}/{role}", role=role, hidden=hidden, depth=depth, heads=heads, **g_only, **no_layout)


SMALL = {  # family: (hidden, depth); "digits" is the shipped demo's size (about 1.2M parameters per stage)
    "tiny": (64, 2),
    "digits": (128, 4),
}


PRESETS = {
    "SiT-XL/2-gs": sit_xl_gs,
    "SiT-S/layout": sit_s_layout,
    "SiT-XL/onestage": sit_xl_onestage,
    **{
        f"{family}/{role}": (lambda family=family, role=role, size=size: small_stage(family, role, *size))
        for family, size in SMALL.items()
        for role in ROLES
    },
}


def preset(name: str, **overrides) -> SiTConfig:
    """A preset by name, with optional field overrides (e.g. ``num_tokens=64, num_classes=10``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown generator config {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]().replace(**overrides) if overrides else PRESETS[name]()
