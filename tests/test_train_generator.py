"""Generator training on token shards: exact resume after SIGKILL, 2-process gloo == 1 process, each stage
overfits a tiny shard, a failing checkpoint writer loses nothing, bad settings are refused."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpstoken.generation.models import SiT
from gpstoken.generation.samplers import model_velocity, sample_ode
from gpstoken.generation.shards import TokenShards, encode_dataset, model_data, shard_stats
from gpstoken.tokenizer import GPSTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # training/ is a package of the source tree, not of the installed wheel

from training import checkpointing  # noqa: E402
from training.checkpointing import completed_checkpoints  # noqa: E402
from training.train_generator import main  # noqa: E402

TINY = ROOT / "gpstoken" / "weights" / "tiny"
FAST = ["--threads", "1", "--log-every", "1", "--device", "cpu"]
RUN = ["--stage", "texture", "--model", "tiny/texture", "--batch", "4", "--steps", "6", "--ckpt-every", "2", "--lr", "1e-3"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory, one_thread):
    """'pair': two photos, one per class (each class one data point); 'flipped': the same with mirrors."""
    root = tmp_path_factory.mktemp("shards")
    listing = root / "list.txt"
    listing.write_text("skimage:astronaut 0\nskimage:coffee 1\n")
    tok = GPSTokenizer.from_pretrained(TINY)
    for name, flip in (("pair", False), ("flipped", True)):
        encode_dataset(str(listing), tok, root / name, size=64, num_tokens=16, shard_size=1, flip=flip, progress=False)
    return root


def run_train(args, env_extra=None, launcher=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = (launcher or [sys.executable]) + ["-m", "training.train_generator", *FAST, *[str(a) for a in args]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def final(out: Path, part: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(completed_checkpoints(out / "checkpoints")[-1] / f"{part}.safetensors"))


def assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst == 0.0, f"{what}: weights differ by {worst}"


@pytest.fixture(scope="module")
def straight(shard_sets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    run_train([*RUN, "--shards", shard_sets / "flipped", "--out", out])
    return out


def test_resume_after_sigkill_is_bit_exact(shard_sets, straight, tmp_path):
    args = [*RUN, "--shards", shard_sets / "flipped", "--out", tmp_path / "b"]
    killed = run_train(args, {checkpointing.CRASH_TEST_ENV: "during_ckpt:4"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in completed_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_00000002"]
    resumed = run_train([*args, "--resume"])
    assert "incomplete checkpoint" in resumed.stderr
    for part in ("model", "ema", "optimizer"):
        assert_same(final(tmp_path / "b", part), final(straight, part), part)
    assert_same(load_file(str(straight / "model" / "model.safetensors")), final(straight, "ema"), "model folder = EMA")


def test_two_process_gloo_equals_one_process(shard_sets, straight, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2"]
    run_train([*RUN, "--shards", shard_sets / "flipped", "--out", tmp_path / "ddp"], launcher=launcher)
    check = json.loads((tmp_path / "ddp" / "ddp_check.json").read_text())
    assert check["ranks"] == 2 and check["max_abs_diff"] == 0.0
    # statistics are merged shard by shard in a fixed order: the same config for any process count
    configs = [json.loads((run / "model" / "config.json").read_text()) for run in (tmp_path / "ddp", straight)]
    assert configs[0] == configs[1]
    ddp, single = final(tmp_path / "ddp"), final(straight)
    diff = torch.cat([(ddp[k] - single[k]).abs().flatten() for k in single])
    # The noise is the same per sample; only the gradient sum order differs (two halves averaged vs one
    # batch), ~1e-7 relative. Adam divides by the gradient's own magnitude, so an element whose gradient is
    # at rounding level may step +-lr either way: bounded by 2 * lr * steps, and rare.
    assert (diff > 1e-5).float().mean() < 1e-3, f"{int((diff > 1e-5).sum())} of {diff.numel()} weights differ"
    assert diff.max() <= 2 * 6 * 1e-3


@pytest.mark.parametrize("stage,model,extra", [
    ("layout", "tiny/layout", []),
    ("texture", "tiny/texture", ["--cond-noise", "0"]),  # noise on the only token identity would blur a 150-step fit
    ("one-stage", "tiny/onestage", []),
])  # fmt: skip
def test_each_stage_overfits_a_tiny_shard(shard_sets, tmp_path, stage, model, extra):
    shards = shard_sets / "pair"
    args = ["--stage", stage, "--model", model, "--shards", shards, "--out", tmp_path / "r", "--batch", "8", "--steps", "150",
            "--ckpt-every", "150", "--lr", "3e-3", "--ema-decay", "0", "--class-dropout", "0", *extra]  # fmt: skip
    assert main([*FAST, *[str(a) for a in args]]) == 0
    sit = SiT.from_pretrained(tmp_path / "r" / "model")
    role = {"one-stage": "onestage"}.get(stage, stage)
    assert sit.config.role == role
    stats = shard_stats(TokenShards(shards), role)
    assert (sit.config.mean, sit.config.std, sit.config.cond_mean) == (stats["mean"], stats["std"], stats["cond_mean"])
    # each class is one data point: the learned ODE must carry noise to that point, not to the other class's
    rows = TokenShards(shards).rows([0, 1])
    x, cond = model_data(rows, role)
    target = sit.normalize(x)
    z = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        made = sample_ode(model_velocity(sit, rows["label"], cond, 1.0), z, 20, method="heun")
    own = (made - target).abs().mean((1, 2))
    other = (made - target.flip(0)).abs().mean((1, 2))
    assert (own < 0.4).all() and (other > 2.5 * own).all(), f"{stage}: own {own.tolist()}, other class {other.tolist()}"


def test_failing_checkpoint_writer_loses_nothing(shard_sets, straight, tmp_path, monkeypatch, caplog):
    out = tmp_path / "full"
    args = [*FAST, *[str(a) for a in [*RUN, "--shards", shard_sets / "flipped", "--out", out]]]
    real = checkpointing.save_tensors

    def full_disk(path, *a, **k):
        if "step_00000004" in str(path):
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(checkpointing, "save_tensors", full_disk)
    assert main(args) == 2
    assert "step_00000002 is intact" in caplog.text and "No space left" in caplog.text
    monkeypatch.undo()
    assert [p.name for p in completed_checkpoints(out / "checkpoints")] == ["step_00000002"]
    assert not list((out / "checkpoints").glob(".*tmp*"))

    # a resume with another config is refused; with the same one it ends where the straight run did
    caplog.clear()
    assert main([*args, "--resume", "--seed", "1"]) == 2 and "different seed" in caplog.text
    assert main([*args, "--resume"]) == 0
    for part in ("model", "ema", "optimizer"):
        assert_same(final(out, part), final(straight, part), part)


def test_bad_settings_are_refused(shard_sets, tmp_path, caplog):
    common = [*FAST, "--shards", str(shard_sets / "pair"), "--steps", "1", "--batch", "2"]
    assert main([*common, "--stage", "layout", "--model", "tiny/texture", "--out", str(tmp_path / "a")]) == 2
    assert "is a texture model" in caplog.text
    assert main([*common, "--stage", "layout", "--model", "tiny/layout", "--out", str(tmp_path / "a"), "--shards", str(tmp_path)]) == 2
    assert "not a token-shard folder" in caplog.text
    # shards with a shard missing: refused, naming the way to finish them
    broken = tmp_path / "broken"
    shutil.copytree(shard_sets / "pair", broken)
    (broken / "shard-00001-00002.safetensors").unlink()
    assert main([*common, "--stage", "layout", "--model", "tiny/layout", "--out", str(tmp_path / "b"), "--shards", str(broken)]) == 2
    assert "1 of 2 shards missing" in caplog.text and "--resume" in caplog.text


def test_lr_tail_follows_the_cosine_and_extends_a_constant_run(shard_sets, tmp_path):
    from training.train_generator import GeneratorTrainConfig

    cfg = GeneratorTrainConfig(shards="x", lr=1e-3, lr_min=1e-4, lr_decay_after=4, steps=12)
    expected = [1e-3] * 4 + [1e-4 + 0.9e-3 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(8)]
    assert [cfg.lr_at(s) for s in range(12)] == pytest.approx(expected, rel=1e-12)
    assert GeneratorTrainConfig(shards="x", lr=1e-3).lr_at(10**6) == 1e-3  # SiT: constant
    with pytest.raises(ValueError, match="lr-decay-after"):
        GeneratorTrainConfig(shards="x", lr_decay_after=12, steps=12)
    # A constant-LR run of 3 steps, resumed with a tail to 6, is the run trained with that tail from the start.
    tail = ["--steps", "6", "--lr-decay-after", "3", "--lr-min", "1e-4", "--ema-power", "0.75", "--ema-decay", "0.99"]
    base = [a for a in RUN if a not in ("--steps", "6")]
    common = [*base, "--shards", shard_sets / "pair"]
    run_train([*common, "--steps", "3", "--ema-power", "0.75", "--ema-decay", "0.99", "--out", tmp_path / "a"])
    run_train([*common, *tail, "--out", tmp_path / "a", "--resume"])
    run_train([*common, *tail, "--out", tmp_path / "b"])
    for part in ("model", "ema", "optimizer"):
        assert_same(final(tmp_path / "a", part), final(tmp_path / "b", part), part)
    logged = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [round(r["lr"], 12) for r in logged if "lr" in r] == [round(GeneratorTrainConfig(shards="x", lr=1e-3, lr_min=1e-4, lr_decay_after=3, steps=6).lr_at(s), 12) for s in range(6)]
