"""GPSGenerator: layout -> Alg. 2 -> texture -> decode with tiny random models; calibrated layouts checked
against the Python Alg. 2 reference (tests/partition_reference.py) and a pixel-cover tiling check; seeds,
user layouts, the layout bank, the one-stage baseline, files and bad input."""

from __future__ import annotations

import numpy as np
import partition_reference as reference
import pytest
import torch
from generation_helpers import randomized, tiny_two_stage_parts

from gpstoken import partition
from gpstoken.checkpoint import CheckpointError
from gpstoken.generation import GPSGenerator, SiT, preset
from gpstoken.generation.layouts import LayoutBank, calibrate_layouts
from gpstoken_core.imageio import bundled_photo, center_crop_resize


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def parts():
    return tiny_two_stage_parts()


@pytest.fixture(scope="module")
def generator(parts):
    tokenizer, layout, texture = parts
    return GPSGenerator(texture, tokenizer, layout)


def boxes_from_gaussians(g: np.ndarray, size: int) -> np.ndarray:
    """Invert the official region -> Gaussian map (sigma = (x1 - x0) / W * 2/3, mu = 2 c / (W - 1) - 1)."""
    span = g[:, :2] * size * 1.5  # x1 - x0, y1 - y0
    total = (g[:, 3:5] + 1) * (size - 1)  # x0 + x1, y0 + y1
    lo, hi = (total - span) / 2, (total + span) / 2
    return np.rint(np.concatenate([lo, hi], axis=1)).astype(int)


def test_calibrated_layouts_satisfy_alg2_invariants(generator):
    rng = np.random.default_rng(0)
    raw = generator.sample_layouts([1, 5, 7], rng, calibrate=False)
    cal = generator.sample_layouts([1, 5, 7], np.random.default_rng(0))
    assert cal.shape == (3, 128, 5)
    for k in range(3):
        expected = reference.calibrate(raw[k].double().numpy(), 256, 256, 8)
        np.testing.assert_allclose(cal[k].numpy(), reference.boxes_to_gaussians(expected, 256, 256), atol=1e-6, err_msg=f"layout {k}")
        boxes = boxes_from_gaussians(cal[k].double().numpy(), 256)
        cover = np.zeros((256, 256), int)
        for x0, y0, x1, y1 in boxes:
            assert x1 - x0 + 1 >= 8 and y1 - y0 + 1 >= 8, f"layout {k}: region below s_min"
            cover[y0 : y1 + 1, x0 : x1 + 1] += 1
        assert (cover == 1).all(), f"layout {k}: regions overlap or leave gaps"
        assert (cal[k, :, 2] == 0).all() and (cal[k, :, :2] > 0).all()
    # a batch is calibrated layout by layout
    torch.testing.assert_close(calibrate_layouts(raw[1:2]), cal[1:2])


def test_pipeline_tokens_decode_to_images_and_seeds_repeat(generator):
    images = generator.sample([1, 2], seed=3, texture_steps=4)
    assert images.shape == (2, 256, 256, 3) and images.dtype == np.uint8
    a = generator.sample_tokens([1, 2], seed=3, texture_steps=4)
    b = generator.sample_tokens([1, 2], seed=3, texture_steps=4)
    c = generator.sample_tokens([1, 2], seed=4, texture_steps=4)
    torch.testing.assert_close(a.g, b.g, rtol=0, atol=0)
    torch.testing.assert_close(a.f, b.f, rtol=0, atol=0)
    assert not torch.equal(a.f, c.f) and not torch.equal(a.g_init, c.g_init)
    assert (a.g[..., :2] >= 1e-5).all() and (a.g[..., :2] <= 0.99999).all() and (a.g[..., 2].abs() <= 0.99999).all()
    np.testing.assert_array_equal(generator.decode(a), images)


def test_samplers_and_cfg_options_run(generator):
    base = generator.sample_tokens([4], seed=0, texture_steps=3, sampler="heun", cfg_scale=1.0)
    guided = generator.sample_tokens([4], seed=0, texture_steps=3, sampler="heun", cfg_scale=3.0, guidance=(0.0, 1.0))
    torch.testing.assert_close(base.g_init, guided.g_init)  # the layout does not depend on the texture CFG
    assert not torch.allclose(base.f, guided.f)
    # a guidance interval no step reaches leaves the conditional rows unguided: same result as no CFG
    euler = generator.sample_tokens([4], seed=0, texture_steps=2, sampler="euler", cfg_scale=1.0)
    outside = generator.sample_tokens([4], seed=0, texture_steps=2, sampler="euler", cfg_scale=3.0, guidance=(0.9, 1.0))
    torch.testing.assert_close(outside.f, euler.f, atol=1e-5, rtol=1e-5)


def test_given_layout_from_a_real_partition_is_used(generator):
    photo = center_crop_resize(bundled_photo("astronaut"), 256)
    g_init = partition(photo, 128).g_init  # (128, 5): structure from a real image
    tokens = generator.sample_tokens([3, 3], seed=1, texture_steps=3, g_init=g_init)
    np.testing.assert_array_equal(tokens.g_init[0].numpy(), g_init)
    np.testing.assert_array_equal(tokens.g_init[1].numpy(), g_init)
    cal = generator.sample_tokens([3], seed=1, texture_steps=3, g_init=g_init, calibrate=True)
    expected = reference.boxes_to_gaussians(reference.calibrate(g_init.astype(np.float64), 256, 256, 8), 256, 256)
    np.testing.assert_allclose(cal.g_init[0].numpy(), expected, atol=1e-6)


def test_layout_bank_and_one_stage_generators(parts, tmp_path):
    tokenizer, _, texture = parts
    rng = np.random.default_rng(0)
    stored = {c: torch.from_numpy(np.stack([partition(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8), 128).g_init])) for c in (2, 6)}
    bank = LayoutBank(stored, 10)
    gen = GPSGenerator(texture, tokenizer, layout_bank=bank)
    tokens = gen.sample_tokens([6, 2], seed=0, texture_steps=3)
    torch.testing.assert_close(tokens.g_init, torch.cat([stored[6], stored[2]]))
    with pytest.raises(ValueError, match="no layouts for class 3"):
        gen.sample_tokens([3], seed=0, texture_steps=3)

    onestage = randomized(SiT(preset("tiny/onestage", num_classes=10)), 3)
    one = GPSGenerator(onestage, tokenizer)
    images = one.sample([0], seed=0, texture_steps=3)
    assert images.shape == (1, 256, 256, 3) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="one-stage generator takes no g_init"):
        one.sample_tokens([0], g_init=stored[2][0], texture_steps=3)


def test_save_and_load_generator_folder(generator, tmp_path):
    generator.save_pretrained(tmp_path / "gen")
    loaded = GPSGenerator.from_pretrained(tmp_path / "gen")
    a = generator.sample_tokens([9], seed=2, texture_steps=3)
    b = loaded.sample_tokens([9], seed=2, texture_steps=3)
    torch.testing.assert_close(a.f, b.f, rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        generator.save_pretrained(tmp_path / "gen")


def test_a_generator_folder_carries_its_sampler_settings(parts, tmp_path):
    """sampler.json: the settings of calls that do not give them, saved, loaded, exported and used by the
    runtime; calls still override them; a bad file is named with its key."""
    import json

    from gpstoken_export.generator_export import export_generator
    from gpstoken_runtime import Generator

    from gpstoken_core.generation import OFFICIAL_SAMPLER_DEFAULTS

    tokenizer, layout, texture = parts
    own = {"sampler": "heun", "texture_steps": 3, "guidance": [0.0, 1.0], "layout_steps": 2}
    gen = GPSGenerator(texture, tokenizer, layout, sampler_defaults=own)
    official = GPSGenerator(texture, tokenizer, layout)
    assert official.sampler_defaults == OFFICIAL_SAMPLER_DEFAULTS
    # the folder's settings are used when a call gives none, and equal the same options given explicitly
    a = gen.sample_tokens([4], seed=1)
    b = official.sample_tokens([4], seed=1, sampler="heun", texture_steps=3, guidance=(0.0, 1.0), layout_steps=2)
    torch.testing.assert_close(a.f, b.f, rtol=0, atol=0)
    c = gen.sample_tokens([4], seed=1, sampler="sde", texture_steps=4, guidance=(0.2, 1.0), layout_steps=5)
    torch.testing.assert_close(c.f, official.sample_tokens([4], seed=1, texture_steps=4).f, rtol=0, atol=0)

    gen.save_pretrained(tmp_path / "gen")
    assert json.loads((tmp_path / "gen" / "sampler.json").read_text()) == {**OFFICIAL_SAMPLER_DEFAULTS, **own}
    official.save_pretrained(tmp_path / "official")
    assert not (tmp_path / "official" / "sampler.json").exists()  # official settings need no file
    loaded = GPSGenerator.from_pretrained(tmp_path / "gen")
    torch.testing.assert_close(loaded.sample_tokens([4], seed=1).f, a.f, rtol=0, atol=0)

    export = export_generator(loaded, tmp_path / "export")
    runtime = Generator.load(export)
    assert runtime.defaults == loaded.sampler_defaults
    np.testing.assert_allclose(runtime.sample_tokens([4], seed=1).f, a.f.numpy(), rtol=2e-5, atol=2e-5)

    (tmp_path / "gen" / "sampler.json").write_text(json.dumps({"samplr": "heun"}))
    with pytest.raises(CheckpointError, match=r"sampler.json: unknown key\(s\) \['samplr'\]"):
        GPSGenerator.from_pretrained(tmp_path / "gen")
    (tmp_path / "gen" / "sampler.json").write_text(json.dumps({"texture_steps": 0}))
    with pytest.raises(CheckpointError, match="sampler.json: texture_steps must be an integer >= 2"):
        GPSGenerator.from_pretrained(tmp_path / "gen")


def test_bad_input_gives_clear_errors(generator, parts, tmp_path):
    tokenizer, layout, texture = parts
    with pytest.raises(ValueError, match=r"unknown class id\(s\) \[10\]"):
        generator.sample_tokens([1, 10], texture_steps=3)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number >= 0"):
        generator.sample_tokens([1], cfg_scale=-1.0, texture_steps=3)
    with pytest.raises(ValueError, match="texture_steps must be an integer >= 2"):
        generator.sample_tokens([1], texture_steps=1)
    with pytest.raises(ValueError, match="layout_steps must be an integer >= 1"):
        generator.sample_tokens([1], layout_steps=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        generator.sample_tokens([1], sampler="dpm")
    bad = np.full((128, 5), 0.1, np.float32)
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="g_init contains NaN"):
        generator.sample_tokens([1], g_init=bad, texture_steps=3)
    bad = np.full((128, 5), 0.1, np.float32)
    bad[7, 1] = 0.0
    with pytest.raises(ValueError, match="g_init has sigma <= 0"):
        generator.sample_tokens([1], g_init=bad, texture_steps=3)
    with pytest.raises(ValueError, match="g_init has 64 tokens"):
        generator.sample_tokens([1], g_init=np.full((64, 5), 0.1, np.float32), texture_steps=3)
    # a generator whose token count does not fit the tokenizer
    small = SiT(preset("tiny/texture", num_tokens=64, num_classes=10))
    with pytest.raises(ValueError, match="makes 64 tokens, the tiny tokenizer decodes 128"):
        GPSGenerator(small, tokenizer, layout)
    folder = tmp_path / "mismatch"
    tokenizer.save_pretrained(folder / "tokenizer")
    small.save_pretrained(folder / "texture")
    with pytest.raises(CheckpointError, match="makes 64 tokens"):
        GPSGenerator.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="no such generator folder"):
        GPSGenerator.from_pretrained(tmp_path / "nothing")
    tokenizer.save_pretrained(tmp_path / "half" / "tokenizer")
    with pytest.raises(CheckpointError, match="no texture/ folder"):
        GPSGenerator.from_pretrained(tmp_path / "half")


def test_cli_generate_writes_pngs(generator, tmp_path, capsys):
    import argparse

    from PIL import Image

    from gpstoken.generation.cli import register

    generator.save_pretrained(tmp_path / "gen")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", "--model", str(tmp_path / "gen"), "--class", "4", "--steps", "3", "--seed", "5", "--out", str(tmp_path / "png")])
    args.run(args)
    image = np.asarray(Image.open(tmp_path / "png" / "class4_seed5_0000.png"))
    np.testing.assert_array_equal(image, generator.sample([4], seed=5, texture_steps=3)[0])
