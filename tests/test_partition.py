"""Partition (Alg. 1) and calibration (Alg. 2): the C++ module against the straightforward Python
implementation in partition_reference.py, invariants on real photos, constructed images with known
answers, and bad input."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpstoken_core import _gpstoken_partition as native
from gpstoken_core.imageio import ImageError, bundled_photo, center_crop_resize
from gpstoken_core.partition import calibrate, partition, priority_from_boxes, priority_from_mask

_spec = importlib.util.spec_from_file_location("partition_reference", Path(__file__).with_name("partition_reference.py"))
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"]
# Every photo scikit-image bundles without a download (grey ones included).
ALL_BUNDLED = PHOTOS + ["cat", "hubble_deep_field", "retina", "brick", "grass", "gravel", "moon", "coins"]


def photo(name: str, size: int = 256) -> np.ndarray:
    return center_crop_resize(bundled_photo(name), size)


def assert_valid_tiling(boxes: np.ndarray, height: int, width: int, min_size: int | None = None, case=""):
    cover = np.zeros((height, width), dtype=np.int32)
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height, f"{case}: box {(x0, y0, x1, y1)} outside"
        cover[y0 : y1 + 1, x0 : x1 + 1] += 1
        if min_size is not None:
            assert x1 - x0 + 1 >= min_size and y1 - y0 + 1 >= min_size, f"{case}: box below min_size"
    assert (cover == 1).all(), f"{case}: boxes overlap or leave gaps"


@pytest.mark.parametrize("name", ALL_BUNDLED)
def test_cpp_partition_equals_python_reference(name):
    image = photo(name)
    grey = reference.grey01(image)
    np.testing.assert_array_equal(native.grey_from_rgb(image), grey)
    for tokens in (16, 64, 128, 256):
        expected = reference.partition(grey, tokens)
        got = partition(image, tokens)
        np.testing.assert_array_equal(got.boxes, expected, err_msg=f"{name} {tokens} tokens")
        np.testing.assert_allclose(
            got.g_init, reference.boxes_to_gaussians(expected, 256, 256), rtol=1e-6, atol=1e-7
        )


@pytest.fixture
def portable_kernel():
    """Runs the test on the portable entropy kernel, then restores the run-time choice."""
    previous = native.use_simd(False)
    yield
    native.use_simd(previous)


def edge_image() -> np.ndarray:
    """Columns of multiples of a quarter histogram step (11/512, exact in binary): on a 64x64 region (no
    resize) the Sobel magnitudes land exactly on bin edges, and above the histogram's range where the
    columns jump, which is where binning can go wrong."""
    quarter = 11 / 512 / 4
    k = np.random.default_rng(3).integers(0, 40, 64).cumsum() % 200
    k[40:44] = [0, 300, 0, 300]  # magnitudes > 5.5: outside the histogram
    return np.tile(k * quarter, (64, 1))


def test_entropy_kernels_agree_bit_for_bit_and_with_reference(portable_kernel):
    """The AVX2 build (when this CPU has it) and the portable build give the same complexity to the bit,
    and both match numpy.histogram's binning (the reference) on magnitudes that sit exactly on bin edges."""
    rng = np.random.default_rng(1)
    greys = [reference.grey01(photo("astronaut")), rng.random((256, 256)), edge_image()]
    boxes = [(0, 0, 63, 63), (0, 0, 255, 255), (3, 10, 40, 17), (100, 100, 100, 100), (0, 0, 7, 200), (5, 9, 70, 12)]
    boxes += [tuple(int(v) for v in b) for b in rng.integers(0, 60, (20, 2)).repeat(2, 1) + np.r_[0, 0, 1, 1] * rng.integers(0, 190, (20, 4))]
    for grey in greys:
        for box in boxes:
            if box[2] >= grey.shape[1] or box[3] >= grey.shape[0]:
                continue
            native.use_simd(False)
            portable = native.region_complexity(grey, list(box), 2.5)
            native.use_simd(True)
            fast = native.region_complexity(grey, list(box), 2.5)
            assert fast == portable, f"box {box}: AVX2 {fast!r} != portable {portable!r}"
            if box in [(0, 0, 63, 63), (3, 10, 40, 17), (0, 0, 7, 200)]:
                assert portable == pytest.approx(reference.complexity(grey, box, 2.5), rel=1e-12), box


@pytest.mark.parametrize("simd", [False, True])
def test_histogram_bins_follow_numpy_at_every_edge(simd):
    """Each bin edge of the entropy histogram, the doubles just below and above it, the range's end,
    beyond it and NaN: the bin numpy.histogram puts each in (its edge corrections decide most of these)."""
    edges = np.linspace(-5.5, 5.5, 513)[256:]
    values = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf), [0.0, 5.5, 6.0, 1e300, np.nan]])
    values = np.concatenate([values, np.random.default_rng(0).random(1001) * 6])  # odd length: a scalar tail
    previous = native.use_simd(simd)
    try:
        got = native.histogram_bins(values)
    finally:
        native.use_simd(previous)
    expected = np.array([np.flatnonzero(np.histogram([v], bins=512, range=(-5.5, 5.5))[0]) for v in values], dtype=object)
    expected = np.array([e[0] if len(e) else 512 for e in expected])
    np.testing.assert_array_equal(got, expected)


def test_portable_kernel_partitions_like_the_reference(portable_kernel):
    image = photo("chelsea")
    grey = reference.grey01(image)
    for tokens in (64, 256):
        np.testing.assert_array_equal(partition(image, tokens).boxes, reference.partition(grey, tokens))


@pytest.mark.parametrize("name", PHOTOS)
def test_partition_tiles_photo_exactly_with_requested_count(name):
    for tokens in (1, 7, 100, 1024):
        p = partition(photo(name), tokens)
        assert len(p) == tokens and p.g_init.shape == (tokens, 5)
        assert_valid_tiling(p.boxes, 256, 256, min_size=8, case=f"{name} {tokens}")


def test_region_complexity_matches_reference_with_priority():
    image = photo("astronaut")
    grey = reference.grey01(image)
    pri = np.random.default_rng(0).random((256, 256))
    for box in [(0, 0, 255, 255), (3, 10, 40, 17), (100, 100, 100, 100)]:
        expected = reference.complexity(grey, box, 2.5, pri)
        assert native.region_complexity(grey, list(box), 2.5, pri) == pytest.approx(expected, rel=1e-12)


def test_flat_image_splits_into_equal_halves():
    flat = np.full((256, 256, 3), 90, dtype=np.uint8)
    for tokens in (2, 4, 16, 64):
        p = partition(flat, tokens)
        areas = {int((x1 - x0 + 1) * (y1 - y0 + 1)) for x0, y0, x1, y1 in p.boxes}
        assert areas == {256 * 256 // tokens}, f"{tokens}: {areas}"


def test_textured_quadrant_gets_most_tokens():
    image = np.full((256, 256, 3), 120, dtype=np.uint8)
    image[:128, 128:] = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    p = partition(image, 64)
    centers = (p.boxes[:, :2] + p.boxes[:, 2:]) / 2
    inside = np.sum((centers[:, 0] >= 128) & (centers[:, 1] < 128))
    assert inside >= 0.75 * 64, inside


def test_priority_box_pulls_tokens_into_it():
    image = photo("coffee")
    box = (0, 0, 63, 63)
    plain = partition(image, 128)
    focused = partition(image, 128, priority=priority_from_boxes((256, 256), [box]))

    def count_inside(p):
        c = (p.boxes[:, :2] + p.boxes[:, 2:]) / 2
        return int(np.sum((c[:, 0] <= 63) & (c[:, 1] <= 63)))

    assert count_inside(focused) >= count_inside(plain) + 8
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[:64, :64] = 255
    np.testing.assert_array_equal(priority_from_mask(mask), priority_from_boxes((256, 256), [box]))


def test_large_image_is_partitioned_per_tile():
    image = photo("astronaut", 512)
    p = partition(image)  # default: 128 per tile
    assert len(p) == 4 * 128 and len(p.tiles) == 4
    assert_valid_tiling(p.boxes, 512, 512, min_size=8)
    top_left = p.boxes[p.tile_index == 0]
    np.testing.assert_array_equal(top_left, partition(image[:256, :256], 128).boxes)
    odd = partition(center_crop_resize(bundled_photo("coffee"), 300)[:, :], 200)
    assert len(odd) == 200
    assert_valid_tiling(odd.boxes, 300, 300)


def test_batch_equals_single_images():
    images = np.stack([photo(n) for n in PHOTOS[:3]])
    batch = partition(images, 64)
    for img, p in zip(images, batch):
        np.testing.assert_array_equal(p.boxes, partition(img, 64).boxes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_returns_valid_partition(seed):
    p = partition(photo(PHOTOS[seed]), 128)
    g_cal, boxes = calibrate(p.g_init, (256, 256), s_min=8)
    assert len(boxes) == 128 and g_cal.shape == (128, 5)
    assert_valid_tiling(boxes, 256, 256, min_size=8)
    np.testing.assert_array_equal(boxes, reference.calibrate(p.g_init.astype(np.float64), 256, 256, 8))
    noisy = p.g_init.copy()
    noisy[:, 3:] += np.random.default_rng(seed).normal(0, 0.1, (128, 2)).astype(np.float32)
    g_cal, boxes = calibrate(noisy, (256, 256), s_min=8)
    assert_valid_tiling(boxes, 256, 256, min_size=8)
    np.testing.assert_array_equal(boxes, reference.calibrate(noisy.astype(np.float64), 256, 256, 8))


def test_image_kinds_are_converted():
    rgb = photo("astronaut", 64)
    grey = rgb[..., 0]
    rgba = np.dstack([rgb, np.full(grey.shape, 255, np.uint8)])
    np.testing.assert_array_equal(partition(rgba, 16).boxes, partition(rgb, 16).boxes)
    np.testing.assert_array_equal(partition(grey.astype(np.uint16) * 257, 16).boxes, partition(grey, 16).boxes)
    np.testing.assert_array_equal(partition(rgb / 255.0, 16).boxes, partition(rgb, 16).boxes)


BAD = {
    "too_small": (lambda: np.zeros((12, 40, 3), np.uint8), {"num_tokens": 2}, ImageError, "too small"),
    "zero_tokens": (lambda: np.zeros((64, 64, 3), np.uint8), {"num_tokens": 0}, ValueError, ">= 1 per tile"),
    "too_many_tokens": (lambda: np.zeros((64, 64, 3), np.uint8), {"num_tokens": 65}, ValueError, "at most 64"),
    "priority_shape": (lambda: np.zeros((64, 64, 3), np.uint8), {"num_tokens": 4, "priority": np.zeros((3, 3))}, ValueError, "priority must be"),
    "priority_nan": (lambda: np.zeros((64, 64, 3), np.uint8), {"num_tokens": 4, "priority": np.full((64, 64), np.nan)}, ValueError, "NaN"),
    "float_nan": (lambda: np.full((64, 64, 3), np.nan), {"num_tokens": 4}, ImageError, "NaN"),
    "five_channels": (lambda: np.zeros((64, 64, 5), np.uint8), {"num_tokens": 4}, ImageError, "shape"),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_partition_bad_input(case):
    make, kwargs, error, message = BAD[case]
    with pytest.raises(error, match=message):
        partition(make(), **kwargs)


def test_calibrate_bad_input():
    with pytest.raises(ValueError, match=r"\(L, 5\)"):
        calibrate(np.zeros((4, 4)), (64, 64))
    with pytest.raises(ValueError, match="more than"):
        calibrate(np.zeros((65, 5)), (64, 64), s_min=8)


def test_partition_module_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; from gpstoken_core import _gpstoken_partition as p; print(p.max_tokens(256, 256, 8))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "1024", out.stderr


def test_partition_cli_draws_picture(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "gpstoken.cli", "partition", "--tokens", "64", "--focus", "0,0,63,63",
         "--out", str(tmp_path / "map.png")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "map.png").stat().st_size > 1000 and "64 tokens" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "gpstoken.cli", "partition", "--focus", "0,0,900,9"], capture_output=True, text=True, cwd=tmp_path
    )
    assert bad.returncode == 2 and "not inside" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    broken = subprocess.run(
        [sys.executable, "-m", "gpstoken.cli", "partition", str(tmp_path / "broken.png")], capture_output=True, text=True, cwd=tmp_path
    )
    assert broken.returncode == 2 and "broken.png" in broken.stderr and "Traceback" not in broken.stderr
