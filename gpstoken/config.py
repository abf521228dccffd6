"""Tokenizer configurations as dataclasses.

``s64``, ``m128`` and ``l256`` are the official architectures (configs/gpstoken_*.yaml of the official
code; the paper's Table 1 models); ``tiny`` is a small model that trains on a 2-core CPU. A config is
saved next to the weights as JSON and read back with strict field checking.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from gpstoken_core.official import MIN_REGION, PARTITION_LAMBDA, SUPPORT, TOKENS_PER_TILE
from gpstoken_core.tiling import DECODE_MODES, TILE

CONFIG_FORMAT = "gpstoken-tokenizer"  # written into config.json so other JSON files are recognised


@dataclass(frozen=True)
class EncoderConfig:
    stem_channels: int = 128  # conv3x3 + residual blocks at full image resolution
    stem_blocks: int = 2
    width: int = 512  # token width (official gpsenc_c)
    depth: int = 30  # attention blocks (official gpsenc_n)
    heads: int = 8
    mlp_ratio: int = 4
    roi_size: int = 8  # RoIAlign output is roi_size x roi_size per token (official rois)
    roi_sampling_ratio: int = -1  # -1: adaptive ceil(bin size), as torchvision and the official model


@dataclass(frozen=True)
class DecoderConfig:
    channels: int = 128  # official ch
    channel_mult: tuple[int, ...] = (1, 2, 4)  # the map is upsampled 2 ** (len - 1) times
    res_blocks: int = 2  # official num_res_blocks; each level has res_blocks + 1 blocks
    mid_attention: bool = True
    groups: int = 32  # GroupNorm groups

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class TokenizerConfig:
    name: str = "m128"
    tokens_per_tile: int = TOKENS_PER_TILE  # official gps_num: tokens per tile x tile pixels
    feature_channels: int = 16  # official gps_c: width of the texture feature f
    support: float = SUPPORT  # official gps_dmax: Gaussians are cut at |d| <= support * sigma
    lam: float = PARTITION_LAMBDA  # entropy exponent of the partition (official gps_adaptive_w)
    min_region: int = MIN_REGION  # partition minimum region side (official adaptive_minhw default)
    tile: int = TILE  # images larger than this are partitioned and encoded per tile
    # how an image of several tiles is decoded (gpstoken_core.tiling): "merged" = one map with per-tile
    # statistics (official S64/M128), "tiles" = each tile on its own (official L256)
    decode_mode: str = "merged"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self):
        problems = []
        if self.tokens_per_tile < 1:
            problems.append(f"tokens_per_tile must be >= 1, got {self.tokens_per_tile}")
        if self.feature_channels < 1:
            problems.append(f"feature_channels must be >= 1, got {self.feature_channels}")
        if self.decode_mode not in DECODE_MODES:
            problems.append(f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {self.decode_mode!r}")
        if not self.support > 0:
            problems.append(f"support must be > 0, got {self.support}")
        enc, dec = self.encoder, self.decoder
        if enc.width % enc.heads:
            problems.append(f"encoder.width {enc.width} is not divisible by encoder.heads {enc.heads}")
        if enc.stem_channels % dec.groups:
            problems.append(f"encoder.stem_channels {enc.stem_channels} is not divisible by {dec.groups} groups")
        for m in dec.channel_mult:
            if (dec.channels * m) % dec.groups:
                problems.append(f"decoder channels {dec.channels * m} are not divisible by {dec.groups} groups")
        if self.tile % dec.upsample_factor:
            problems.append(f"tile {self.tile} is not a multiple of the decoder upsampling {dec.upsample_factor}")
        if problems:
            raise ValueError("invalid tokenizer config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {"format": CONFIG_FORMAT, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> TokenizerConfig:
        data = dict(data)
        if "merge_tiles" in data and "decode_mode" not in data:  # configs saved before decode_mode existed
            data["decode_mode"] = "merged" if data.pop("merge_tiles") else "tiles"
        fmt = data.pop("format", None)
        if fmt != CONFIG_FORMAT:
            raise ValueError(f"not a gpstoken tokenizer config (format {fmt!r}, expected {CONFIG_FORMAT!r})")
        enc = _build(EncoderConfig, data.pop("encoder", {}), "encoder")
        dec_data = dict(data.pop("decoder", {}))
        if "channel_mult" in dec_data:
            dec_data["channel_mult"] = tuple(dec_data["channel_mult"])
        dec = _build(DecoderConfig, dec_data, "decoder")
        return _build(cls, {**data, "encoder": enc, "decoder": dec}, "config")

    @classmethod
    def from_json(cls, text: str) -> TokenizerConfig:
        return cls.from_dict(json.loads(text))


def _build(kind, data: dict, where: str):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {where} field(s): {', '.join(unknown)}")
    return kind(**data)


def s64() -> TokenizerConfig:
    """Official GPSToken-S64: 64 tokens per 256x256 tile (the same network as M128)."""
    return TokenizerConfig(name="s64", tokens_per_tile=64, feature_channels=16)


def m128() -> TokenizerConfig:
    """Official GPSToken-M128: 128 tokens, 16 feature channels."""
    return TokenizerConfig(name="m128", tokens_per_tile=128, feature_channels=16)


def l256() -> TokenizerConfig:
    """Official GPSToken-L256: 256 tokens, 32 feature channels; tiles are decoded separately."""
    return TokenizerConfig(name="l256", tokens_per_tile=256, feature_channels=32, decode_mode="tiles")


def tiny() -> TokenizerConfig:
    """A 2.3M-parameter model with the official structure, small enough to train on a 2-core CPU.

    Narrow at high resolution (16 channels at the output, 128 at the 64x64 map) because the decoder's
    cost is per output pixel; 4 token blocks of width 128.
    """
    return TokenizerConfig(
        name="tiny",
        tokens_per_tile=128,
        feature_channels=16,
        encoder=EncoderConfig(stem_channels=32, stem_blocks=1, width=128, depth=4, heads=4),
        decoder=DecoderConfig(channels=16, channel_mult=(1, 2, 8), res_blocks=1, mid_attention=False, groups=16),
    )


def digits() -> TokenizerConfig:
    """The digits demo (gpstoken.generation.digits): 32x32 images as one tile of 16 tokens.

    min_region 4 leaves at most 64 regions (8x8 of 4 px, the digits' original pixel grid); the tiny
    network's layout, narrower (2 token blocks, a 64-channel 8x8 map) and 8 feature channels, since a
    32x32 grey digit holds little texture and a short token (5 + 8) is easier for the generator to model.
    """
    return TokenizerConfig(
        name="digits",
        tokens_per_tile=16,
        feature_channels=8,
        min_region=4,
        tile=32,
        decode_mode="tiles",
        encoder=EncoderConfig(stem_channels=32, stem_blocks=1, width=128, depth=2, heads=4),
        decoder=DecoderConfig(channels=16, channel_mult=(1, 2, 4), res_blocks=1, mid_attention=False, groups=16),
    )


PRESETS = {"s64": s64, "m128": m128, "l256": l256, "tiny": tiny, "digits": digits}


def preset(name: str) -> TokenizerConfig:
    try:
        return PRESETS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(PRESETS)}") from None
