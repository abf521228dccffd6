"""The digits demo: data source, fixed split, the independent judge, the tokenizer preset, shipped models.

Floors are below the measured figures (stated next to each), so the tests fail on a real regression, not
on noise: the judge and the shipped models are deterministic, only the floors leave room for a retrain.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from gpstoken_core.partition import partition
from PIL import Image

from gpstoken.config import TokenizerConfig, preset
from gpstoken.generation import digits
from gpstoken.imagesets import DataError, list_images, read_image

SHIPPED_JUDGE_ACCURACY = 0.95  # measured 0.972 on digits:test (359 images)


# ----------------------------------------------------------------------------- images and split
def test_digit_images_are_rgb_32px_with_ten_labels():
    for split, count in (("train", 1438), ("test", 359), ("all", 1797)):
        images, labels = digits.digit_images(split)
        assert images.shape == (count, 32, 32, 3) and images.dtype == np.uint8, split
        assert labels.shape == (count,) and labels.dtype == np.int64, split
        assert set(labels.tolist()) == set(range(10)), split
        assert np.array_equal(images[..., 0], images[..., 2]), f"{split}: grey repeated into RGB"
    with pytest.raises(DataError, match="unknown digits split"):
        digits.digit_images("valid")


def test_digit_images_are_the_bicubic_upscale_of_sklearn_digits():
    from sklearn.datasets import load_digits

    raw = load_digits()
    images, labels = digits.digit_images("all")
    assert np.array_equal(labels, raw.target)
    for i in (0, 100, 1796):
        grey = np.rint(raw.images[i] * 255 / 16).astype(np.uint8)
        expected = np.asarray(Image.fromarray(grey).resize((32, 32), Image.BICUBIC))
        assert np.array_equal(images[i, :, :, 0], expected), f"image {i}"


def test_split_is_disjoint_complete_stratified_and_fixed():
    train, test = digits.split_indices()
    assert not set(train) & set(test)
    assert sorted([*train, *test]) == list(range(1797))
    _, labels = digits.digit_images("all")
    for c in range(10):
        n = int((labels == c).sum())
        assert int((labels[test] == c).sum()) == round(0.2 * n), f"class {c}: held-out share"
    digits.split_indices.cache_clear()
    again = digits.split_indices()
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test), "the split is not deterministic"


def test_digits_data_source_reads_the_split_images():
    names = list_images("digits:test")
    images, _ = digits.digit_images("test")
    assert len(names) == 359 and names[0] == "digits:test:0"
    assert np.array_equal(read_image(names[7]), images[7])
    assert list_images("digits:") == list_images("digits:train")  # the generators' data: the training split
    with pytest.raises(DataError, match="unknown digits split"):
        list_images("digits:validation")
    with pytest.raises(DataError, match="has 359 images"):
        read_image("digits:test:359")


# ----------------------------------------------------------------------------- the judge
def test_shipped_judge_recognizes_held_out_digits():
    judge = digits.load_judge()
    images, labels = digits.digit_images("test")
    accuracy = judge.accuracy(images, labels)
    assert accuracy >= SHIPPED_JUDGE_ACCURACY, f"judge accuracy on digits:test {accuracy:.3f}"
    assert accuracy == pytest.approx(judge.test_accuracy), "judge.json records another accuracy"
    for c in range(10):
        assert (judge.predict(images[labels == c]) == c).mean() >= 0.85, f"class {c}"
    features = judge.features(images[:5])
    assert features.shape == (5, digits.JUDGE_HIDDEN) and np.isfinite(features).all()


def test_judge_fails_when_trained_on_shuffled_labels():
    """The accuracy is earned: the same short training on permuted labels is at chance level."""
    images, labels = digits.digit_images("train")
    real = digits.train_judge(images, labels, iterations=60)
    shuffled = digits.train_judge(images, np.random.default_rng(0).permutation(labels), iterations=60)
    assert real.test_accuracy >= 0.9, real.test_accuracy  # measured 0.961
    assert shuffled.test_accuracy <= 0.2, shuffled.test_accuracy  # chance 0.1; measured 0.086


def test_judge_rejects_other_images_and_bad_files(tmp_path):
    judge = digits.load_judge()
    with pytest.raises(DataError, match=r"uint8 \(N, 32, 32, 3\)"):
        judge.predict(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(DataError, match="uint8"):
        judge.features(np.zeros((2, 32, 32, 3), np.float32))
    judge.save(tmp_path / "j")
    assert np.array_equal(digits.DigitsJudge.load(tmp_path / "j").predict(digits.digit_images("test")[0][:20]),
                          judge.predict(digits.digit_images("test")[0][:20]))  # fmt: skip
    (tmp_path / "j" / "judge.safetensors").unlink()
    with pytest.raises(DataError, match="judge.safetensors: missing"):
        digits.DigitsJudge.load(tmp_path / "j")
    info = json.loads((digits.SHIPPED / "judge" / "judge.json").read_text())
    assert info["format"] == digits.JUDGE_FORMAT and info["side"] == digits.JUDGE_SIDE


# ----------------------------------------------------------------------------- the tokenizer preset
def test_digits_preset_partitions_a_digit_into_16_regions_of_at_least_4px():
    cfg = preset("digits")
    assert (cfg.tile, cfg.tokens_per_tile, cfg.min_region) == (32, 16, 4)
    assert TokenizerConfig.from_json(cfg.to_json()) == cfg
    image = digits.digit_images("test")[0][0]
    part = partition(image, cfg.tokens_per_tile, lam=cfg.lam, min_size=cfg.min_region, tile=cfg.tile, threads=1)
    boxes = np.asarray(part.boxes)
    assert part.g_init.shape == (16, 5) and len(boxes) == 16
    sides = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1) + 1  # inclusive corners
    assert sides.min() >= cfg.min_region, sides
    assert int((sides[:, 0] * sides[:, 1]).sum()) == 32 * 32, "the regions cover the tile once"


# ----------------------------------------------------------------------------- the shipped tokenizer
def test_shipped_digits_tokenizer_keeps_digits_recognizable():
    """On 120 held-out digits: PSNR and the judge's accuracy on reconstructions vs on the originals
    (measured on all 359: 31.7 dB, accuracy 0.978 reconstructed vs 0.972 real)."""
    import torch

    from gpstoken import GPSTokenizer

    tok = GPSTokenizer.from_pretrained(digits.SHIPPED / "tokenizer").eval()
    assert tok.config == preset("digits")
    images, labels = digits.digit_images("test")
    images, labels = np.array(images[::3]), labels[::3]
    with torch.inference_mode():
        x = tok.reconstruct(images)
    recon = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    mse = ((recon.astype(np.float64) - images) ** 2).mean(axis=(1, 2, 3))
    mean_psnr = float(np.mean(10 * np.log10(255**2 / np.maximum(mse, 1e-10))))
    assert mean_psnr >= 29.0, f"reconstruction PSNR {mean_psnr:.2f} dB"
    judge = digits.load_judge()
    real, rebuilt = judge.accuracy(images, labels), judge.accuracy(recon, labels)
    assert rebuilt >= 0.95 * real, f"judge accuracy {rebuilt:.3f} on reconstructions vs {real:.3f} on real digits"


# ----------------------------------------------------------------------------- the shipped generator
GENERATOR_ACCURACY_FLOOR = 0.75  # chance is 0.1; measured 0.875 on these 40 images (0.914 on 500)


def test_shipped_digits_generator_draws_the_asked_class():
    """A CI-sized judged evaluation: 4 digits per class (two-stage, Heun 16 steps, CFG 1.5, seed 0; guidance
    interval and layout steps from the folder's sampler.json)."""
    from gpstoken.generation.evaluation import generate_per_class, judge_metrics
    from gpstoken.generation.pipeline import GPSGenerator

    gen = GPSGenerator.from_pretrained(digits.SHIPPED)
    assert gen.two_stage and gen.layout is not None and gen.num_classes == 10
    images, labels = generate_per_class(
        gen, list(range(10)), 4, seed=0, batch=40, progress=False, cfg_scale=1.5, sampler="heun", texture_steps=16
    )
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    report = judge_metrics(digits.load_judge(), images, labels)
    assert report["accuracy"] >= GENERATOR_ACCURACY_FLOOR, f"judge accuracy {report['accuracy']:.3f}: {report['per_class_accuracy']}"


def test_token_shard_sources_name_the_split():
    """`gpstoken encode-dataset digits:test` encodes exactly the held-out split (digits: is train)."""
    from gpstoken.generation.shards import DataError as ShardDataError
    from gpstoken.generation.shards import labeled_images

    for source, split in (("digits:", "train"), ("digits:train", "train"), ("digits:test", "test")):
        images, labels = digits.digit_images(split)
        found = labeled_images(source)
        assert found.labels == labels.tolist(), source
        assert np.array_equal(found.arrays, images), source
    with pytest.raises(ShardDataError, match="unknown digits split"):
        labeled_images("digits:valid")


def test_pipeline_picture_enlarges_small_images():
    """32x32 digits are drawn at 192 px per panel (nearest), so ellipses and captions fit."""
    from gpstoken.generation.pictures import PANEL_MIN, pipeline_picture
    from gpstoken.generation.pipeline import GPSGenerator

    result = GPSGenerator.from_pretrained(digits.SHIPPED).generate([5], seed=0)
    picture = np.asarray(pipeline_picture(result, 0, header="class 5").convert("RGB"))
    zoom = PANEL_MIN // digits.SIZE
    assert picture.shape[1] == 4 * PANEL_MIN + 3 * 4, picture.shape
    np.testing.assert_array_equal(picture[-PANEL_MIN:, -PANEL_MIN:], np.kron(result.images[0], np.ones((zoom, zoom, 1), np.uint8)))
