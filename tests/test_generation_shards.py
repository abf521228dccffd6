"""Token shards: round trip against direct encoding, resume after kill -9, torchrun shards, statistics, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpstoken.checkpoint import CheckpointError
from gpstoken.generation.shards import CRASH_TEST_ENV, DataError, TokenShards, encode_dataset, labeled_images, model_data, shard_stats
from gpstoken.generation.transport import channel_stats
from gpstoken.tokenizer import GPSTokenizer
from gpstoken_core.imageio import bundled_photo, center_crop_resize

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "gpstoken" / "weights" / "tiny"
SMALL = {"size": 64, "num_tokens": 16}
SMALL_FLAGS = ["--size", "64", "--tokens", "16", "--quiet", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

@pytest.fixture(scope="module")
def tokenizer(one_thread):
    return GPSTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """An ImageNet-style tree: class = sub-folder; 'zebra' sorts last, 'empty' has no images."""
    root = tmp_path_factory.mktemp("tree")
    for cls, names in {"cat": ["chelsea", "coffee"], "rocket": ["rocket"], "zebra": ["astronaut", "camera"]}.items():
        (root / cls / "deeper").mkdir(parents=True)
        for k, name in enumerate(names):
            where = root / cls / ("deeper" if k else "") / f"{name}.png"
            Image.fromarray(center_crop_resize(np.atleast_3d(bundled_photo(name))[..., :3], 80)).save(where)
    (root / "empty").mkdir()
    return root


def direct(tokenizer, files, flip=False):
    """The reference: the same crops encoded in one call."""
    pixels = np.stack([center_crop_resize(np.asarray(Image.open(f).convert("RGB")), 64) for f in files])
    if flip:
        pixels = np.ascontiguousarray(pixels[:, :, ::-1])
    with torch.no_grad():
        return tokenizer.encode(pixels, 16)


def all_rows(shards: TokenShards) -> dict[str, torch.Tensor]:
    return shards.rows(range(len(shards)))


def run_cli(args, env_extra=None, launcher=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = (launcher or [sys.executable, "-m"]) + ["gpstoken.cli", "encode-dataset", *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def test_shards_round_trip_equal_direct_encoding(tree, tokenizer, tmp_path):
    report = encode_dataset(str(tree), tokenizer, tmp_path / "s", shard_size=2, batch=3, flip=True, progress=False, **SMALL)
    assert report.shards_written == 3 and not report.skipped
    shards = TokenShards(tmp_path / "s")
    assert shards.info["class_names"] == ["cat", "rocket", "zebra"]  # sorted, the empty folder is no class
    files = labeled_images(str(tree)).names
    rows = all_rows(shards)
    # shard k holds images 2k, 2k+1 as is, then mirrored
    order = [0, 1, 0, 1, 2, 3, 2, 3, 4, 4]
    flipped = [0, 0, 1, 1, 0, 0, 1, 1, 0, 1]
    plain, mirrored = direct(tokenizer, files), direct(tokenizer, files, flip=True)
    for name in ("g_init", "g", "f"):
        want = torch.stack([(mirrored if fl else plain).__dict__[name][i] for i, fl in zip(order, flipped)])
        assert torch.equal(rows[name], want.float()), f"{name} differs from direct encoding"
    assert rows["label"].tolist() == [[0, 0, 1, 2, 2][i] for i in order]


def test_resume_after_kill_skips_finished_shards_and_never_reads_a_partial_one(tree, tokenizer, tmp_path):
    args = [tree, "--tokenizer", TINY, "--out", tmp_path / "s", "--shard-size", "2", *SMALL_FLAGS]
    killed = run_cli(args, {CRASH_TEST_ENV: "during_shard:1"})
    assert killed.returncode == -signal.SIGKILL
    first = tmp_path / "s" / "shard-00000-00003.safetensors"
    assert first.exists() and not (tmp_path / "s" / "shard-00001-00003.safetensors").exists()
    assert list((tmp_path / "s").glob(".shard-00001-00003.safetensors.*.tmp")), "the half-written shard sits under a temporary name"
    with pytest.raises(DataError, match="2 of 3 shards missing"):
        TokenShards(tmp_path / "s")  # a reader never takes the partial set
    before = first.stat()

    with pytest.raises(FileExistsError, match="--resume"):  # without --resume: refused, nothing touched
        encode_dataset(str(tree), tokenizer, tmp_path / "s", shard_size=2, progress=False, **SMALL)
    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "wrote 2 shard(s), kept 1" in resumed.stdout
    after = first.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "a finished shard was rewritten"
    assert not list((tmp_path / "s").glob(".*.tmp"))
    got = all_rows(TokenShards(tmp_path / "s"))
    want = direct(tokenizer, labeled_images(str(tree)).names)
    assert torch.equal(got["g"], want.g.float()) and torch.equal(got["f"], want.f.float())


def test_two_processes_write_disjoint_shards_covering_the_set(tree, tokenizer, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2", "-m"]
    proc = run_cli([tree, "--tokenizer", TINY, "--out", tmp_path / "s", "--shard-size", "1", *SMALL_FLAGS], launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shards = TokenShards(tmp_path / "s")
    writers, indices = [], []
    from safetensors import safe_open

    for k, p in enumerate(shards.paths):
        with safe_open(str(p), "pt") as fh:
            writers.append(fh.metadata()["written_by"])
            indices.append(fh.get_tensor("index").tolist())
    assert writers == ["0/2", "1/2", "0/2", "1/2", "0/2"]  # shard k by process k mod 2
    assert sorted(sum(indices, [])) == list(range(5)) and all(len(i) == 1 for i in indices)  # disjoint, covering
    want = direct(tokenizer, labeled_images(str(tree)).names)
    assert torch.equal(all_rows(shards)["f"], want.f.float())


@pytest.mark.parametrize("role", ["layout", "texture", "onestage"])
def test_statistics_from_shards_equal_direct_computation(tree, tokenizer, tmp_path, role):
    encode_dataset(str(tree), tokenizer, tmp_path / "s", shard_size=2, flip=True, progress=False, **SMALL)
    shards = TokenShards(tmp_path / "s")
    stats = shard_stats(shards, role)
    x, cond = model_data(all_rows(shards), role)
    for key, values in zip(("mean", "std"), channel_stats(x)):
        np.testing.assert_allclose(stats[key], values, rtol=1e-12, atol=1e-12, err_msg=f"{role} {key}")
    if role == "texture":
        for key, values in zip(("cond_mean", "cond_std"), channel_stats(cond)):
            np.testing.assert_allclose(stats[key], values, rtol=1e-12, atol=1e-12, err_msg=f"{role} {key}")
    else:
        assert stats["cond_mean"] is None and stats["cond_std"] is None


def test_bad_input_is_refused_with_clear_errors(tree, tokenizer, tmp_path, capsys):
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no images in class sub-folders"):
        labeled_images(str(tmp_path / "none"))
    with pytest.raises(DataError, match="directly in the folder"):
        labeled_images(str(tree / "cat"))  # images next to sub-folders: not an ImageNet tree
    listing = tmp_path / "list.txt"
    listing.write_text("skimage:astronaut 0\nskimage:coffee 3\n")
    with pytest.raises(DataError, match=r"list.txt:2: label 3 is outside \[0, 2\)"):
        labeled_images(str(listing), num_classes=2)
    listing.write_text("skimage:astronaut\n")
    with pytest.raises(DataError, match="expected 'path label'"):
        labeled_images(str(listing))

    # unreadable images are skipped and counted, the rest is encoded
    (tmp_path / "broken.png").write_bytes(b"not a png")
    listing.write_text(f"skimage:astronaut 0\n{tmp_path / 'broken.png'} 1\nmissing.png 1\nskimage:coffee 1\n")
    report = encode_dataset(str(listing), tokenizer, tmp_path / "s", shard_size=2, progress=False, **SMALL)
    assert len(report.skipped) == 2 and "broken.png" in report.skipped[0] and "missing.png" in report.skipped[1]
    shards = TokenShards(tmp_path / "s")
    assert len(shards) == 2 and len(shards.skipped) == 2 and all_rows(shards)["label"].tolist() == [0, 1]

    # a resume with other settings is refused before anything is written
    with pytest.raises(ValueError, match="different num_tokens"):
        encode_dataset(str(listing), tokenizer, tmp_path / "s", resume=True, progress=False, size=64, num_tokens=8, shard_size=2)

    # a shard from another tokenizer (other weights, same sizes) is named as such
    other = GPSTokenizer.from_pretrained(TINY)
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.1)
    encode_dataset(str(listing), other, tmp_path / "o", shard_size=2, progress=False, **SMALL)
    shutil.copy(tmp_path / "o" / "shard-00001-00002.safetensors", tmp_path / "s" / "shard-00001-00002.safetensors")
    with pytest.raises(CheckpointError, match="shard-00001-00002.safetensors: comes from another tokenizer"):
        TokenShards(tmp_path / "s")
    # and one of another token count
    encode_dataset(str(listing), tokenizer, tmp_path / "t", shard_size=2, progress=False, size=64, num_tokens=8)
    shutil.copy(tmp_path / "t" / "shard-00000-00002.safetensors", tmp_path / "s" / "shard-00000-00002.safetensors")
    with pytest.raises(CheckpointError, match="num_tokens 8"):
        TokenShards(tmp_path / "s")

    # the CLI reports a bad source in one line
    from gpstoken.cli import main

    assert main(["encode-dataset", str(tmp_path / "none"), "--tokenizer", str(TINY), "--out", str(tmp_path / "x"), *SMALL_FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no images" in err and not (tmp_path / "x").exists()
    assert json.loads((tmp_path / "s" / "dataset.json").read_text())["num_images"] == 4
