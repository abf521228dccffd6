#!/usr/bin/env python
"""Train a GPSToken tokenizer.

Single process:   python training/train_tokenizer.py --data photos/ --model tiny --steps 2000
Several (DDP):    torchrun --nproc_per_node 8 training/train_tokenizer.py --data imagenet.txt --model m128
                  (gloo on CPU, nccl on GPUs; --batch is the global batch, split over the processes)
Resume:           the same command with --resume (continues from OUT/checkpoints/latest exactly)

Every field of TrainConfig is a flag (--lr 1e-4, --betas 0.5 0.9, --no-flip ...); --config FILE.json sets
fields from a file first, flags override it. The EMA weights are what ``OUT/model`` holds for inference.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also under torchrun

from checkpointing import cleanup_partial, latest_checkpoint, load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint  # noqa: E402
from data import DataError, StepBatches, TokenizerDataset, collate, list_images  # noqa: E402
from losses import PatchDiscriminator, adaptive_weight, hinge_d_loss  # noqa: E402

import gpstoken  # noqa: E402
from gpstoken.checkpoint import CheckpointError  # noqa: E402
from gpstoken.config import TokenizerConfig, preset  # noqa: E402

log = logging.getLogger("gpstoken.train")

# Crash testing: "after_ckpt:N" kills this process with SIGKILL right after checkpoint N is complete,
# "during_ckpt:N" while checkpoint N is half written (tests/test_training.py uses both).
CRASH_TEST_ENV = "GPSTOKEN_TRAIN_CRASH_TEST"


@dataclass
class TrainConfig:
    data: str = field(default="skimage:", metadata={"help": "image folder (recursive), list file, or skimage: / sklearn: bundled photos"})
    out: str = field(default="runs/tokenizer", metadata={"help": "run folder: checkpoints/, model/ (EMA weights), tensorboard/, log.jsonl"})
    model: str = field(default="tiny", metadata={"help": "config preset (tiny, s64, m128, l256) or a model folder to fine-tune"})
    size: int = field(default=256, metadata={"help": "training crop size"})
    tokens: int = field(default=0, metadata={"help": "tokens per crop (0: the model's tokens_per_tile)"})
    batch: int = field(default=16, metadata={"help": "global batch size (split over processes)"})
    steps: int = field(default=1000, metadata={"help": "total optimizer steps"})
    lr: float = field(default=5e-5, metadata={"help": "Adam learning rate (official 5e-5)"})
    betas: tuple[float, float] = field(default=(0.5, 0.9), metadata={"help": "Adam betas (official 0.5 0.9)"})
    warmup: int = field(default=0, metadata={"help": "linear learning-rate warm-up steps"})
    grad_clip: float = field(default=0.0, metadata={"help": "clip the gradient norm (0: off)"})
    recipe: str = field(default="official", metadata={"help": "official: L2+LPIPS+Inception from step 0, GAN from disc_start; paper: L2 only before disc_start, then all"})
    lpips_weight: float = field(default=1.0, metadata={"help": "LPIPS weight (needs --lpips-weights)"})
    lpips_weights: str = field(default="", metadata={"help": "local LPIPS VGG16+lin weights (.safetensors or .pth); empty: LPIPS off"})
    inception_weight: float = field(default=1.0, metadata={"help": "Inception-feature loss weight (needs --inception-weights)"})
    inception_weights: str = field(default="", metadata={"help": "local Inception-v3 (FID) weights; empty: off"})
    disc_start: int = field(default=600_000, metadata={"help": "step at which the PatchGAN starts (official 600000)"})
    disc_weight: float = field(default=0.3, metadata={"help": "adversarial weight (times the adaptive weight)"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay ceiling; the decay ramps as 1 - (1 + step)^(-2/3)"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    scale_jitter: float = field(default=0.0, metadata={"help": "0: resize + centre crop (paper); >0: random crops at scale 1..1+jitter"})
    workers: int = field(default=2, metadata={"help": "DataLoader workers per process (they run the partition)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: default)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order, augmentation and initialization"})
    log_every: int = field(default=10, metadata={"help": "steps between scalar logs"})
    image_every: int = field(default=200, metadata={"help": "steps between image logs (reconstructions + Gaussian maps)"})
    ckpt_every: int = field(default=200, metadata={"help": "steps between checkpoints"})
    keep: int = field(default=3, metadata={"help": "checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoints (exactly where it stopped)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})

    # Fields that must not change across a resume: they define the model, the data order and the batches.
    FIXED_ON_RESUME = ("model", "size", "tokens", "batch", "seed", "data", "flip", "scale_jitter")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", type=Path, help="JSON file with TrainConfig fields (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flag, help_text = "--" + f.name.replace("_", "-"), f"{f.metadata.get('help', '')} (default: {f.default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "betas":
            parser.add_argument(flag, type=float, nargs=2, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=None, help=help_text)
    args = parser.parse_args(argv)
    values = {}
    if args.config:
        try:
            values = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as err:
            parser.error(f"--config {args.config}: {err}")
        unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            parser.error(f"--config {args.config}: unknown field(s) {', '.join(sorted(unknown))}")
    for f in dataclasses.fields(TrainConfig):
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    cfg = TrainConfig(**values)
    if cfg.recipe not in ("official", "paper"):
        parser.error(f"--recipe must be official or paper, got {cfg.recipe!r}")
    for name in ("size", "batch", "steps", "ckpt_every", "log_every"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return cfg


def build_model(cfg: TrainConfig) -> gpstoken.GPSTokenizer:
    if Path(cfg.model).is_dir():
        return gpstoken.GPSTokenizer.from_pretrained(cfg.model)
    return gpstoken.GPSTokenizer(preset(cfg.model))


class EMA:
    """Exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: torch.nn.Module, ceiling: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.ceiling = ceiling

    def decay(self, step: int) -> float:
        return min(self.ceiling, 1 - (1 + step) ** (-2 / 3))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay(step)
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def autoencoder_steps(cfg: TrainConfig, step: int) -> int:
    """Autoencoder updates before ``step``: all steps until disc_start, then every other one. The EMA decay
    ramp counts these, as the official EMA (updated after autoencoder steps only) does."""
    return step if step <= cfg.disc_start else cfg.disc_start + (step - cfg.disc_start + 1) // 2


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def lr_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else cfg.lr


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    rank, world, device = setup_distributed(cfg)
    main_rank = rank == 0
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(message)s")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return train(cfg, rank, world, device)
    except (DataError, CheckpointError, OSError) as err:
        log.error(f"error: {err}")
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> int:
    main_rank = rank == 0
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    if cfg.batch % world:
        raise DataError(f"--batch {cfg.batch} is not divisible by {world} processes")
    files = list_images(cfg.data)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    if cfg.size > model.config.tile:
        raise DataError(
            f"--size {cfg.size} is larger than the model's tile ({model.config.tile}): training crops are single "
            "tiles (larger images are handled tile by tile at inference)"
        )
    tokens = cfg.tokens or model.config.tokens_per_tile
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    disc = PatchDiscriminator().to(device)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas)

    lpips = inception = None
    if cfg.lpips_weights:
        from gpstoken.perceptual import LPIPS

        lpips = LPIPS.from_weights(cfg.lpips_weights).to(device)
    if cfg.inception_weights:
        from gpstoken.perceptual import InceptionFeatures

        inception = InceptionFeatures.from_weights(cfg.inception_weights).to(device)
    if main_rank:
        off = [n for n, m in (("LPIPS", lpips), ("Inception-feature", inception)) if m is None]
        if off:
            log.info(f"note: {' and '.join(off)} loss off (no local weights given: --lpips-weights / --inception-weights)")

    start, bad_total, small_total = 0, 0, 0
    if cfg.resume:
        if main_rank:
            for p in cleanup_partial(ckpt_root):
                log.info(f"removed an incomplete checkpoint {p.name} (the run was killed while writing it)")
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint in {ckpt_root}")
        start, bad_total, small_total = restore(ckpt, cfg, model, ema, opt, disc, disc_opt)
        if main_rank:
            log.info(f"resumed from {ckpt} (step {start})")
    elif latest_checkpoint(ckpt_root) is not None:
        raise CheckpointError(f"{ckpt_root} already has checkpoints: pass --resume to continue, or choose another --out")

    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    ddp_disc = torch.nn.parallel.DistributedDataParallel(disc) if world > 1 else disc
    mc = model.config
    dataset = TokenizerDataset(files, cfg.size, tokens, mc.lam, mc.min_region, cfg.flip, cfg.scale_jitter, tile=mc.tile)
    sampler = StepBatches(len(files), cfg.batch, cfg.seed, start, cfg.steps, rank, world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate, persistent_workers=False,
        prefetch_factor=2 if cfg.workers else None,
    )

    writer = None
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        writer = make_writer(out / "tensorboard")
        log.info(
            f"{len(files)} images, {model.config.name} ({model.num_parameters():,} parameters), {tokens} tokens, "
            f"global batch {cfg.batch} on {world} process(es) [{device}], steps {start}..{cfg.steps}"
        )

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not main_rank, unit="step", dynamic_ncols=True, mininterval=2)
    step = start
    t_last = time.time()
    for batch in loader:
        x = batch["image"].to(device)
        g_init, boxes = batch["g_init"].to(device), batch["boxes"].to(device)
        for item in batch["bad"]:
            log.warning(f"skipped unreadable image {item}")
        bad_total += len(batch["bad"])
        small_total += batch["small"]
        for group in opt.param_groups + disc_opt.param_groups:
            group["lr"] = lr_at(cfg, step)

        gan_on = step >= cfg.disc_start
        disc_turn = gan_on and step % 2 == 1  # after disc_start the official code alternates G and D steps
        if disc_turn:
            with torch.no_grad():
                recon, _, _ = ddp_model(x, g_init, boxes)
            # one forward for real and fake: two DDP forwards before a backward would clash over BatchNorm buffers
            real_logits, fake_logits = ddp_disc(torch.cat([x, recon.detach()])).chunk(2)
            d_loss = hinge_d_loss(real_logits, fake_logits)
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            stats = {"loss/disc": d_loss.item()}
        else:
            recon, g, f = ddp_model(x, g_init, boxes)
            l2 = F.mse_loss(recon, x)
            perceptual_on = cfg.recipe == "official" or gan_on
            rec = l2
            stats = {"loss/l2": l2.item(), "psnr": 10 * math.log10(4 / max(l2.item(), 1e-12))}
            if perceptual_on and lpips is not None:
                lp = lpips(recon, x).mean()
                rec = rec + cfg.lpips_weight * lp
                stats["loss/lpips"] = lp.item()
            if perceptual_on and inception is not None:
                fid_loss = F.mse_loss(inception(recon), inception(x))
                rec = rec + cfg.inception_weight * fid_loss
                stats["loss/inception"] = fid_loss.item()
            loss = rec
            if gan_on:
                gen = -ddp_disc(recon).mean()
                w = adaptive_weight(rec, gen, model.decoder.conv_out.weight, average=_all_reduce_mean if world > 1 else None)
                w = w * cfg.disc_weight
                loss = loss + w * gen
                stats |= {"loss/gen": gen.item(), "gan_weight": w.item()}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            opt.step()
            ema.update(model, autoencoder_steps(cfg, step))
            stats["loss/total"] = loss.item()
        step += 1
        bar.update(1)

        if main_rank and (step % cfg.log_every == 0 or step == cfg.steps):
            now = time.time()
            stats |= {"lr": lr_at(cfg, step - 1), "sec_per_step": (now - t_last) / cfg.log_every}
            t_last = now
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in stats.items() if k in ("loss/total", "psnr", "loss/disc")})
            log_scalars(out, writer, step, stats)
        if main_rank and writer is not None and (step % cfg.image_every == 0 or step == cfg.steps) and not disc_turn:
            log_images(writer, step, x, recon, g_init, g)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            if main_rank:
                path = write_checkpoint(ckpt_root, step, cfg, model, ema, opt, disc, disc_opt, bad_total, small_total)
                ema.model.save_pretrained(out / "model")
                bar.write(f"step {step}: checkpoint {path.name}, EMA model -> {out / 'model'}")
                _crash_test("after_ckpt", step)
            if world > 1:
                dist.barrier()
    bar.close()
    if world > 1:
        check_replicas(model, out, main_rank)
    if main_rank:
        if bad_total:
            log.warning(f"{bad_total} unreadable image load(s) were skipped")
        if small_total:
            log.info(f"{small_total} sample(s) came from images smaller than {cfg.size} px and were upscaled")
        log.info(f"done: {out / 'model'} holds the EMA weights")
    return 0


def _crash_test(point: str, step: int) -> None:
    if os.environ.get(CRASH_TEST_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def check_replicas(model: torch.nn.Module, out: Path, main_rank: bool) -> None:
    """Compare every rank's parameters with rank 0's; the result goes to OUT/ddp_check.json."""
    flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = torch.tensor([(flat - reference).abs().max().item()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if main_rank:
        (out / "ddp_check.json").write_text(json.dumps({"ranks": dist.get_world_size(), "max_abs_diff": diff.item()}))
        log.info(f"parameters on {dist.get_world_size()} ranks: max difference {diff.item():.3g}")


def write_checkpoint(root, step, cfg, model, ema, opt, disc, disc_opt, bad, small) -> Path:
    opt_t, opt_meta = optimizer_to_tensors(opt)
    dopt_t, dopt_meta = optimizer_to_tensors(disc_opt)
    parts = {
        "model": model.state_dict(),
        "ema": ema.model.state_dict(),
        "disc": disc.state_dict(),
        "optimizer": opt_t,
        "disc_optimizer": dopt_t,
        "rng": {"torch": torch.get_rng_state()},
    }
    state = {
        "step": step,
        "train_config": dataclasses.asdict(cfg),
        "model_config": model.config.to_dict(),
        "optimizer": opt_meta,
        "disc_optimizer": dopt_meta,
        "skipped_images": bad,
        "upscaled_samples": small,
    }
    def on_part_written():
        _crash_test("during_ckpt", step)

    try:
        return save_checkpoint(root, step, parts, state, keep=cfg.keep, on_part_written=on_part_written)
    except OSError as err:
        previous = latest_checkpoint(root)
        raise OSError(
            f"could not write the checkpoint at step {step} ({err}); "
            + (f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists")
        ) from None


def restore(path: Path, cfg: TrainConfig, model, ema, opt, disc, disc_opt) -> tuple[int, int, int]:
    parts, state = load_checkpoint(path)
    saved = state["train_config"]
    changed = [k for k in TrainConfig.FIXED_ON_RESUME if saved.get(k) != dataclasses.asdict(cfg).get(k)]
    if changed:
        raise CheckpointError(
            f"{path}: was written with a different " + ", ".join(f"{k} ({saved.get(k)!r} vs now {getattr(cfg, k)!r})" for k in changed)
            + "; resume with the same settings or start a new --out"
        )
    if TokenizerConfig.from_dict(state["model_config"]) != model.config:
        raise CheckpointError(f"{path}: the checkpoint's model config differs from --model {cfg.model}")
    model.load_weights(parts["model"], source=f"{path}/model.safetensors")
    ema.model.load_weights(parts["ema"], source=f"{path}/ema.safetensors")
    disc.load_state_dict(parts["disc"])
    optimizer_from_tensors(opt, parts["optimizer"], state["optimizer"])
    optimizer_from_tensors(disc_opt, parts["disc_optimizer"], state["disc_optimizer"])
    torch.set_rng_state(parts["rng"]["torch"])
    return int(state["step"]), int(state.get("skipped_images", 0)), int(state.get("upscaled_samples", 0))


def make_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: scalars go to log.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(str(path))


def log_scalars(out: Path, writer, step: int, stats: dict) -> None:
    with open(out / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"step": step, **stats}) + "\n")
    if writer is not None:
        for k, v in stats.items():
            writer.add_scalar(k, v, step)


def log_images(writer, step: int, x, recon, g_init, g, count: int = 2) -> None:
    import numpy as np

    from gpstoken.tokenizer import to_uint8
    from gpstoken.viz import draw_gaussians

    rows = []
    src, rec = to_uint8(x[:count]), to_uint8(recon[:count])
    for i in range(len(src)):
        init_map = np.asarray(draw_gaussians(src[i], g_init[i].detach().cpu().numpy(), color=(64, 160, 255)))
        ref_map = np.asarray(draw_gaussians(src[i], g[i].detach().cpu().numpy()))
        rows.append(np.concatenate([src[i], rec[i], init_map, ref_map], axis=1))
    writer.add_image("input | reconstruction | g_init | g", np.concatenate(rows, axis=0), step, dataformats="HWC")


if __name__ == "__main__":
    sys.exit(main())
