"""Tokenizer training: DDP equals single-process, exact resume after SIGKILL, losses, data errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from gpstoken_core.imageio import bundled_photo, center_crop_resize

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["-m", "training.train_tokenizer"]  # run from ROOT, as the README says
sys.path.insert(0, str(ROOT))  # training/ is a package of the source tree, not of the installed wheel

from training.checkpointing import completed_checkpoints  # noqa: E402
from training.data import StepBatches  # noqa: E402

SMALL = ["--size", "64", "--tokens", "16", "--workers", "0", "--threads", "1", "--log-every", "1", "--image-every", "1000"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(center_crop_resize(bundled_photo(name), 96)).save(folder / f"{name}.png")
    (folder / "nested").mkdir()
    Image.fromarray(center_crop_resize(bundled_photo("camera"), 80)).save(folder / "nested" / "camera.png")
    return folder


def run_train(args, env_extra=None, check=True, launcher=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = (launcher or [sys.executable]) + [*TRAIN, *SMALL, *[str(a) for a in args]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def final_weights(out: Path, part: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(completed_checkpoints(out / "checkpoints")[-1] / f"{part}.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"


def test_resume_after_sigkill_is_exact(photos, tmp_path):
    # the discriminator starts at step 3, so the resumed part alternates G/D steps (its state must resume too)
    common = ["--data", photos, "--batch", "2", "--steps", "6", "--ckpt-every", "2", "--lr", "1e-3", "--disc-start", "3"]
    run_train([*common, "--out", tmp_path / "straight"])

    # killed right after checkpoint 2, then resumed
    killed = run_train([*common, "--out", tmp_path / "a"], {"GPSTOKEN_TRAIN_CRASH_TEST": "after_ckpt:2"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in completed_checkpoints(tmp_path / "a" / "checkpoints")] == ["step_00000002"]
    run_train([*common, "--out", tmp_path / "a", "--resume"])

    # killed while checkpoint 4 is half written: the partial folder is ignored and removed, 2 is used
    killed = run_train([*common, "--out", tmp_path / "b"], {"GPSTOKEN_TRAIN_CRASH_TEST": "during_ckpt:4"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in completed_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_00000002"]
    assert list((tmp_path / "b" / "checkpoints").glob(".step_00000004.tmp-*"))
    resumed = run_train([*common, "--out", tmp_path / "b", "--resume"])
    assert "incomplete checkpoint" in resumed.stderr + resumed.stdout
    assert not list((tmp_path / "b" / "checkpoints").glob("*.tmp-*"))

    straight = final_weights(tmp_path / "straight")
    for run in ("a", "b"):
        assert_same_weights(final_weights(tmp_path / run), straight)
        for part in ("ema", "disc", "disc_optimizer", "optimizer"):
            assert_same_weights(final_weights(tmp_path / run, part), final_weights(tmp_path / "straight", part))
    assert len(_losses(tmp_path / "straight", "loss/disc")) == 2  # steps 4 and 6 (1-based) were D steps
    # the inference model folder holds the EMA weights
    ema = final_weights(tmp_path / "straight", "ema")
    assert_same_weights(load_file(str(tmp_path / "straight" / "model" / "model.safetensors")), ema)


def test_two_process_ddp_equals_single_process(photos, tmp_path):
    common = ["--data", photos, "--batch", "4", "--steps", "3", "--ckpt-every", "3", "--lr", "1e-3"]
    run_train([*common, "--out", tmp_path / "single"])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2"]
    run_train([*common, "--out", tmp_path / "ddp"], launcher=launcher)
    check = json.loads((tmp_path / "ddp" / "ddp_check.json").read_text())
    assert check["ranks"] == 2 and check["max_abs_diff"] == 0.0
    ddp, single = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    diff = torch.cat([(ddp[k] - single[k]).abs().flatten() for k in single])
    # Adam divides each gradient element by its own magnitude, so elements whose gradient is at rounding
    # level (conv biases right before a GroupNorm) may step +-lr in either run; everything else agrees.
    assert (diff > 1e-5).float().mean() < 1e-4, f"{int((diff > 1e-5).sum())} of {diff.numel()} weights differ"
    assert diff.max() <= 2 * 3 * 1e-3  # never more than the largest possible Adam disagreement (3 steps)


def test_ddp_with_the_discriminator_keeps_ranks_identical(photos, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2"]
    args = ["--data", photos, "--batch", "4", "--steps", "5", "--ckpt-every", "5", "--disc-start", "1", "--out", tmp_path / "gan"]
    run_train(args, launcher=launcher)
    check = json.loads((tmp_path / "gan" / "ddp_check.json").read_text())
    assert check["ranks"] == 2 and check["max_abs_diff"] == 0.0
    assert len(_losses(tmp_path / "gan", "loss/disc")) == 2 and len(_losses(tmp_path / "gan", "gan_weight")) == 2


def test_step_batches_split_the_global_batch():
    single = list(StepBatches(5, 4, seed=3, start_step=0, total_steps=6))
    ranks = [list(StepBatches(5, 4, seed=3, start_step=0, total_steps=6, rank=r, world=2)) for r in range(2)]
    for step in range(6):
        merged = [None] * 4
        merged[0::2], merged[1::2] = ranks[0][step], ranks[1][step]
        assert merged == single[step]
    # each epoch visits every image once; resuming at step 3 continues the same sequence
    flat = [i for batch in single for i, _ in batch]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert list(StepBatches(5, 4, seed=3, start_step=3, total_steps=6)) == single[3:]


def _losses(out: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def perceptual_weights(tmp_path_factory) -> tuple[Path, Path]:
    from gpstoken.perceptual import LPIPS, InceptionFeatures
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    lp, inc = LPIPS(), InceptionFeatures()
    with torch.no_grad():
        for lin in lp.lins:
            lin.weight.uniform_(0, 0.1)
        for m in inc.modules():  # variance-preserving init, so random features neither vanish nor explode
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    save_file({k: v.contiguous() for k, v in lp.state_dict().items()}, str(folder / "lpips.safetensors"))
    torch.save(inc.state_dict(), folder / "inception.pth")
    return folder / "lpips.safetensors", folder / "inception.pth"


@pytest.mark.parametrize("stage", ["reconstruction", "perceptual", "adversarial"])
def test_tiny_model_overfits_one_photo(tmp_path, stage, perceptual_weights):
    one = tmp_path / "one"
    one.mkdir()
    Image.fromarray(center_crop_resize(bundled_photo("chelsea"), 64)).save(one / "cat.png")
    args = ["--data", one, "--batch", "1", "--lr", "2e-3", "--betas", "0.9", "0.99", "--no-flip", "--ckpt-every", "1000"]
    if stage == "reconstruction":
        args += ["--steps", "40", "--recipe", "paper"]
    elif stage == "perceptual":
        args += ["--steps", "25", "--lpips-weights", perceptual_weights[0], "--inception-weights", perceptual_weights[1]]
    else:
        args += ["--steps", "40", "--recipe", "paper", "--disc-start", "0"]
    proc = run_train([*args, "--out", tmp_path / "run"])
    l2 = _losses(tmp_path / "run", "loss/l2")
    factor = 2 if stage == "adversarial" else 3  # with the GAN on, only every other step trains the tokenizer
    assert l2[-1] < l2[0] / factor, f"L2 only fell from {l2[0]:.4f} to {l2[-1]:.4f}"
    if stage == "perceptual":
        lp, inc = _losses(tmp_path / "run", "loss/lpips"), _losses(tmp_path / "run", "loss/inception")
        assert len(lp) == 25 and lp[-1] < lp[0] and inc[-1] < inc[0]
        assert "loss off" not in proc.stderr
    if stage == "adversarial":
        assert len(_losses(tmp_path / "run", "loss/disc")) == 20 and len(_losses(tmp_path / "run", "loss/gen")) == 20
    if stage == "reconstruction":
        assert "LPIPS and Inception-feature loss off" in proc.stderr


def test_data_errors_are_clear(tmp_path, photos):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_train(["--data", empty, "--out", tmp_path / "r", "--steps", "1"], check=False)
    assert proc.returncode == 2 and "no images found" in proc.stderr

    proc = run_train(["--data", tmp_path / "nope", "--out", tmp_path / "r", "--steps", "1"], check=False)
    assert proc.returncode == 2 and "no such folder" in proc.stderr

    proc = run_train(["--data", photos, "--out", tmp_path / "r", "--steps", "1", "--size", "300"], check=False)
    assert proc.returncode == 2 and "larger than the model's tile" in proc.stderr

    # corrupt files are skipped with a warning and counted; tiny images are upscaled and counted
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(center_crop_resize(bundled_photo("coffee"), 40)).save(mixed / "small.png")
    Image.fromarray(center_crop_resize(bundled_photo("rocket"), 96)).save(mixed / "ok.png")
    proc = run_train(["--data", mixed, "--out", tmp_path / "m", "--steps", "3", "--batch", "1", "--ckpt-every", "3"])
    assert "skipped unreadable image" in proc.stderr and "broken.png" in proc.stderr
    assert "upscaled" in proc.stderr

    # resuming with a different setting that changes the batches is refused
    proc = run_train(["--data", mixed, "--out", tmp_path / "m", "--steps", "4", "--batch", "2", "--resume"], check=False)
    assert proc.returncode == 2 and "different batch" in proc.stderr
    # starting over an existing run without --resume is refused (nothing is overwritten)
    proc = run_train(["--data", mixed, "--out", tmp_path / "m", "--steps", "4", "--batch", "1"], check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_failing_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from training import checkpointing

    root = tmp_path / "ckpt"
    checkpointing.save_checkpoint(root, 1, {"model": {"w": torch.ones(3)}}, {"step": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing, "atomic_write_text", full_disk)  # state.json fails after the tensors
    with pytest.raises(OSError, match="No space"):
        checkpointing.save_checkpoint(root, 2, {"model": {"w": torch.zeros(3)}}, {"step": 2})
    monkeypatch.undo()
    done = checkpointing.completed_checkpoints(root)
    assert [p.name for p in done] == ["step_00000001"] and not list(root.glob("*.tmp-*"))
    parts, state = checkpointing.load_checkpoint(done[-1])
    assert state["step"] == 1 and torch.equal(parts["model"]["w"], torch.ones(3))


def test_help_explains():
    proc = subprocess.run([sys.executable, *TRAIN, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0
    for flag in ("--data", "--resume", "--lpips-weights", "--disc-start", "--ema-decay", "torchrun"):
        assert flag in proc.stdout


def test_optimizer_state_round_trip():
    from training.checkpointing import optimizer_from_tensors, optimizer_to_tensors

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.9))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    tensors, meta = optimizer_to_tensors(opt)
    meta = json.loads(json.dumps(meta))  # what goes through state.json
    other = torch.optim.Adam(model.parameters(), lr=1.0)
    optimizer_from_tensors(other, tensors, meta)
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for key, value in a["state"][pid].items():
            assert torch.equal(value, b["state"][pid][key])
    assert np.isclose(other.param_groups[0]["lr"], 1e-3)


def _ema_pytorch_decays(calls: int, beta: float, power: float, update_every: int, update_after_step: int) -> list:
    """The decay ema_pytorch's ``EMA.update()`` applies at each call (None: skipped), written out from its
    code: ``step`` counts calls, the decay reads the incremented counter, inv_gamma 1, min_value 0."""
    decays, step = [], 0
    for _ in range(calls):
        s, step = step, step + 1
        if s % update_every:
            decays.append(None)
        elif s <= update_after_step:
            decays.append(0.0)
        else:
            epoch = max(step - update_after_step - 1, 0)
            decays.append(0.0 if epoch <= 0 else min(max(1 - (1 + epoch) ** -power, 0.0), beta))
    return decays


@pytest.mark.parametrize("every, after", [(1, 0), (10, 100)])
def test_ema_follows_the_ema_pytorch_schedule(every, after):
    from training.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.95, update_every=every, update_after_step=after)
    decays = _ema_pytorch_decays(400, 0.95, 2 / 3, every, after)
    assert 0.95 in decays  # the cap is reached within the run
    for k, d in enumerate(decays):
        before = ema.model.weight.clone()
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model, k)
        want = before if d is None else before.lerp(model.weight, 1 - d)
        assert torch.equal(ema.model.weight, want), f"update {k} (every {every}, after {after}, decay {d})"


def test_constant_ema_matches_sit_update_ema():
    from training.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    ema = EMA(model, 0.9999, power=None, update_after_step=-1)
    reference = {k: v.clone() for k, v in model.state_dict().items()}  # SiT: update_ema(ema, model, decay=0)
    for k in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model, k)
        for name, p in model.named_parameters():  # SiT's update_ema
            reference[name].mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)
    for name, value in ema.model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-7, msg=f"{name} after 5 updates")


def test_config_flags_and_file(tmp_path, capsys):
    from training.config import parse_config
    from training.train_tokenizer import TrainConfig

    (tmp_path / "c.json").write_text(json.dumps({"lr": 1e-4, "batch": 8, "flip": False}))
    cfg = parse_config(TrainConfig, ["--config", str(tmp_path / "c.json"), "--batch", "4", "--betas", "0.9", "0.99"], "")
    assert (cfg.lr, cfg.batch, cfg.flip, cfg.betas) == (1e-4, 4, False, (0.9, 0.99))
    (tmp_path / "bad.json").write_text(json.dumps({"lrr": 1}))
    for argv, message in ((["--config", str(tmp_path / "bad.json")], "unknown field(s) lrr"), (["--steps", "0"], "--steps must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            parse_config(TrainConfig, argv, "")
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv


def test_single_process_distributed_helpers_are_identities(monkeypatch):
    from training import distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ddp = distributed.setup("cpu")
    assert (ddp.rank, ddp.world, ddp.device, ddp.main) == (0, 1, torch.device("cpu"), True)
    model = torch.nn.Linear(2, 2)
    t = torch.arange(3.0)
    assert distributed.wrap(model) is model and distributed.all_reduce_mean(t) is t
    assert distributed.replica_difference(model) == 0.0
    assert ddp.seed(5, per_rank=True) == 5
    distributed.barrier()
    distributed.cleanup()


def test_cleanup_partial_removes_only_unfinished_folders(tmp_path):
    from training import checkpointing

    root = tmp_path / "ckpt"
    done = checkpointing.save_checkpoint(root, 1, {"model": {"w": torch.ones(2)}}, {"step": 1})
    # being written, being replaced (atomic_folder's names), and written by the pre-atomic_folder trainer
    leftovers = [root / ".step_00000002.tmp-abc", root / ".step_00000001.old-77", root / "step_00000002.tmp-def"]
    for p in leftovers:
        p.mkdir()
    assert sorted(checkpointing.cleanup_partial(root)) == sorted(leftovers)
    assert checkpointing.completed_checkpoints(root) == [done] and (root / "latest").read_text() == "step_00000001\n"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
