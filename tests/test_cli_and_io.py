"""The fit command, image loading and the ellipse drawing."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gpstoken_core.imageio import ImageError, load_image, to_rgb_uint8
from gpstoken.viz import gaussian_ellipse_points


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "gpstoken.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_fit_writes_picture_and_improves_psnr(tmp_path):
    result = run_cli("fit", "--size", "64", "--tokens", "64", "--steps", "60", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if "dB" in line}
    before = float(lines["PSNR  grid placement (least-squares colours)"].split()[-2])
    after = float(lines["PSNR  after optimizing through the splat op"].split()[-2])
    assert after > before + 1.0, result.stdout
    picture = Image.open(tmp_path / "o" / "fit.png")
    assert picture.width > 5 * 64 and picture.height > 64
    saved = np.load(tmp_path / "o" / "gaussians.npz")
    assert saved["optimized"].shape == (64, 5) and np.all(saved["optimized"][:, :2] > 0)


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such file"), (b"not an image at all", "not an image file"), ("truncated", "corrupt or truncated")],
)
def test_fit_bad_image_is_one_line_error(tmp_path, content, message):
    path = tmp_path / "in.png"
    if content == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:200])
    elif content is not None:
        path.write_bytes(content)
    result = run_cli("fit", "--image", str(path), "--steps", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_explains_fit(tmp_path):
    result = run_cli("fit", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--tokens" in result.stdout and "splat" in result.stdout


def test_images_of_every_mode_load_as_rgb_uint8(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    cases = {
        "grey.png": (Image.fromarray(grey), np.repeat(grey[..., None], 3, 2)),
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full((9, 7), 128, np.uint8)])), rgb),
        "palette.png": (Image.fromarray(rgb).convert("P"), None),
        "grey16.png": (Image.fromarray((grey.astype(np.uint16) * 257)), np.repeat(grey[..., None], 3, 2)),
    }
    for name, (im, expected) in cases.items():
        im.save(tmp_path / name)
        out = load_image(tmp_path / name)
        assert out.shape == (9, 7, 3) and out.dtype == np.uint8, name
        if expected is not None:
            np.testing.assert_array_equal(out, expected, err_msg=name)


def test_array_conversion_rules():
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[0.0, 1.0]]))[0, :, 0], [0, 255])
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[0, 65535]], np.uint16))[0, :, 1], [0, 255])
    with pytest.raises(ImageError, match="NaN"):
        to_rgb_uint8(np.array([[np.nan]]))
    with pytest.raises(ImageError, match="shape"):
        to_rgb_uint8(np.zeros((2, 2, 5)))


def test_ellipse_points_lie_on_the_one_sigma_contour():
    g = (0.3, 0.2, 0.6, 0.1, -0.2)
    w, h = 101, 51
    sx, sy, rho, mx, my = g
    for px, py in gaussian_ellipse_points(g, w, h):
        x, y = px / ((w - 1) / 2) - 1, py / ((h - 1) / 2) - 1
        a, b = (x - mx) / sx, (y - my) / sy
        mahalanobis = (a * a - 2 * rho * a * b + b * b) / (1 - rho * rho)
        assert math.isclose(mahalanobis, 1.0, rel_tol=1e-9)


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (no pixel data): what a decompression bomb shows
    the reader before it decodes anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [30000, 10000])  # past PIL's own bomb limit, and past only ours
def test_huge_images_are_one_line_errors_everywhere(tmp_path, side):
    from gpstoken.imagesets import read_image

    path = tmp_path / "huge.png"
    _png_header_only(path, side, side)
    with pytest.raises(ImageError, match="huge.png: .*(too large to decode safely|larger than the .* pixel limit)"):
        load_image(path)
    with pytest.raises(ImageError, match="huge.png"):
        read_image(str(path))  # the training / token-shard readers skip and count on ImageError
    # the runtime reads images with the same gpstoken_core.imageio.load_image
    result = subprocess.run([sys.executable, "-m", "gpstoken.cli", "reconstruct", str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2 and "huge.png" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
