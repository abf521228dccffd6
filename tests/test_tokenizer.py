"""Tokenizer: architecture sizes, RoIAlign, normalization, refinement, checkpoints, converter, tiles, editing."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from official_decoder_reference import decoder_np_forward, normalize_np
from official_layout import official_shapes, official_state_dict

import gpstoken
from gpstoken.checkpoint import CheckpointError
from gpstoken.config import DecoderConfig, TokenizerConfig, preset
from gpstoken.convert import convert_official_state_dict
from gpstoken.encoder import SelfAttention, refine
from gpstoken_core.imageio import ImageError, bundled_photo, center_crop_resize
from gpstoken.layers import TiledGroupNorm
from gpstoken.roi_align import roi_align
from gpstoken.tokenizer import GPSTokenizer
from gpstoken.tokens import Tokens

# Official parameter counts (instantiated official code, facts file section 3). The official encoder stem
# also stores two temb_proj Linear(512 -> 128) layers that its forward never calls; we don't build them.
OFFICIAL_TOTAL = {"s64": 128_663_478, "m128": 128_663_478, "l256": 128_745_414}
OFFICIAL_DECODER = {"s64": 33_020_675, "m128": 33_020_675, "l256": 33_094_403}
OFFICIAL_ATTN_BLOCKS = 94_573_470
UNUSED_TEMB_PROJ = 2 * (512 * 128 + 128)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = GPSTokenizer("tiny").eval()
    with torch.no_grad():  # a trained-looking refinement head, so g != g_init
        model.encoder.to_delta.weight.normal_(0, 0.02)
    return model


@pytest.fixture(scope="module")
def photo256():
    return center_crop_resize(bundled_photo("astronaut"), 256)


# ----------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("name", ["s64", "m128", "l256"])
def test_official_parameter_counts(name):
    with torch.device("meta"):
        model = GPSTokenizer(name)
    blocks = sum(p.numel() for p in model.encoder.blocks.parameters())
    assert blocks == OFFICIAL_ATTN_BLOCKS
    assert sum(p.numel() for p in model.decoder.parameters()) == OFFICIAL_DECODER[name]
    assert model.num_parameters() + UNUSED_TEMB_PROJ == OFFICIAL_TOTAL[name]
    # and the independent official layout (what the released files hold) agrees on every count
    official = sum(math.prod(s) for s in official_shapes(preset(name)).values())
    assert official == OFFICIAL_TOTAL[name]
    assert len(official_shapes(preset(name))) == 565  # tensors in the released files


def test_tiny_is_small():
    assert GPSTokenizer("tiny").num_parameters() < 5_000_000


@pytest.mark.parametrize("name", ["s64", "m128", "l256"])
def test_official_configs_run_a_forward_pass(name):
    torch.manual_seed(0)
    model = GPSTokenizer(name).eval()
    image = center_crop_resize(bundled_photo("chelsea"), 64)  # small image: shapes, not quality
    with torch.inference_mode():
        tokens = model.encode(image, num_tokens=16)
        out = model.decode(tokens)
    c = preset(name).feature_channels
    assert tokens.g.shape == (1, 16, 5) and tokens.f.shape == (1, 16, c)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_config_json_round_trip_and_unknown_fields():
    cfg = preset("tiny")
    assert TokenizerConfig.from_json(cfg.to_json()) == cfg
    data = cfg.to_dict()
    data["encoder"]["depthh"] = 3
    with pytest.raises(ValueError, match="unknown encoder field"):
        TokenizerConfig.from_dict(data)
    with pytest.raises(ValueError, match="not a gpstoken tokenizer config"):
        TokenizerConfig.from_dict({"name": "x"})
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(cfg, decoder=DecoderConfig(channels=20))


# ----------------------------------------------------------------------------- RoIAlign


def _bilinear_torchvision(feat, y, x):
    """One bilinear sample with torchvision's border rules (features (C, H, W) numpy)."""
    _, h, w = feat.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(feat.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= h - 1:
        yl = yh = h - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= w - 1:
        xl = xh = w - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    return (1 - ly) * (1 - lx) * feat[:, yl, xl] + (1 - ly) * lx * feat[:, yl, xh] + ly * (1 - lx) * feat[:, yh, xl] + ly * lx * feat[:, yh, xh]


def _roi_align_reference(feat, box, size, sampling_ratio, aligned):
    off = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (float(v) for v in box)
    sx, sy = x0 - off, y0 - off
    rw, rh = x1 - x0, y1 - y0
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    bw, bh = rw / size, rh / size
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / size)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / size)
    count = max(gh * gw, 1)
    out = np.zeros((feat.shape[0], size, size))
    for ph in range(size):
        for pw in range(size):
            acc = np.zeros(feat.shape[0])
            for iy in range(gh):
                y = sy + ph * bh + (iy + 0.5) * bh / gh
                for ix in range(gw):
                    x = sx + pw * bw + (ix + 0.5) * bw / gw
                    acc += _bilinear_torchvision(feat, y, x)
            out[:, ph, pw] = acc / count
    return out


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_matches_bilinear_reference(sampling_ratio, aligned):
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 3, 23, 31, generator=gen, dtype=torch.float64)
    boxes = torch.tensor(
        [
            [[0, 0, 30, 22], [0, 0, 7, 7], [23, 15, 30, 22], [5.3, 2.2, 19.7, 9.1]],  # whole map, corners, fractional
            [[-3, -2, 4, 5], [26, 18, 35, 27], [10, 10, 10, 10], [2, 3, 29, 4]],  # partly outside, empty, thin
        ],
        dtype=torch.float64,
    )
    out = roi_align(feats, boxes, 4, sampling_ratio, aligned)
    for b in range(2):
        for n in range(4):
            ref = _roi_align_reference(feats[b].numpy(), boxes[b, n].tolist(), 4, sampling_ratio, aligned)
            np.testing.assert_allclose(out[b, n].numpy(), ref, rtol=1e-10, atol=1e-12, err_msg=f"box {b},{n}")


def test_roi_align_over_partition_regions(photo256):
    """Partition boxes (tile-covering, sizes 8..256) with the adaptive grid, 8x8 as the official model."""
    part = gpstoken.partition(photo256, 32)
    feats = torch.randn(1, 2, 256, 256, dtype=torch.float64)
    boxes = torch.from_numpy(part.boxes.astype(np.float64))[None]
    out = roi_align(feats, boxes, 8)
    for n in range(0, 32, 7):
        ref = _roi_align_reference(feats[0].numpy(), part.boxes[n], 8, -1, True)
        np.testing.assert_allclose(out[0, n].numpy(), ref, rtol=1e-10, atol=1e-12)


def test_roi_align_gradient():
    feats = torch.randn(1, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 8.0], [2.0, 1.0, 6.0, 7.0]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, boxes, 3), (feats,))


# ----------------------------------------------------------------------------- normalization, refinement


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (1, 3)])
def test_tiled_group_norm(grid):
    torch.manual_seed(0)
    norm = TiledGroupNorm(64, 32).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 64, 12, 18, dtype=torch.float64) * 3 + 1
    assert norm.eps == 1e-6  # the reference's (official) eps
    ref = normalize_np(x, norm.weight, norm.bias, 32, grid)
    torch.testing.assert_close(norm(x, grid), ref, rtol=1e-10, atol=1e-10)


def test_tiled_group_norm_is_group_norm_on_one_tile():
    norm = TiledGroupNorm(64, 32).double()
    norm.eps = 0.0  # the only difference to torch's GroupNorm is where eps goes
    x = torch.randn(2, 64, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(norm(x), F.group_norm(x, 32, norm.weight, norm.bias, eps=0.0))


def test_refinement_is_the_official_reparameterization():
    g0 = torch.tensor([[[0.66, 0.04, 0.0, -0.97, 0.5], [0.02, 0.3, 0.2, 0.1, 0.99]]], dtype=torch.float64)
    delta = torch.tensor([[[0.3, -1.0, 0.7, 0.2, -0.4], [0.0, 2.0, -0.5, 1.5, 0.0]]], dtype=torch.float64)
    # official code: 1 / (1 + exp(-(-log(1/s - 1) + d))) and 2 / (1 + exp(-(-log(2/(1+v) - 1) + d))) - 1
    sig = 1 / (1 + torch.exp(-(-torch.log(1 / g0[..., :2] - 1) + delta[..., :2])))
    rest = 2 / (1 + torch.exp(-(-torch.log(2 / (1 + g0[..., 2:]) - 1) + delta[..., 2:]))) - 1
    torch.testing.assert_close(refine(g0, delta), torch.cat([sig, rest], -1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(refine(g0, torch.zeros_like(delta)), g0, rtol=1e-10, atol=1e-10)


def test_self_attention_equals_multihead_attention_with_packed_weights():
    torch.manual_seed(0)
    ours, ref = SelfAttention(32, 4), torch.nn.MultiheadAttention(32, 4, batch_first=True)
    ours.qkv.weight.data.copy_(ref.in_proj_weight)
    ours.qkv.bias.data.copy_(ref.in_proj_bias)
    ours.proj.load_state_dict(ref.out_proj.state_dict())
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)


def test_fresh_encoder_returns_g_init(photo256):
    model = GPSTokenizer("tiny").eval()  # the refinement head starts at zero, as the official model
    with torch.inference_mode():
        tokens = model.encode(photo256)
    torch.testing.assert_close(tokens.g, tokens.g_init, rtol=0, atol=1e-6)


def test_encoder_is_permutation_equivariant(tiny_model, photo256):
    part = gpstoken.partition(photo256, 32)
    x, _ = tiny_model.prepare(photo256)
    g0 = torch.from_numpy(part.g_init)[None]
    boxes = torch.from_numpy(part.boxes.astype(np.float32))[None]
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        g, f = tiny_model.encoder(x, g0, boxes)
        gp, fp = tiny_model.encoder(x, g0[:, perm], boxes[:, perm])
    torch.testing.assert_close(gp, g[:, perm], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fp, f[:, perm], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- gradients


def test_gradients_reach_every_parameter_and_g(photo256):
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny"), decoder=dataclasses.replace(preset("tiny").decoder, mid_attention=True))
    model = GPSTokenizer(cfg).train()
    x, rgb = model.prepare(photo256)
    part = model.partition(rgb, 64)[0]
    recon, g, f = model(x, torch.from_numpy(part.g_init)[None], torch.from_numpy(part.boxes.astype(np.float32))[None])
    g.retain_grad()
    F.mse_loss(recon, x).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"no gradient for {dead}"
    assert g.grad is not None and g.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("count", [16, 64, 128, 300])
def test_encode_decode_token_counts(tiny_model, photo256, count):
    with torch.inference_mode():
        tokens = tiny_model.encode(photo256, num_tokens=count)
        out = tiny_model.decode(tokens)
    assert len(tokens) == count and tokens.f.shape == (1, count, 16)
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()
    assert (tokens.g[..., :2] > 0).all() and (tokens.g[..., 2:].abs() < 1).all()


def test_batch_equals_single_images(tiny_model):
    images = np.stack([center_crop_resize(bundled_photo(n), 128) for n in ("astronaut", "coffee")])
    with torch.inference_mode():
        both = tiny_model.reconstruct(images, 32)
        one = tiny_model.reconstruct(images[1], 32)
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-4)


def test_input_forms_agree(tiny_model, photo256):
    with torch.inference_mode():
        ref = tiny_model.encode(photo256, 32).g
        as_uint8_tensor = tiny_model.encode(torch.tensor(photo256).permute(2, 0, 1), 32).g
        as_float = tiny_model.encode(torch.tensor(photo256).permute(2, 0, 1).float() / 127.5 - 1, 32).g
        as_list = tiny_model.encode([photo256], 32).g
    for other in (as_uint8_tensor, as_float, as_list):
        torch.testing.assert_close(other, ref)


def test_high_resolution_uses_tiles_and_official_merging(tiny_model):
    image = center_crop_resize(bundled_photo("astronaut"), 512)
    with torch.inference_mode():
        tokens = tiny_model.encode(image)
        out = tiny_model.decode(tokens)
    assert len(tokens) == 4 * 128 and len(tokens.tile_boxes) == 4 and tokens.grid == (2, 2)
    assert torch.bincount(tokens.tile_ids).tolist() == [128] * 4
    assert out.shape == (1, 3, 512, 512) and torch.isfinite(out).all()
    # tile-local -> image: the official adjust_gpstoken formulas for an np x np grid of equal tiles
    n = 2
    k = tokens.tile_ids.double()
    i, j = (k // n)[None], (k % n)[None]
    g = tokens.g.double()
    expected = torch.stack(
        [g[..., 0] / n, g[..., 1] / n, g[..., 2], -1 + (2 * j + g[..., 3] + 1) / n, -1 + (2 * i + g[..., 4] + 1) / n], -1
    )
    torch.testing.assert_close(tokens.image_g(g), expected, rtol=1e-12, atol=1e-12)
    # each tile was encoded exactly as a 256 image: tile 3 (bottom right) on its own gives the same tokens
    # (in float64: batched float32 convolutions differ from single ones by ~1e-4)
    model64 = copy.deepcopy(tiny_model).double()
    with torch.inference_mode():
        tiled, alone = model64.encode(image), model64.encode(image[256:, 256:], 128)
    torch.testing.assert_close(tiled.g[:, 384:], alone.g, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(tiled.f[:, 384:], alone.f, rtol=1e-9, atol=1e-10)


def test_per_tile_decoding_stitches_independent_tiles(photo256):
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny"), decode_mode="tiles")  # the official L256 mode
    model = GPSTokenizer(cfg).eval()
    image = center_crop_resize(bundled_photo("coffee"), 512)
    with torch.inference_mode():
        tokens = model.encode(image)
        out = model.decode(tokens)
        sel = (tokens.tile_ids == 1).nonzero().squeeze(1)
        # tile 1 (top right) on its own: dense reference splat at 64x64, then the CNN
        tile1 = model.decoder(gpstoken.splat_reference(tokens.g[:, sel], tokens.f[:, sel], (64, 64)))
    torch.testing.assert_close(out[:, :, :256, 256:], tile1, rtol=1e-4, atol=1e-4)


def _merged_test_model():
    """Small official-structure model (mid attention on) with 64-pixel tiles, random official-layout weights
    converted to ours, in float64."""
    cfg = TokenizerConfig(
        name="merged-test", tokens_per_tile=12, feature_channels=8, tile=64,
        encoder=dataclasses.replace(preset("tiny").encoder, depth=1),
        decoder=DecoderConfig(channels=16, channel_mult=(1, 2, 4), res_blocks=1, mid_attention=True, groups=8),
    )
    official = {k: v.double() for k, v in official_state_dict(cfg, seed=3).items()}
    model = GPSTokenizer(cfg).double().eval()
    model.load_weights(convert_official_state_dict(official, cfg))
    return cfg, official, model


def _random_tile_tokens(grid, per_tile, channels, tile, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ny, nx = grid
    n = ny * nx * per_tile
    g = torch.cat(
        [
            torch.rand(1, n, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.05,
            torch.rand(1, n, 1, generator=gen, dtype=torch.float64) * 1.6 - 0.8,
            torch.rand(1, n, 2, generator=gen, dtype=torch.float64) * 2 - 1,
        ],
        -1,
    )
    f = torch.randn(1, n, channels, generator=gen, dtype=torch.float64)
    tiles = tuple((j * tile, i * tile, (j + 1) * tile - 1, (i + 1) * tile - 1) for i in range(ny) for j in range(nx))
    index = torch.arange(ny * nx).repeat_interleave(per_tile)
    return Tokens(g=g, f=f, image_size=(ny * tile, nx * tile), tiles=tiles, tile_index=index)


def test_merged_decoding_equals_the_official_decoder_np():
    """2x2 merged decode == the official DecoderNP forward (per-tile interpolated statistics in every norm
    but the final one, which uses the whole map; mid attention per tile), written independently."""
    cfg, official, model = _merged_test_model()
    tokens = _random_tile_tokens((2, 2), cfg.tokens_per_tile, cfg.feature_channels, cfg.tile)
    with torch.inference_mode():
        ours = model.decode(tokens, mode="merged")
        # official token merging (sigma / np, x' = -1 + (2j + x + 1) / np), then one render of the whole map
        k = tokens.tile_ids.double()
        i, j = (k // 2)[None], (k % 2)[None]
        g = tokens.g
        merged = torch.stack([g[..., 0] / 2, g[..., 1] / 2, g[..., 2], -1 + (2 * j + g[..., 3] + 1) / 2, -1 + (2 * i + g[..., 4] + 1) / 2], -1)
        feature_map = gpstoken.splat_reference(merged, tokens.f, (32, 32), cfg.support)
        ref = decoder_np_forward(official, feature_map, 2, levels=3, res_blocks=1, groups=8)
        # the reference at np = 1 on one tile's tokens equals our single-tile decode
        one = tokens.keep((tokens.tile_ids == 3).nonzero().squeeze(1))
        single = model.decode_single(one.g, one.f, (64, 64))
        single_ref = decoder_np_forward(official, gpstoken.splat_reference(one.g, one.f, (16, 16), cfg.support), 1, 3, 1, 8)
    assert ours.shape == ref.shape == (1, 3, 128, 128)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(single, single_ref, rtol=1e-9, atol=1e-9)
    # the final norm matters: with per-tile statistics there (our earlier decoder) the test fails
    norm = model.decoder.norm_out
    norm.forward = lambda x, grid=(1, 1): TiledGroupNorm.forward(norm, x, (2, 2))
    with torch.inference_mode():
        per_tile_final = model.decode(tokens, mode="merged")
    assert (per_tile_final - ref).abs().max() > 1e-3


def test_decode_mode_argument_overrides_the_config():
    cfg, _, model = _merged_test_model()
    tokens = _random_tile_tokens((1, 2), cfg.tokens_per_tile, cfg.feature_channels, cfg.tile, seed=1)
    with torch.inference_mode():
        merged, tiles = model.decode(tokens, mode="merged"), model.decode(tokens, mode="tiles")
        default = model.decode(tokens)
        left = model.decode_single(tokens.g[:, :12], tokens.f[:, :12], (64, 64))
    assert cfg.decode_mode == "merged" and torch.equal(default, merged)
    torch.testing.assert_close(tiles[..., :64], left, rtol=1e-12, atol=1e-12)
    assert (merged - tiles).abs().max() > 1e-3  # the two modes really differ
    with pytest.raises(ValueError, match="decode mode must be one of merged, tiles"):
        model.decode(tokens, mode="stitched")


@pytest.mark.parametrize("size", [(256, 320), (200, 300), (96, 128)])
def test_non_square_sizes(tiny_model, size):
    rng = np.random.default_rng(0)
    image = center_crop_resize(bundled_photo("chelsea"), max(size))[: size[0], : size[1]]
    image = np.ascontiguousarray(image) if image.shape[:2] == size else rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    with torch.inference_mode():
        out = tiny_model.reconstruct(image)
    assert out.shape == (1, 3, *size) and torch.isfinite(out).all()


def test_token_editing(tiny_model, photo256):
    with torch.inference_mode():
        tokens = tiny_model.encode(photo256, 64)
        base = tiny_model.decode(tokens)
        # keeping every token in order changes nothing
        torch.testing.assert_close(tiny_model.decode(tokens.keep(list(range(64)))), base, rtol=0, atol=0)
        # adding a token with zero texture changes nothing: the splat is linear in f
        extra = Tokens(
            g=torch.cat([tokens.g, torch.tensor([[[0.2, 0.3, 0.5, 0.1, -0.2]]])], 1),
            f=torch.cat([tokens.f, torch.zeros(1, 1, 16)], 1),
            image_size=(256, 256),
        )
        torch.testing.assert_close(tiny_model.decode(extra), base, rtol=0, atol=0)
        # dropping half the tokens, or moving and scaling them, decodes to something else but finite
        dropped = tiny_model.decode(tokens.keep(torch.arange(64) % 2 == 0))
        moved = dataclasses.replace(tokens, g=tokens.g * torch.tensor([1.5, 1.5, 1.0, 0.9, 0.9]))
        for out in (dropped, tiny_model.decode(moved)):
            assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3


# ----------------------------------------------------------------------------- bad input


def test_bad_tokens_are_refused(tiny_model):
    g = torch.tensor([[[0.1, 0.1, 0.0, 0.0, 0.0]]])
    f = torch.zeros(1, 1, 16)
    with pytest.raises(ValueError, match="feature channels"):
        tiny_model.decode(Tokens(g=g, f=torch.zeros(1, 1, 32), image_size=(64, 64)))
    with pytest.raises(ValueError, match="NaN"):
        tiny_model.decode(Tokens(g=g * float("nan"), f=f, image_size=(64, 64)))
    with pytest.raises(ValueError, match="sigma"):
        tiny_model.decode(Tokens(g=g * 0, f=f, image_size=(64, 64)))
    with pytest.raises(ValueError, match=r"\(B, L, 5\)"):
        Tokens(g=torch.zeros(1, 1, 4), f=f, image_size=(64, 64))


def test_bad_images_are_refused(tiny_model, photo256):
    with pytest.raises(ImageError, match="share one size"):
        tiny_model.encode([photo256, photo256[:128]])
    with pytest.raises(ImageError, match=r"\[-1, 1\]"):
        tiny_model.encode(torch.rand(1, 3, 64, 64) * 255)
    with pytest.raises(ImageError, match="NaN"):
        tiny_model.encode(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(ImageError, match=r"\(B, 3, H, W\)"):
        tiny_model.encode(torch.zeros(1, 4, 64, 64))


# ----------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip_is_bit_identical(tiny_model, photo256, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    loaded = GPSTokenizer.from_pretrained(tmp_path / "m")
    alone = GPSTokenizer.from_pretrained(tmp_path / "m" / "model.safetensors")  # config from metadata
    with torch.inference_mode():
        ref = tiny_model.reconstruct(photo256, 32)
        for model in (loaded, alone):
            assert torch.equal(model.reconstruct(photo256, 32), ref)
    assert not list((tmp_path / "m").glob(".*tmp"))  # no temporary files left


def test_checkpoint_errors(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="no such"):
        GPSTokenizer.from_pretrained(tmp_path / "missing")

    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "trunc" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        GPSTokenizer.from_pretrained(tmp_path / "trunc")

    cfg = json.loads((folder / "config.json").read_text())
    cfg["encoder"]["depth"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="different saves"):
        GPSTokenizer.from_pretrained(folder)

    # a config that disagrees with the weights (no embedded copy to catch it first)
    from safetensors.torch import save_file

    (tmp_path / "mismatch").mkdir()
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(tmp_path / "mismatch" / "model.safetensors"))
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected \(\d+\): encoder.blocks.3"):
        GPSTokenizer.from_pretrained(tmp_path / "mismatch")

    # another model's file
    (tmp_path / "other").mkdir()
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(tmp_path / "other" / "model.safetensors"))
    (tmp_path / "other" / "config.json").write_text(tiny_model.config.to_json())
    with pytest.raises(CheckpointError, match="missing"):
        GPSTokenizer.from_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="not a gpstoken tokenizer config"):
        GPSTokenizer.from_pretrained(tmp_path / "other")


def test_failed_save_keeps_the_old_files(tiny_model, tmp_path, monkeypatch):
    folder = tiny_model.save_pretrained(tmp_path / "m")
    before = (folder / "model.safetensors").read_bytes()
    import safetensors.torch

    def full_disk(*args, **kwargs):
        with open(args[1], "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        GPSTokenizer("tiny").save_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------- official converter


def _ours_to_official(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "decoder" and parts[1] == "stages":  # our stage i is the official level 2 - i
        level = 2 - int(parts[2])
        rest = ".".join(parts[3:]).replace("blocks.", "block.").replace("shortcut", "nin_shortcut")
        return f"decoder.up.{level}.{rest}"
    for ours, theirs in [
        ("encoder.stem.conv_in.", "preprocess_img.0."),
        ("encoder.stem.blocks.0.", "preprocess_img.1."),
        ("encoder.stem.blocks.1.", "preprocess_img.2."),
        ("encoder.roi_proj.", "roialign_layer."),
        ("encoder.query_base", "gps_embed.weight"),
        ("encoder.query_mlp.", "gps_embed_layer."),
        ("encoder.to_delta.", "to_gps.0."),
        ("encoder.to_texture.", "to_gps.1."),
        ("encoder.blocks.", "attnblocks."),
        (".roi_pool.", ".roimlp."),
        (".norm_attn.", ".ln1."),
        (".attn.qkv.weight", ".attn1.in_proj_weight"),
        (".attn.qkv.bias", ".attn1.in_proj_bias"),
        (".attn.proj.", ".attn1.out_proj."),
        (".norm_mlp.", ".ln2."),
        ("decoder.mid_block1.", "decoder.mid.block_1."),
        ("decoder.mid_block2.", "decoder.mid.block_2."),
        ("decoder.mid_attn.", "decoder.mid.attn_1."),
    ]:
        name = name.replace(ours, theirs)
    return name


def test_converter_loads_an_official_layout_strictly(photo256):
    cfg = preset("tiny")
    official = official_state_dict(cfg)
    converted = convert_official_state_dict(official, cfg)
    model = GPSTokenizer(cfg)
    model.load_weights(converted)  # strict
    sd = model.state_dict()
    assert torch.equal(sd["encoder.blocks.2.attn.qkv.weight"], official["attnblocks.2.attn1.in_proj_weight"])
    assert torch.equal(sd["decoder.stages.0.upsample.conv.weight"], official["decoder.up.2.upsample.conv.weight"])
    assert torch.equal(sd["decoder.stages.2.blocks.0.shortcut.weight"], official["decoder.up.0.block.0.nin_shortcut.weight"])
    assert torch.equal(sd["encoder.query_base"], official["gps_embed.weight"])
    # every tensor, through an independent renaming (plain string replacements, not the converter's rules)
    for ours, tensor in converted.items():
        assert torch.equal(tensor, official[_ours_to_official(ours)]), ours
    assert len(converted) == len(official) - 2 * cfg.encoder.stem_blocks  # all but the unused temb_proj
    # an EMA-wrapper file converts to the same weights (the ema_model copy is used)
    wrapped = {**{f"ema_model.{k}": v for k, v in official.items()}, **{f"online_model.{k}": v * 0 for k, v in official.items()}}
    wrapped["step"] = torch.tensor(5)
    assert all(torch.equal(v, converted[k]) for k, v in convert_official_state_dict(wrapped, cfg).items())


def test_converter_reports_what_does_not_match():
    cfg = preset("tiny")
    official = official_state_dict(cfg)
    official["attnblocks.1.ln3.weight"] = official.pop("attnblocks.1.ln2.weight")
    official["decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    with pytest.raises(CheckpointError) as err:
        convert_official_state_dict(official, cfg)
    message = str(err.value)
    assert "attnblocks.1.ln3.weight" in message  # unknown official key
    assert "encoder.blocks.1.norm_mlp.weight" in message  # what is missing because of it
    assert "decoder.conv_out.weight (3, 32, 1, 1)" in message  # wrong shape
    # an l256 file given as m128
    with pytest.raises(CheckpointError, match="32 feature channels"):
        convert_official_state_dict(official_state_dict(dataclasses.replace(cfg, feature_channels=32)), cfg)


def test_official_checkpoint_in_from_pretrained_gets_a_hint(tmp_path):
    from safetensors.torch import save_file

    save_file(official_state_dict(preset("tiny")), str(tmp_path / "gpstoken_tiny.safetensors"))
    with pytest.raises(CheckpointError, match="convert-official"):
        GPSTokenizer.from_pretrained(tmp_path / "gpstoken_tiny.safetensors")


def test_refinement_stays_a_valid_gaussian_when_saturated():
    g0 = torch.tensor([[[0.5, 0.5, 0.0, 0.0, 0.0]]])
    for big in (60.0, -200.0):
        g = refine(g0, torch.full((1, 1, 5), big))
        assert (g[..., :2] > 0).all() and (g[..., 2].abs() < 1).all() and torch.isfinite(g).all()
