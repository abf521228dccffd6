"""The tokenizer commands: demo (shipped model), reconstruct, eval, convert-official."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from official_layout import official_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

import gpstoken
from gpstoken.config import preset
from gpstoken_core.imageio import bundled_photo, center_crop_resize
from gpstoken_core.metrics import psnr, ssim

SHIPPED = Path(gpstoken.__file__).parent / "weights" / "tiny"


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gpstoken.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return gpstoken.GPSTokenizer("tiny").save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


def _reported(stdout: str) -> tuple[float, float]:
    m = re.search(r"PSNR ([\d.]+) dB\s+SSIM ([\d.]+)", stdout)
    assert m, stdout
    return float(m[1]), float(m[2])


def test_shipped_model_is_in_the_package_and_small():
    size = (SHIPPED / "model.safetensors").stat().st_size
    assert size <= 20 * 2**20
    model = gpstoken.GPSTokenizer.from_pretrained(SHIPPED)
    assert model.config.name == "tiny" and model.num_parameters() < 5_000_000


def test_demo_reconstructs_a_bundled_photo_with_the_shipped_model(tmp_path):
    result = run_cli("demo", "--out", tmp_path / "d", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    files = {p.name for p in (tmp_path / "d").iterdir()}
    assert {"reconstruction.png", "gaussians.png", "gaussians_init.png", "error.png", "compare.png", "tokens.safetensors"} <= files
    reported_psnr, reported_ssim = _reported(result.stdout)
    # the printed numbers are those of the written files
    image = np.asarray(Image.open(tmp_path / "d" / "input.png"))
    recon = np.asarray(Image.open(tmp_path / "d" / "reconstruction.png"))
    assert reported_psnr == pytest.approx(psnr(image, recon), abs=0.01)
    assert reported_ssim == pytest.approx(ssim(image, recon), abs=1e-4)
    assert reported_psnr > 16.0  # a trained model (17.8 dB when shipped), not noise (about 8 dB untrained)
    assert "latency" in result.stdout
    tokens = load_file(str(tmp_path / "d" / "tokens.safetensors"))
    assert tokens["g"].shape == (128, 5) and tokens["f"].shape == (128, 16)


def test_reconstruct_with_a_model_folder_at_high_resolution(tmp_path, random_model):
    result = run_cli("reconstruct", "--model", random_model, "--photo", "coffee", "--size", "512", "--out", tmp_path / "r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "512 tokens (4 tile(s))" in result.stdout
    assert Image.open(tmp_path / "r" / "reconstruction.png").size == (512, 512)


def test_reconstruct_errors_are_one_line(tmp_path, random_model):
    result = run_cli("reconstruct", "--model", tmp_path / "missing", cwd=tmp_path)
    assert result.returncode == 2 and "no such model" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "bad.png").write_bytes(b"nope")
    result = run_cli("reconstruct", tmp_path / "bad.png", "--model", random_model, cwd=tmp_path)
    assert result.returncode == 2 and "not an image file" in result.stderr
    assert not (tmp_path / "gpstoken_reconstruct").exists()  # nothing written for a failed run


def test_eval_prints_the_metrics_of_each_image(tmp_path, random_model):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("chelsea", "rocket"):
        Image.fromarray(center_crop_resize(bundled_photo(name), 160)).save(data / f"{name}.png")
    result = run_cli("eval", "--model", random_model, "--data", data, "--size", "128", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, _, values = [ln for ln in result.stdout.splitlines() if ln.startswith("|")]
    table = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in values.strip("|").split("|")]))
    assert table["images"] == "2" and table["tokens"] == "128"
    # independent check: reconstruct here and average
    model = gpstoken.GPSTokenizer.from_pretrained(random_model)
    scores = []
    with torch.inference_mode():
        for name in ("chelsea", "rocket"):
            image = center_crop_resize(np.asarray(Image.open(data / f"{name}.png")), 128)
            out = gpstoken.to_uint8(model.reconstruct(image))[0]
            scores.append((psnr(image, out), ssim(image, out)))
    assert float(table["PSNR"]) == pytest.approx(np.mean([s[0] for s in scores]), abs=0.01)
    assert float(table["SSIM"]) == pytest.approx(np.mean([s[1] for s in scores]), abs=1e-4)
    assert "LPIPS and rFID not computed" in result.stdout


def test_convert_official_command(tmp_path):
    save_file(official_state_dict(preset("tiny")), str(tmp_path / "official.safetensors"))
    result = run_cli("convert-official", tmp_path / "official.safetensors", "--config", "tiny", "--out", tmp_path / "conv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model = gpstoken.GPSTokenizer.from_pretrained(tmp_path / "conv")
    assert model.config == preset("tiny")
    result = run_cli("convert-official", tmp_path / "official.safetensors", "--config", "m128", "--out", tmp_path / "c2", cwd=tmp_path)
    assert result.returncode == 2 and "missing" in result.stderr and not (tmp_path / "c2").exists()
