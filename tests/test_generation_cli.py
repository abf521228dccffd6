"""`gpstoken generate` end to end, as a user runs it (subprocess of the installed entry point):

(a) a tiny two-stage pipeline trained here for a few dozen steps on tokens of bundled photos (the shipped tiny
    tokenizer encodes them; layout + texture SiTs learn the Linear-path velocity) -> save_pretrained ->
    `gpstoken generate --model DIR`;
(b) random-weight files in the official formats (an ``ema_model.*`` SiT-*-gs state dict with its 1x1-conv
    embedder and learn_sigma head, a numpy-only ``initg.pickle`` list indexed by class id) ->
    `gpstoken convert-official-layouts` + `gpstoken convert-official-generator --tokenizer --layouts` ->
    `gpstoken generate`.
Bad input goes through ``gpstoken.cli.main`` (the same code path, without a process start per case): exit 2,
one line on stderr, and no output left behind.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from gpstoken import GPSTokenizer, partition
from gpstoken.cli import main
from gpstoken.generation import GPSGenerator, SiT, channel_stats, preset, texture_targets, velocity_loss
from gpstoken.generation.config import OFFICIAL_MEANS, OFFICIAL_STDS
from gpstoken_core.imageio import bundled_photo, center_crop_resize

TINY = Path(__file__).resolve().parents[1] / "gpstoken" / "weights" / "tiny"
GPSTOKEN = Path(sys.executable).parent / "gpstoken"  # the installed console script, as a user calls it
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
PANEL = 256
STEPS = 30  # training steps per model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest on a shared machine
    return subprocess.run([str(GPSTOKEN), *map(str, args)], capture_output=True, text=True, timeout=120, env=env)


def cli_error(capsys, *args: str) -> str:
    """Run ``gpstoken ARGS`` in-process; assert exit 2 and a one-line message; return it."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{args}: exit {code}, stderr {err!r}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, f"{args}: not one line: {err!r}"
    return err


def check_outputs(out: Path, class_id: int, num: int) -> list[np.ndarray]:
    """The images and pipeline pictures ``generate`` promises: PNG files, 256x256 RGB, not constant."""
    names = sorted(p.name for p in out.glob("*.png"))
    expected = [f"class{class_id}_seed0_{k:04d}.png" for k in range(num)]
    assert names == expected, names
    images = []
    for name in names:
        image = np.asarray(Image.open(out / name))
        assert image.shape == (PANEL, PANEL, 3) and image.dtype == np.uint8, f"{name}: {image.shape}"
        assert image.std() > 2.0, f"{name}: nearly constant image (std {image.std():.2f})"
        picture = np.asarray(Image.open(out / "pipeline" / name).convert("RGB"))
        # four 256-px panels, 4-px gaps, a caption row and a header row above them
        assert picture.shape[1] == 4 * PANEL + 3 * 4 and picture.shape[0] > PANEL + 20, f"pipeline/{name}: {picture.shape}"
        # the last panel is the image itself, under the header and the caption rows
        np.testing.assert_array_equal(picture[-PANEL:, -PANEL:], image, err_msg=f"pipeline/{name}: last panel")
        images.append(image)
    assert sorted(p.name for p in (out / "pipeline").iterdir()) == expected
    return images


# ----------------------------------------------------------------------------- (a) trained tiny pipeline
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny generator trained briefly on the tokens of four photos, labels 0..3."""
    torch.manual_seed(0)
    tokenizer = GPSTokenizer.from_pretrained(TINY)
    photos = [center_crop_resize(bundled_photo(name), 256) for name in PHOTOS]
    labels = torch.arange(len(photos))
    with torch.no_grad():
        tokens = tokenizer.encode(np.stack(photos))
    g_init, g, f = tokens.g_init, tokens.g, tokens.f  # (4, 128, 5), (4, 128, 5), (4, 128, 16)
    data = texture_targets(g_init, g, f)
    mean, std = channel_stats(data)
    lmean, lstd = channel_stats(g_init)
    layout = SiT(preset("tiny/layout", num_classes=4, mean=lmean, std=lstd))
    texture = SiT(preset("tiny/texture", num_classes=4, mean=mean, std=std, cond_mean=lmean, cond_std=lstd))
    losses = {}
    for name, model, x1, cond in (("layout", layout, g_init, None), ("texture", texture, data, g_init)):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        model.train()
        history = []
        for _ in range(STEPS):
            loss = velocity_loss(model, model.normalize(x1), labels, cond)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())
        losses[name] = (np.mean(history[:5]), np.mean(history[-5:]))
        model.eval()
    folder = tmp_path_factory.mktemp("trained") / "generator"
    GPSGenerator(texture, tokenizer, layout).save_pretrained(folder)
    print(f"velocity loss, first 5 / last 5 steps: {losses}")
    return folder, losses


def test_generate_from_freshly_trained_tiny_pipeline(trained, tmp_path):
    folder, losses = trained
    for name, (first, last) in losses.items():
        # the velocity loss starts near 2 (unit noise + unit data); a few dozen steps bring it down measurably
        assert last < 0.9 * first, f"{name} model did not learn: loss {first:.3f} -> {last:.3f}"
    out = tmp_path / "out"
    result = run_cli("generate", "--model", folder, "--class", 2, "--num", 2, "--steps", 30, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "wrote 2 images of class 2" in result.stdout
    assert "texture sde" in result.stderr  # the progress bar over the sampling steps
    images = check_outputs(out, 2, 2)
    assert not np.array_equal(images[0], images[1]), "two samples of one batch are identical"
    # The CLI writes exactly what the Python API makes for the same seed and options.
    gen = GPSGenerator.from_pretrained(folder)
    expected = gen.generate([2, 2], seed=0, texture_steps=30)
    np.testing.assert_array_equal(np.stack(images), expected.images)
    # The texture stage refines the calibrated layout it was given.
    assert not torch.allclose(expected.tokens.g, expected.tokens.g_init)
    assert not torch.equal(expected.layout_sampled, expected.tokens.g_init), "Alg. 2 left the layout untouched"


# ----------------------------------------------------------------------------- (b) official formats
def official_state_dict(hidden=64, depth=2, channels=21, tokens=128, classes=1000, patch=1, seed=0) -> dict:
    """Random tensors named and shaped as the official SiT-*-gs EMA checkpoint (facts section 6), wrapped as
    the official EMA object stores them (ema_model.*, online_model.*, step, initted)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (classes + 1, hidden),
        "cond_embedder.0.weight": (hidden, 5),
        "cond_embedder.0.bias": (hidden,),
        "cond_embedder.2.weight": (hidden, hidden),
        "cond_embedder.2.bias": (hidden,),
        "final_layer.linear.weight": (2 * channels, hidden),  # learn_sigma
        "final_layer.linear.bias": (2 * channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        for key, shape in (
            ("attn.qkv", (3 * hidden, hidden)),
            ("attn.proj", (hidden, hidden)),
            ("mlp.fc1", (4 * hidden, hidden)),
            ("mlp.fc2", (hidden, 4 * hidden)),
            ("adaLN_modulation.1", (6 * hidden, hidden)),
        ):
            shapes[f"blocks.{i}.{key}.weight"] = shape
            shapes[f"blocks.{i}.{key}.bias"] = shape[:1]
    ema = {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}
    out = {f"ema_model.{k}": v for k, v in ema.items()}
    out.update({f"online_model.{k}": torch.zeros_like(v) for k, v in ema.items()})
    out["step"] = torch.tensor(1000)
    out["initted"] = torch.tensor(True)
    return out


def official_initg(classes: dict[int, list[np.ndarray]], num_classes: int = 1000) -> bytes:
    """initg.pickle as the official code reads it: indexed by class id, each entry a list of (128, >=5)
    numpy arrays (raw sigma_x, sigma_y, rho, mu_x, mu_y first)."""
    return pickle.dumps([classes.get(c, []) for c in range(num_classes)])


def real_layouts(count: int, extra_columns: int = 2) -> list[np.ndarray]:
    out = []
    for k, name in enumerate(PHOTOS[:count]):
        g = partition(center_crop_resize(bundled_photo(name), 256), 128).g_init.astype(np.float32)
        out.append(np.concatenate([g, np.full((128, extra_columns), k, np.float32)], axis=1))
    return out


def write_yaml(path: Path, means, stds) -> Path:
    path.write_text(
        "model: SiT-XL/2-gs\n"
        f"pretrained_gpstoken_means: [{', '.join(map(str, means))}]\n"
        f"pretrained_gpstoken_stds: [{', '.join(map(str, stds))}]\n"
    )
    return path


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    save_file(official_state_dict(), root / "generator.safetensors")
    (root / "initg.pickle").write_bytes(official_initg({0: real_layouts(2), 7: real_layouts(3)}))
    write_yaml(root / "gpstoken_generator.yaml", OFFICIAL_MEANS, OFFICIAL_STDS)
    return root


def test_generate_from_converted_official_files(official_files, tmp_path, capsys):
    root = official_files
    bank = tmp_path / "layouts.safetensors"
    # the converters run in-process (gpstoken.cli.main, the entry point's function): a process start costs
    # seconds on a busy machine; `generate` below runs as its own process
    assert main(["convert-official-layouts", str(root / "initg.pickle"), "--out", str(bank)]) == 0
    assert "5 layouts, 2 classes, 128 tokens" in capsys.readouterr().out
    folder = tmp_path / "generator"
    code = main([
        "convert-official-generator", str(root / "generator.safetensors"), "--out", str(folder), "--heads", "4",
        "--config", str(root / "gpstoken_generator.yaml"), "--tokenizer", str(TINY), "--layouts", str(bank),
    ])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "depth 2, width 64, 128 tokens x 21 channels" in text and "layout bank of 5" in text, text
    assert sorted(p.name for p in folder.iterdir()) == ["layout_bank.safetensors", "texture", "tokenizer"]

    out = tmp_path / "out"
    result = run_cli("generate", "--model", folder, "--class", 7, "--num", 3, "--batch", 2, "--steps", 12, "--out", out)
    assert result.returncode == 0, result.stderr
    images = check_outputs(out, 7, 3)
    # each g_init comes from the bank unchanged (the official code calibrates nothing); the converted model
    # kept the official head: the first 21 of its 42 outputs
    gen = GPSGenerator.from_pretrained(folder)
    assert gen.texture.config.learn_sigma and gen.texture.config.in_channels == 21
    first = gen.generate([7, 7], seed=0, texture_steps=12)  # batch 0 of --batch 2
    second = gen.generate([7], seed=1, texture_steps=12)  # batch 1 uses seed + 1
    np.testing.assert_array_equal(np.stack(images), np.concatenate([first.images, second.images]))
    stored = {tuple(a[:, :5].ravel()) for a in real_layouts(3)}
    for g in torch.cat([first.tokens.g_init, second.tokens.g_init]):
        assert tuple(g.numpy().ravel()) in stored, "a g_init that is not one of class 7's stored layouts"


# ----------------------------------------------------------------------------- bad input
def test_generate_bad_input_one_line_errors_nothing_written(trained, official_files, tmp_path, capsys):
    folder, _ = trained
    out = tmp_path / "out"
    cases = {
        "unknown class id(s) [4]": ("--class", 4),
        "unknown class id -1": ("--class", -1),
        "cfg_scale must be a finite number >= 0": ("--class", 0, "--cfg", -0.5),
        "--steps must be >= 1": ("--class", 0, "--steps", 0),
        "--steps must be >= 2 for the SDE": ("--class", 0, "--steps", 1),
        "--num must be >= 1": ("--class", 0, "--num", 0),
    }
    for message, args in cases.items():
        err = cli_error(capsys, "generate", "--model", folder, *args, "--out", out)
        assert message in err, f"{args}: {err}"
        assert not out.exists(), f"{args}: left {out}"
    # without --model the shipped digits demo (10 classes) answers: class 10 is unknown to it
    assert "unknown class id(s) [10]" in cli_error(capsys, "generate", "--class", 10, "--out", out)
    assert "no such generator folder" in cli_error(capsys, "generate", "--model", tmp_path / "none", "--class", 0, "--out", out)
    out.mkdir()
    (out / "keep.png").write_bytes(b"x")
    assert "exists and is not empty" in cli_error(capsys, "generate", "--model", folder, "--class", 0, "--out", out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.png"]

    # a generator folder whose texture model does not fit the tokenizer (8 feature channels vs 16; 64 tokens)
    for name, overrides, message in (
        ("channels", {"in_channels": 13}, "makes 8 feature channels, the tiny tokenizer expects 16"),
        ("tokens", {"num_tokens": 64}, "makes 64 tokens, the tiny tokenizer decodes 128"),
    ):
        bad = tmp_path / name
        GPSTokenizer.from_pretrained(TINY).save_pretrained(bad / "tokenizer")
        SiT(preset("tiny/texture", num_classes=4, **overrides)).save_pretrained(bad / "texture")
        err = cli_error(capsys, "generate", "--model", bad, "--class", 0, "--out", tmp_path / f"out_{name}")
        assert message in err, err
        assert not (tmp_path / f"out_{name}").exists()

    # a class the bank has no layout for fails inside the sampling loop: the temporary folder goes away
    bank = tmp_path / "bank.safetensors"
    assert main(["convert-official-layouts", str(official_files / "initg.pickle"), "--out", str(bank)]) == 0
    conv = tmp_path / "official"
    assert main(["convert-official-generator", str(official_files / "generator.safetensors"), "--out", str(conv),
                 "--heads", "4", "--tokenizer", str(TINY), "--layouts", str(bank)]) == 0  # fmt: skip
    capsys.readouterr()
    err = cli_error(capsys, "generate", "--model", conv, "--class", 3, "--num", 2, "--steps", 3, "--out", tmp_path / "o3")
    assert "the layout bank has no layouts for class 3" in err
    assert not (tmp_path / "o3").exists() and not list(tmp_path.glob(".o3.tmp-*")), "half-written output left"


def test_converters_refuse_bad_official_files(tmp_path, capsys):
    # layouts with NaN, or sigma <= 0
    for name, row, column, value, message in (("nan", 3, 4, np.nan, "contains NaN"), ("sigma", 9, 0, 0.0, "sigma <= 0")):
        layouts = real_layouts(1)
        layouts[0][row, column] = value
        path = tmp_path / f"{name}.pickle"
        path.write_bytes(official_initg({2: layouts}))
        err = cli_error(capsys, "convert-official-layouts", path, "--out", tmp_path / f"{name}.safetensors")
        assert message in err and "class 2" in err, err
        assert not (tmp_path / f"{name}.safetensors").exists()

    # a pickle that tries to run code: refused before anything runs
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps([[Evil()]]))
    err = cli_error(capsys, "convert-official-layouts", evil, "--out", tmp_path / "evil.safetensors")
    assert "refused global" in err and "system" in err, err
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()

    # an official file of another architecture: the image-latent SiT-XL/2 (4 channels, 2x2 patches)
    latent = tmp_path / "sit_xl_2.safetensors"
    save_file(official_state_dict(channels=4, patch=2), latent)
    err = cli_error(capsys, "convert-official-generator", latent, "--out", tmp_path / "latent", "--heads", 4)
    assert "patch size 2x2" in err, err
    # a token SiT whose 64 tokens do not fit the 128-token tokenizer: nothing written
    small = tmp_path / "small.safetensors"
    save_file(official_state_dict(tokens=64), small)
    err = cli_error(capsys, "convert-official-generator", small, "--out", tmp_path / "small", "--heads", 4, "--tokenizer", TINY)
    assert "makes 64 tokens" in err, err
    assert not (tmp_path / "latent").exists() and not (tmp_path / "small").exists()


def test_generate_help_explains_the_pipeline(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--class N", "--num K", "--model", "--cfg", "--sampler {sde,euler,heun}", "calibrat", "250", "pipeline/"):
        assert needle in text, f"--help lacks {needle!r}"


def test_generate_defaults_to_the_shipped_digits_generator(tmp_path):
    """`gpstoken generate --class 3 --num 2` works offline on a fresh install: the shipped digits demo."""
    from PIL import Image

    from gpstoken.generation import shipped_generator_folder

    assert shipped_generator_folder() is not None
    out = tmp_path / "digits"
    proc = subprocess.run([sys.executable, "-m", "gpstoken.cli", "generate", "--class", "3", "--num", "2", "--sampler", "heun",
                           "--steps", "8", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    images = sorted(out.glob("class3_seed0_*.png"))
    assert len(images) == 2 and len(list((out / "pipeline").glob("*.png"))) == 2
    pixels = np.asarray(Image.open(images[0]))
    assert pixels.shape == (32, 32, 3) and pixels.std() > 10  # a 32x32 digit, not a flat image
