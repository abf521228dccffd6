"""eval-generator: FID and judge metrics equal a direct computation on the same images; the CLI plugs a judge in."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpstoken.generation.config import preset
from gpstoken.generation.evaluation import evaluate_generator, generate_per_class
from gpstoken.generation.models import SiT
from gpstoken.generation.pipeline import GPSGenerator
from gpstoken.perceptual import frechet_distance
from gpstoken.tokenizer import GPSTokenizer
from gpstoken_core.imageio import bundled_photo, center_crop_resize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # so `--judge test_generation_eval:make_judge` imports this file
SAMPLE = {"sampler": "euler", "texture_steps": 1, "cfg_scale": 1.0}


class BrightnessJudge:
    """A stand-in judge: class 1 when the image is brighter than ``cut``; features are the mean colours."""

    def __init__(self, cut: float = 128.0):
        self.cut = cut

    def predict(self, images: np.ndarray) -> np.ndarray:
        return (images.reshape(len(images), -1).mean(1) > self.cut).astype(np.int64)

    def features(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1, 3).mean(1)


def make_judge(cut: str = "128") -> BrightnessJudge:
    return BrightnessJudge(float(cut))


class PooledColours(torch.nn.Module):
    """A stand-in for the Inception features: 4x4 average-pooled colours (48-d), images in [-1, 1]."""

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

@pytest.fixture(scope="module")
def generator_folder(tmp_path_factory, one_thread) -> Path:
    tok = GPSTokenizer.from_pretrained(ROOT / "gpstoken" / "weights" / "tiny")
    torch.manual_seed(0)
    sit = SiT(preset("tiny/onestage", num_classes=2, in_channels=5 + tok.config.feature_channels))
    with torch.no_grad():  # a non-zero output layer, so the images depend on the class
        sit.final_layer.linear.bias.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("gen") / "g"
    GPSGenerator(sit, tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ref")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(center_crop_resize(bundled_photo(name), 64)).save(folder / f"{name}.png")
    return folder


def test_metrics_equal_a_direct_computation(generator_folder, reference):
    gen = GPSGenerator.from_pretrained(generator_folder)
    ref = np.stack([np.asarray(Image.open(p)) for p in sorted(reference.glob("*.png"))])
    judge = BrightnessJudge(100.0)
    report, images, labels = evaluate_generator(
        gen, [0, 1], 2, reference=ref, inception=PooledColours(), judge=judge, seed=3, batch=3, progress=False, **SAMPLE
    )
    assert labels.tolist() == [0, 1, 0, 1] and images.shape == (4, 256, 256, 3)
    # the same images as generating them batch by batch with seeds 3, 4
    again, _ = generate_per_class(gen, [0, 1], 2, seed=3, batch=3, progress=False, **SAMPLE)
    assert np.array_equal(images, again)
    to_x = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    pool = PooledColours()
    want_fid = frechet_distance(pool(to_x(images)), pool(to_x(ref)))
    assert report["fid"] == pytest.approx(want_fid, rel=1e-6) and report["fid_reference_images"] == 3
    predicted = judge.predict(images)
    for c in (0, 1):
        assert report["judge"]["per_class_accuracy"][str(c)] == (predicted[labels == c] == c).mean()
    assert report["judge"]["accuracy"] == (predicted == labels).mean()
    assert report["judge"]["frechet_distance"] == pytest.approx(
        frechet_distance(torch.from_numpy(judge.features(images)), torch.from_numpy(judge.features(ref))), rel=1e-9
    )


def test_cli_plugs_a_judge_in_and_writes_report_and_samples(generator_folder, reference, tmp_path, capsys):
    from gpstoken.cli import main

    args = ["eval-generator", "--model", str(generator_folder), "--num-per-class", "1", "--sampler", "euler", "--steps", "1",
            "--cfg", "1", "--reference", str(reference), "--judge", "test_generation_eval:make_judge", "--judge-weights", "0",
            "--report", str(tmp_path / "r.json"), "--samples", str(tmp_path / "s")]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["judge"]["per_class_accuracy"] == {"0": 0.0, "1": 1.0}  # cut 0: every image is "class 1"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["class0_00000.png", "class1_00001.png"]
    capsys.readouterr()
    assert main(args[:9]) == 2  # nothing to measure
    assert "nothing to measure" in capsys.readouterr().err
    assert main([*args[:9], "--judge", "no_such_module:x"]) == 2
    assert "cannot load it" in capsys.readouterr().err
