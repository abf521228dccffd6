"""Convert the official GPSToken checkpoints (gpstoken_{s64,m128,l256}.safetensors) to our layout.

The official files hold bare module keys of the official ``GPSToken`` class (older saves: an
``ema_model.`` prefix, or an EMA wrapper with ``online_model.*`` / ``ema_model.*``; the EMA weights are
used). Every official tensor must map to exactly one of ours with the same shape, except the two
``temb_proj`` layers of the encoder stem, which the official model stores but never calls. Anything else
is an error that lists the keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, describe_mismatch, load_tensors
from .config import TokenizerConfig, preset

# Official tensors that have no counterpart on purpose.
UNUSED_OFFICIAL = re.compile(r"^preprocess_img\.\d+\.temb_proj\.(weight|bias)$")


def _rules(levels: int) -> list[tuple[re.Pattern, object]]:
    """(pattern, replacement) pairs from official names to ours; the first match wins."""
    block = r"(norm1|conv1|norm2|conv2)"
    rules = [
        (r"^preprocess_img\.0\.(weight|bias)$", r"encoder.stem.conv_in.\1"),
        (
            rf"^preprocess_img\.(\d+)\.{block}\.(weight|bias)$",
            lambda m: f"encoder.stem.blocks.{int(m[1]) - 1}.{m[2]}.{m[3]}",
        ),
        (r"^roialign_layer\.(weight|bias)$", r"encoder.roi_proj.\1"),
        (r"^gps_embed\.weight$", "encoder.query_base"),
        (r"^gps_embed_layer\.(0|2)\.(weight|bias)$", r"encoder.query_mlp.\1.\2"),
        (r"^attnblocks\.(\d+)\.roimlp\.(weight|bias)$", r"encoder.blocks.\1.roi_pool.\2"),
        (r"^attnblocks\.(\d+)\.ln1\.(weight|bias)$", r"encoder.blocks.\1.norm_attn.\2"),
        (r"^attnblocks\.(\d+)\.attn1\.in_proj_(weight|bias)$", r"encoder.blocks.\1.attn.qkv.\2"),
        (r"^attnblocks\.(\d+)\.attn1\.out_proj\.(weight|bias)$", r"encoder.blocks.\1.attn.proj.\2"),
        (r"^attnblocks\.(\d+)\.ln2\.(weight|bias)$", r"encoder.blocks.\1.norm_mlp.\2"),
        (r"^attnblocks\.(\d+)\.mlp\.(0|2)\.(weight|bias)$", r"encoder.blocks.\1.mlp.\2.\3"),
        (r"^to_gps\.0\.(weight|bias)$", r"encoder.to_delta.\1"),
        (r"^to_gps\.1\.(weight|bias)$", r"encoder.to_texture.\1"),
        (r"^decoder\.(conv_in|norm_out|conv_out)\.(weight|bias)$", r"decoder.\1.\2"),
        (rf"^decoder\.mid\.block_(1|2)\.{block}\.(weight|bias)$", r"decoder.mid_block\1.\2.\3"),
        (r"^decoder\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", r"decoder.mid_attn.\1.\2"),
        # official up[i] is the level at resolution 2^i (up[levels-1] runs first); our stages run in order
        (
            rf"^decoder\.up\.(\d+)\.block\.(\d+)\.{block}\.(weight|bias)$",
            lambda m: f"decoder.stages.{levels - 1 - int(m[1])}.blocks.{m[2]}.{m[3]}.{m[4]}",
        ),
        (
            r"^decoder\.up\.(\d+)\.block\.(\d+)\.nin_shortcut\.(weight|bias)$",
            lambda m: f"decoder.stages.{levels - 1 - int(m[1])}.blocks.{m[2]}.shortcut.{m[3]}",
        ),
        (
            r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$",
            lambda m: f"decoder.stages.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}",
        ),
    ]
    return [(re.compile(p), r) for p, r in rules]


def official_name_to_ours(name: str, levels: int = 3) -> str | None:
    """Our key for an official key; None if it has no counterpart (unused or unknown)."""
    for pattern, replacement in _rules(levels):
        m = pattern.match(name)
        if m:
            return replacement(m) if callable(replacement) else m.expand(replacement)
    return None


def strip_wrappers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare official keys from a bare, ``ema_model.``-prefixed, ``module.``-prefixed or EMA-wrapper file."""
    if any(k.startswith("ema_model.") for k in tensors):
        return {k[len("ema_model.") :]: v for k, v in tensors.items() if k.startswith("ema_model.")}
    if tensors and all(k.startswith("module.") for k in tensors):
        return {k[len("module.") :]: v for k, v in tensors.items()}
    return dict(tensors)


def convert_official_state_dict(
    official: dict[str, torch.Tensor], config: TokenizerConfig, source: str = "official checkpoint"
) -> dict[str, torch.Tensor]:
    """Map and check an official state dict against a model built from ``config``."""
    from .tokenizer import GPSTokenizer

    official = strip_wrappers(official)
    levels = len(config.decoder.channel_mult)
    converted: dict[str, torch.Tensor] = {}
    unknown, clashes = [], []
    for name, tensor in official.items():
        if UNUSED_OFFICIAL.match(name):
            continue
        ours = official_name_to_ours(name, levels)
        if ours is None:
            unknown.append(name)
            continue
        if ours in converted:
            clashes.append(name)
        if ours == "encoder.query_base":
            tensor = tensor.reshape(1, -1)
        converted[ours] = tensor.float()
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPSTokenizer(config).state_dict().items()}
    problems = []
    if unknown:
        problems.append(
            f"{source}: {len(unknown)} tensor(s) are not part of an official GPSToken tokenizer: "
            + ", ".join(sorted(unknown)[:8])
            + (" ..." if len(unknown) > 8 else "")
        )
    if clashes:
        problems.append(f"{source}: duplicate tensors for {', '.join(clashes[:8])}")
    mismatch = describe_mismatch(expected, converted, f"{source} converted for the {config.name} config")
    if mismatch:
        problems.append(mismatch)
        c = official.get("to_gps.1.weight")
        if c is not None and c.shape[0] != config.feature_channels:
            problems.append(
                f"hint: the checkpoint has {c.shape[0]} feature channels; the {config.name} config has "
                f"{config.feature_channels} (l256 uses 32, s64/m128 use 16)"
            )
    if problems:
        raise CheckpointError("\n".join(problems))
    return converted


def convert_official(checkpoint: str | Path, config: str | TokenizerConfig, out: str | Path):
    """Read an official ``.safetensors`` file, convert it, save a gpstoken model folder; returns the model."""
    from .tokenizer import GPSTokenizer

    cfg = preset(config) if isinstance(config, str) else config
    path = Path(checkpoint)
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        raise CheckpointError(f"{path}: only .safetensors checkpoints are read (pickle files are never loaded)")
    tensors, _ = load_tensors(path)
    state = convert_official_state_dict(tensors, cfg, source=str(path))
    model = GPSTokenizer(cfg)
    model.load_weights(state, source=str(path))
    model.save_pretrained(out)
    return model
