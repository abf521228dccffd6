"""The official GPSToken state-dict layout, written from the architecture description in
shared/reference/official-gpstoken-facts.md (sections 3-4), independently of gpstoken.convert.

``official_shapes(cfg)`` lists every tensor the official ``GPSToken`` module has for the
hyper-parameters of ``cfg``: preprocess_img (conv + ResnetBlocks with their unused temb_proj),
roialign_layer, gps_embed, gps_embed_layer, attnblocks (roimlp, ln1, attn1 = nn.MultiheadAttention,
ln2, mlp), to_gps, and the taming-style DecoderNP (up[i] is the level at resolution 2^i).
"""

from __future__ import annotations

import torch


def _conv(name, cin, cout, k):
    return {f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)}


def _vec(name, n):
    return {f"{name}.weight": (n,), f"{name}.bias": (n,)}


def _linear(name, cin, cout):
    return {f"{name}.weight": (cout, cin), f"{name}.bias": (cout,)}


def _resnet_block(name, cin, cout, temb=0):
    out = {**_vec(f"{name}.norm1", cin), **_conv(f"{name}.conv1", cin, cout, 3)}
    if temb:
        out.update(_linear(f"{name}.temb_proj", temb, cout))
    out.update({**_vec(f"{name}.norm2", cout), **_conv(f"{name}.conv2", cout, cout, 3)})
    if cin != cout:
        out.update(_conv(f"{name}.nin_shortcut", cin, cout, 1))
    return out


def official_shapes(cfg) -> dict[str, tuple[int, ...]]:
    enc, dec = cfg.encoder, cfg.decoder
    c, d = enc.stem_channels, enc.width
    shapes = _conv("preprocess_img.0", 3, c, 3)
    for i in range(1, enc.stem_blocks + 1):
        shapes.update(_resnet_block(f"preprocess_img.{i}", c, c, temb=512))
    shapes.update(_conv("roialign_layer", c, d, 1))
    shapes["gps_embed.weight"] = (1, d)
    for i in range(enc.depth):
        p = f"attnblocks.{i}"
        shapes.update(_linear(f"{p}.roimlp", enc.roi_size**2, 1))
        shapes.update(_vec(f"{p}.ln1", d))
        shapes[f"{p}.attn1.in_proj_weight"] = (3 * d, d)
        shapes[f"{p}.attn1.in_proj_bias"] = (3 * d,)
        shapes.update(_linear(f"{p}.attn1.out_proj", d, d))
        shapes.update(_vec(f"{p}.ln2", d))
        shapes.update(_linear(f"{p}.mlp.0", d, enc.mlp_ratio * d))
        shapes.update(_linear(f"{p}.mlp.2", enc.mlp_ratio * d, d))
    shapes.update(_linear("gps_embed_layer.0", 5, d))
    shapes.update(_linear("gps_embed_layer.2", d, d))
    shapes.update(_linear("to_gps.0", d, 5))
    shapes.update(_linear("to_gps.1", d, cfg.feature_channels))

    mults = dec.channel_mult
    block_in = dec.channels * mults[-1]
    shapes.update(_conv("decoder.conv_in", cfg.feature_channels, block_in, 3))
    shapes.update(_resnet_block("decoder.mid.block_1", block_in, block_in))
    if dec.mid_attention:
        shapes.update(_vec("decoder.mid.attn_1.norm", block_in))
        for k in ("q", "k", "v", "proj_out"):
            shapes.update(_conv(f"decoder.mid.attn_1.{k}", block_in, block_in, 1))
    shapes.update(_resnet_block("decoder.mid.block_2", block_in, block_in))
    for level in reversed(range(len(mults))):
        out = dec.channels * mults[level]
        for j in range(dec.res_blocks + 1):
            shapes.update(_resnet_block(f"decoder.up.{level}.block.{j}", block_in, out))
            block_in = out
        if level != 0:
            shapes.update(_conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3))
    shapes.update(_vec("decoder.norm_out", block_in))
    shapes.update(_conv("decoder.conv_out", block_in, 3, 3))
    return shapes


def official_state_dict(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in official_shapes(cfg).items()}
