"""The slim runtime: numpy + ONNX Runtime, no torch; same results as the torch model; clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gpstoken_export.export import export_model
from PIL import Image

import gpstoken
from gpstoken_core.imageio import bundled_photo, center_crop_resize

SHIPPED = Path(gpstoken.__file__).parent / "weights" / "tiny"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    model = gpstoken.GPSTokenizer.from_pretrained(SHIPPED)
    return export_model(model, tmp_path_factory.mktemp("exp") / "tiny")


@pytest.fixture(scope="module")
def photos():
    return np.stack([center_crop_resize(bundled_photo(n), 256) for n in ("coffee", "chelsea", "rocket")])


def test_runtime_runs_with_torch_blocked_and_matches_torch(exported, photos, tmp_path):
    np.save(tmp_path / "in.npy", photos)
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from gpstoken_runtime import Tokenizer
tok = Tokenizer.load({str(exported)!r})
tokens = tok.encode(np.load({str(tmp_path / "in.npy")!r}))
np.savez({str(tmp_path / "out.npz")!r}, g=tokens.g, f=tokens.f, images=tok.decode(tokens))
assert "torch" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = np.load(tmp_path / "out.npz")
    model = gpstoken.GPSTokenizer.from_pretrained(SHIPPED)
    with torch.inference_mode():
        tokens = model.encode(photos)
        ref = gpstoken.to_uint8(model.decode(tokens))
    np.testing.assert_allclose(out["g"], tokens.g.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["f"], tokens.f.numpy(), rtol=1e-4, atol=1e-3)
    diff = np.abs(out["images"].astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # rounding of a few pixels at most


def test_sessions_stop_spinning_after_each_run_unless_asked_and_give_the_same_images(exported, photos):
    # the encoder's and decoder's pools run one after the other: idle spinning of one slowed the other
    from gpstoken_runtime import Tokenizer

    stopping, spinning = Tokenizer.load(exported), Tokenizer.load(exported, stop_spinning=False)
    for graph in ("encoder", "decoder"):
        assert stopping.graphs[graph].session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
        with pytest.raises(Exception):  # ONNX Runtime's default: the entry is absent
            spinning.graphs[graph].session.get_session_options().get_session_config_entry("session.force_spinning_stop")
    np.testing.assert_array_equal(stopping.reconstruct(photos[:1]), spinning.reconstruct(photos[:1]))


def test_cpu_runs_batches_in_chunks_of_max_batch_with_the_same_results(exported, photos):
    from gpstoken_runtime import Tokenizer

    def record(tok):
        sizes = []
        for name, graph in tok.graphs.items():
            run = graph.run
            graph.run = lambda feeds, run=run, name=name: sizes.append((name, len(feeds["g" if name != "encoder" else "image"]))) or run(feeds)
        return sizes

    default, pairs, whole = Tokenizer.load(exported), Tokenizer.load(exported, max_batch=2), Tokenizer.load(exported, max_batch=8)
    assert default.max_batch == 1  # ONNX Runtime on the CPU: one image per run
    calls = {k: record(t) for k, t in (("default", default), ("pairs", pairs), ("whole", whole))}
    out = {k: t.reconstruct(photos) for k, t in (("default", default), ("pairs", pairs), ("whole", whole))}
    decoder = [n for n in default.graphs if n != "encoder"][0]
    assert calls["default"] == [("encoder", 1)] * 3 + [(decoder, 1)] * 3
    assert calls["pairs"] == [("encoder", 2), ("encoder", 1), (decoder, 2), (decoder, 1)]
    assert calls["whole"] == [("encoder", 3), (decoder, 3)]
    for k in ("default", "pairs"):
        assert out[k].shape == out["whole"].shape
        assert np.abs(out[k].astype(int) - out["whole"].astype(int)).max() <= 1
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="max_batch"):
            Tokenizer.load(exported, max_batch=bad)


def test_cpu_runtime_rewrites_wide_convolutions_as_winograd(exported, photos):
    from gpstoken_runtime import Tokenizer
    from gpstoken_runtime.backends.onnxruntime import winograd_channels

    default, off, wide = Tokenizer.load(exported), Tokenizer.load(exported, winograd=False), Tokenizer.load(exported, winograd=16)
    assert default.graphs["encoder"].winograd_convolutions == 0  # the shipped model's stem has 32 channels
    assert default.graphs["decoder"].winograd_convolutions == 8  # its two 128-channel blocks at 64x64
    assert all(g.winograd_convolutions == 0 for g in off.graphs.values())
    counts = {name: g.winograd_convolutions for name, g in wide.graphs.items()}
    assert counts["encoder"] >= 1 and counts["decoder"] > 8, counts  # the stem's 32-channel convolutions too
    ref = off.reconstruct(photos[:2])
    for tok in (default, wide):
        assert np.abs(tok.reconstruct(photos[:2]).astype(int) - ref.astype(int)).max() <= 1
    # a tile of another size: the rewritten stem computes its tile grid from the input's shape
    small = np.ascontiguousarray(photos[0][:200, :136])
    a, b = off.encode(small), wide.encode(small)
    np.testing.assert_allclose(b.g, a.g, rtol=0, atol=1e-3)
    np.testing.assert_allclose(b.f, a.f, rtol=0, atol=1e-3 * np.abs(a.f).max())

    manifest = dict(default.manifest)
    assert winograd_channels(manifest, "cpu", None) == winograd_channels(manifest, "cpu", True) == 128
    assert winograd_channels(manifest, "cpu", False) is None and winograd_channels(manifest, "cpu", 64) == 64
    assert winograd_channels(manifest, "cuda", None) is None and winograd_channels({**manifest, "dtype": "float16"}, "cpu", None) is None
    assert winograd_channels({**manifest, "decoder_convolutions": "winograd F(4x4,3x3) from 128 channels"}, "cpu", True) is None
    for bad, match in (({**manifest, "dtype": "float16"}, "float16"), ({**manifest, "precision": "int8"}, "int8")):
        with pytest.raises(ValueError, match=match):
            winograd_channels(bad, "cpu", True)
    with pytest.raises(ValueError, match="CPU"):
        winograd_channels(manifest, "cuda", 64)
    with pytest.raises(ValueError, match="winograd must be"):
        Tokenizer.load(exported, winograd="yes")
    with pytest.raises(ValueError, match="onnxruntime backend"):
        Tokenizer.load(exported, backend="tensorrt", winograd=True)


REPO = Path(__file__).resolve().parents[1]


def test_runtime_only_wheel_needs_neither_torch_nor_gpstoken(exported, photos, tmp_path):
    """`pip install ./runtime` builds a wheel without torch in its requirements whose reconstructions
    equal the full install's, with torch, the gpstoken package and scikit-image all unimportable."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO / "runtime")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("gpstoken_runtime-*.whl")
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip().lower() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not any(r.startswith("torch") for r in requires), requires
    assert any(r.startswith("onnxruntime") for r in requires)
    assert any(n.startswith("gpstoken_core/_gpstoken_partition") for n in names), names
    assert not any(n.startswith(("gpstoken/", "gpstoken_export/")) for n in names)  # no clash with the full package
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    np.save(tmp_path / "in.npy", photos[:2])
    Image.fromarray(photos[0]).save(tmp_path / "p.png")
    script = f"""
import sys
sys.path.insert(0, {str(tmp_path / "site")!r})
# a development (editable) install redirects imports ahead of sys.path: only the wheel may answer here
sys.meta_path = [f for f in sys.meta_path if "ScikitBuildRedirectingFinder" not in type(f).__name__]
for blocked in ("torch", "gpstoken", "gpstoken_export", "skimage"):
    sys.modules[blocked] = None
import numpy as np
import gpstoken_runtime
assert gpstoken_runtime.__file__.startswith({str(tmp_path / "site")!r}), gpstoken_runtime.__file__
from gpstoken_runtime import Tokenizer
tok = Tokenizer.load({str(exported)!r})
np.save({str(tmp_path / "out.npy")!r}, tok.reconstruct(np.load({str(tmp_path / "in.npy")!r})))
from gpstoken_runtime.cli import main
sys.exit(main(["reconstruct", {str(tmp_path / "p.png")!r}, "--model", {str(exported)!r}, "--out", {str(tmp_path / "r.png")!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "PSNR/SSIM need scikit-image" in proc.stdout and (tmp_path / "r.png").exists()
    from gpstoken_runtime import Tokenizer

    reference = Tokenizer.load(exported).reconstruct(photos[:2])  # the full install's runtime
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), reference)


def test_runtime_cli(exported, tmp_path):
    Image.fromarray(center_crop_resize(bundled_photo("astronaut"), 300)).save(tmp_path / "a.png")
    proc = subprocess.run(
        [sys.executable, "-m", "gpstoken_runtime.cli", "reconstruct", str(tmp_path / "a.png"), "--model", str(exported), "--out", str(tmp_path / "r.png")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "PSNR" in proc.stdout and Image.open(tmp_path / "r.png").size == (256, 256)


def test_bad_exports_and_inputs(exported, tmp_path, photos):
    from gpstoken_runtime import ExportError, Tokenizer

    with pytest.raises(ExportError, match="no such export folder"):
        Tokenizer.load(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        Tokenizer.load(broken)
    manifest = json.loads((exported / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ExportError, match="'version' is 99"):
        Tokenizer.load(broken)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    data = (broken / "decoder.onnx").read_bytes()
    (broken / "decoder.onnx").write_bytes(data[: len(data) // 2])  # damaged, or from another export
    with pytest.raises(ExportError, match="decoder.onnx: its SHA-256 differs"):
        Tokenizer.load(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(ExportError, match="manifest.json: missing"):
        Tokenizer.load(broken)

    tok = Tokenizer.load(exported)
    from gpstoken_core.imageio import ImageError

    small = tok.encode(photos[0, :128, :128])  # any size encodes (one 128x128 tile); decoding needs its graph
    with pytest.raises(ExportError, match=r"no decoder for 128x128 images.*gpstoken export --sizes 128x128"):
        tok.decode(small)
    with pytest.raises(ImageError, match="share one size"):
        tok.encode([photos[0], photos[0, :100]])
    tokens = tok.encode(photos[:1])
    tokens.f[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tok.decode(tokens)


@pytest.fixture(scope="module")
def exported_large(tmp_path_factory) -> Path:
    model = gpstoken.GPSTokenizer.from_pretrained(SHIPPED)
    return export_model(model, tmp_path_factory.mktemp("exp") / "large", sizes=[(256, 256), (512, 512), (400, 600)])


@pytest.mark.parametrize("size", [(512, 512), (400, 600)])
def test_runtime_handles_large_images_like_the_library(exported_large, size):
    """Images of several tiles (4 x 256 and 6 x 200x200): the runtime partitions, encodes per tile and
    decodes in both modes as GPSTokenizer does (per-tile graphs and the merged graph of the export)."""
    from gpstoken_core.manifest import read_manifest
    from gpstoken_runtime import Tokenizer

    names = set(read_manifest(exported_large)["files"])
    assert {"encoder", "decoder", "decoder_512x512_grid2x2", "decoder_600x400_grid3x2", "decoder_200x200"} == names
    images = np.stack([center_crop_resize(bundled_photo(n), size) for n in ("coffee", "astronaut")])
    model = gpstoken.GPSTokenizer.from_pretrained(SHIPPED)
    tok = Tokenizer.load(exported_large)
    tokens = tok.encode(images)
    with torch.inference_mode():
        ref_tokens = model.encode(images)
    assert tokens.image_size == size and len(tokens.tiles) == (4 if size == (512, 512) else 6)
    np.testing.assert_array_equal(tokens.tile_index, ref_tokens.tile_ids.numpy())
    # ORT and torch run the batched tiles' float32 convolutions differently: up to 1.6e-4 seen on g (sigma,
    # rho, means; 1e-4 of the tile is 0.03 px), well inside what changes a grey level of the decode
    np.testing.assert_allclose(tokens.g, ref_tokens.g.numpy(), rtol=1e-4, atol=5e-4)
    np.testing.assert_allclose(tokens.f, ref_tokens.f.numpy(), rtol=1e-3, atol=1e-2)
    from gpstoken_runtime import Tokens as RuntimeTokens

    same = RuntimeTokens(g=ref_tokens.g.numpy(), f=ref_tokens.f.numpy(), g_init=ref_tokens.g_init.numpy(), image_size=size,
                         tiles=np.array(ref_tokens.tile_boxes), tile_index=ref_tokens.tile_ids.numpy())  # fmt: skip
    for mode in ("merged", "tiles"):
        with torch.inference_mode():
            ref = gpstoken.to_uint8(model.decode(ref_tokens, mode))
        # the decoder graphs on the library's tokens: a few rounding flips at most
        diff = np.abs(tok.decode(same, mode=mode).astype(int) - ref.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (mode, diff.max(), (diff > 0).mean())
        # end to end (the encoders' float32 differences above included): within one grey level
        got = tok.decode(tokens, mode=mode)
        assert got.shape == (2, *size, 3) and np.abs(got.astype(int) - ref.astype(int)).max() <= 1, mode
    assert tok.decode_mode == "tiles"  # the shipped model's default, from the manifest
    np.testing.assert_array_equal(tok.decode(tokens), tok.decode(tokens, mode="tiles"))


def test_polygraphy_parity_passes_and_can_fail(exported):
    from gpstoken_export.parity import check_export

    model = gpstoken.GPSTokenizer.from_pretrained(SHIPPED)
    assert check_export(exported, model)
    with torch.no_grad():
        model.decoder.conv_out.bias[0] += 1e-2  # a small change of one weight
    assert not check_export(exported, model)


def test_polygraphy_cli_runs_the_exported_decoder(exported, tmp_path):
    """The README's `polygraphy run` recipe: ORT runs the custom node through its local function."""
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("polygraphy")), "run", str(exported / "decoder.onnx"), "--onnxrt",
         "--input-shapes", "g:[2,64,5]", "f:[2,64,16]"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASSED" in proc.stdout + proc.stderr
