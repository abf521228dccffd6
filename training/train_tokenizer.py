"""Train a GPSToken tokenizer (run from the repository root).

Single process:   python -m training.train_tokenizer --data photos/ --model tiny --steps 2000
Several (DDP):    torchrun --nproc_per_node 8 -m training.train_tokenizer --data imagenet.txt --model m128
                  (gloo on CPU, nccl on GPUs; --batch is the global batch, split over the processes)
Resume:           the same command with --resume (continues from OUT/checkpoints/latest exactly)

Every field of TrainConfig is a flag (--lr 1e-4, --betas 0.5 0.9, --no-flip ...); --config FILE.json sets
fields from a file first, flags override it. The EMA weights are what ``OUT/model`` holds for inference.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpstoken.checkpoint import CheckpointError
from gpstoken.config import TokenizerConfig
from gpstoken_core.tiling import TILE
from training import distributed
from training import tokenizer_recipe as recipe
from training.checkpointing import (
    crash_point, find_resume_checkpoint, restore_training_state, save_training_state,
)
from training.config import parse_config, require_positive
from training.data import DataError, StepBatches, TokenizerDataset, collate, list_images
from training.ema import EMA
from training.losses import PatchDiscriminator
from training.progress import Progress, log


@dataclass
class TrainConfig:
    data: str = field(default="skimage:", metadata={"help": "image folder (recursive), list file, or skimage: / sklearn: bundled photos"})
    out: str = field(default="runs/tokenizer", metadata={"help": "run folder: checkpoints/, model/ (EMA weights), tensorboard/, log.jsonl"})
    model: str = field(default="tiny", metadata={"help": "config preset (tiny, s64, m128, l256) or a model folder to fine-tune"})
    size: int = field(default=TILE, metadata={"help": "training crop size"})
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

    def __post_init__(self):
        if self.recipe not in ("official", "paper"):
            raise ValueError(f"--recipe must be official or paper, got {self.recipe!r}")
        require_positive(self, "size", "batch", "steps", "ckpt_every", "log_every")


def main(argv: list[str] | None = None) -> int:
    return distributed.run_trainer(train, parse_config(TrainConfig, argv, __doc__), (DataError, CheckpointError, OSError))


def train(cfg: TrainConfig, ddp: distributed.Distributed) -> int:
    """The run; ``log.info`` speaks on rank 0 only (setup_logging), files are written by rank 0 only."""
    out, device = Path(cfg.out), ddp.device
    ckpt_root = out / "checkpoints"
    if cfg.batch % ddp.world:
        raise DataError(f"--batch {cfg.batch} is not divisible by {ddp.world} processes")
    files = list_images(cfg.data)

    # ----------------------------------------------------------------- models (same init on every rank)
    ddp.seed(cfg.seed)
    model = recipe.build_model(cfg.model).to(device)
    mc = model.config
    if cfg.size > mc.tile:
        raise DataError(
            f"--size {cfg.size} is larger than the model's tile ({mc.tile}): training crops are single "
            "tiles (larger images are handled tile by tile at inference)"
        )
    tokens = cfg.tokens or mc.tokens_per_tile
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    disc = PatchDiscriminator().to(device)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas)
    lpips, inception = recipe.perceptual_nets(cfg, device)
    # the names are the checkpoint's file names
    modules = {"model": model, "ema": ema.model, "disc": disc}
    optimizers = {"optimizer": opt, "disc_optimizer": disc_opt}

    # ----------------------------------------------------------------- resume
    start, bad_total, small_total = 0, 0, 0
    found = find_resume_checkpoint(ckpt_root, cfg, cfg.resume, TrainConfig.FIXED_ON_RESUME, ddp.main)
    if found is not None:
        ckpt, parts, state = found
        if TokenizerConfig.from_dict(state["model_config"]) != mc:
            raise CheckpointError(f"{ckpt}: the checkpoint's model config differs from --model {cfg.model}")
        start = restore_training_state(ckpt, parts, state, modules, optimizers)
        bad_total, small_total = int(state.get("skipped_images", 0)), int(state.get("upscaled_samples", 0))
        log.info(f"resumed from {ckpt} (step {start})")

    # ----------------------------------------------------------------- data (batches are functions of seed and step)
    dataset = TokenizerDataset(files, cfg.size, tokens, mc.lam, mc.min_region, cfg.flip, cfg.scale_jitter, tile=mc.tile)
    sampler = StepBatches(len(files), cfg.batch, cfg.seed, start, cfg.steps, ddp.rank, ddp.world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate, persistent_workers=False,
        prefetch_factor=2 if cfg.workers else None,
    )
    progress = Progress(out, cfg.steps, start, ddp.main)  # creates OUT on rank 0
    if ddp.main:
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    log.info(
        f"{len(files)} images, {mc.name} ({model.num_parameters():,} parameters), {tokens} tokens, "
        f"global batch {cfg.batch} on {ddp.world} process(es) [{device}], steps {start}..{cfg.steps}"
    )

    # ----------------------------------------------------------------- loop
    ddp_model, ddp_disc = distributed.wrap(model), distributed.wrap(disc)
    step, t_last = start, time.time()
    for batch in loader:
        x, g_init, boxes = batch["image"].to(device), batch["g_init"].to(device), batch["boxes"].to(device)
        for item in batch["bad"]:
            log.warning(f"skipped unreadable image {item}")
        bad_total, small_total = bad_total + len(batch["bad"]), small_total + batch["small"]
        for group in opt.param_groups + disc_opt.param_groups:
            group["lr"] = recipe.lr_at(cfg, step)
        disc_turn = recipe.discriminator_turn(cfg, step)
        if disc_turn:
            stats = recipe.discriminator_step(ddp_model, ddp_disc, disc_opt, x, g_init, boxes)
        else:
            stats, recon, g = recipe.generator_step(cfg, step, ddp_model, model, ddp_disc, opt, x, g_init, boxes, lpips, inception)
            ema.update(model, recipe.autoencoder_steps(cfg, step))
        step += 1
        progress.step()

        # ------------------------------------------------------------- log (rank 0)
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.time()
            stats |= {"lr": recipe.lr_at(cfg, step - 1), "sec_per_step": (now - t_last) / cfg.log_every}
            t_last = now
            progress.scalars(step, stats, show=("loss/total", "psnr", "loss/disc"))
        if progress.pictures and (step % cfg.image_every == 0 or step == cfg.steps) and not disc_turn:
            progress.image("input | reconstruction | g_init | g", recipe.picture(x, recon, g_init, g), step)

        # ------------------------------------------------------------- save (rank 0 writes, all wait)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            if ddp.main:
                state = {
                    "train_config": dataclasses.asdict(cfg), "model_config": mc.to_dict(),
                    "skipped_images": bad_total, "upscaled_samples": small_total,
                }
                path = save_training_state(ckpt_root, step, modules, optimizers, state, keep=cfg.keep)
                ema.model.save_pretrained(out / "model")
                progress.write(f"step {step}: checkpoint {path.name}, EMA model -> {out / 'model'}")
                crash_point("after_ckpt", step)
            distributed.barrier()
    progress.close()

    # ----------------------------------------------------------------- summary
    if ddp.world > 1:
        diff = distributed.replica_difference(model)
        if ddp.main:
            (out / "ddp_check.json").write_text(json.dumps({"ranks": ddp.world, "max_abs_diff": diff}))
            log.info(f"parameters on {ddp.world} ranks: max difference {diff:.3g}")
    if ddp.main:
        if bad_total:
            log.warning(f"{bad_total} unreadable image load(s) were skipped")
        if small_total:
            log.info(f"{small_total} sample(s) came from images smaller than {cfg.size} px and were upscaled")
        log.info(f"done: {out / 'model'} holds the EMA weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
