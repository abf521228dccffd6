"""Train a GPSToken generator stage on token shards (run from the repository root).

Shards:           gpstoken encode-dataset train/ --tokenizer M128 --out shards/ [--flip]
Single process:   python -m training.train_generator --stage texture --shards shards/ --out runs/texture
Several (DDP):    torchrun --nproc_per_node 8 -m training.train_generator --stage texture --shards shards/ ...
                  (gloo on CPU, nccl on GPUs; --batch is the global batch, split over the processes)
Resume:           the same command with --resume (continues from OUT/checkpoints/latest exactly)

Stages: layout (SiT over g_init, class-conditional), texture (SiT over (g - g_init, f) under g_init, with
--cond-noise on the condition), one-stage (SiT over (g, f)). The per-channel statistics of the modelled
tokens (and of the condition) are computed from the shards and stored in the model config. OUT/model holds
the EMA weights: a SiT folder for ``GPSGenerator`` (tokenizer/, texture/, layout/; see the README).

Every sample's randomness (t, noise, condition noise, label dropout) comes from (seed, global position),
so a run continues bit for bit after a resume, and N processes compute the global batch one would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpstoken.checkpoint import CheckpointError
from gpstoken.generation.config import PRESETS, SiTConfig, preset
from gpstoken.generation.models import SiT
from gpstoken.generation.shards import DataError, TokenShards, model_data, shard_stats
from gpstoken.generation.transport import velocity_loss
from training import distributed
from training.checkpointing import (
    crash_point, find_resume_checkpoint, restore_training_state, save_training_state,
)
from training.config import parse_config, require_positive
from training.data import StepBatches
from training.ema import EMA
from training.progress import Progress, log

STAGES = {"layout": "layout", "texture": "texture", "one-stage": "onestage"}  # --stage -> SiTConfig.role
DEFAULT_MODEL = {"layout": "SiT-S/layout", "texture": "SiT-XL/2-gs", "one-stage": "SiT-XL/onestage"}


@dataclass
class GeneratorTrainConfig:
    shards: str = field(default="", metadata={"help": "token-shard folder from `gpstoken encode-dataset`"})
    stage: str = field(default="texture", metadata={"help": "layout, texture or one-stage"})
    out: str = field(default="runs/generator", metadata={"help": "run folder: checkpoints/, model/ (EMA weights), tensorboard/, log.jsonl"})
    model: str = field(default="", metadata={"help": f"SiT preset ({', '.join(PRESETS)}); empty: the paper's for the stage"})
    batch: int = field(default=256, metadata={"help": "global batch size (SiT 256; split over processes)"})
    steps: int = field(default=400_000, metadata={"help": "total optimizer steps"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw (SiT) or adam"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate (SiT 1e-4, constant)"})
    lr_decay_after: int = field(default=0, metadata={"help": "from this step on the LR falls along a cosine to --lr-min at --steps (0: constant LR, SiT)"})
    lr_min: float = field(default=0.0, metadata={"help": "the LR reached at --steps when --lr-decay-after is set"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (SiT 0)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    grad_clip: float = field(default=0.0, metadata={"help": "clip the gradient norm (0: off)"})
    class_dropout: float = field(default=0.1, metadata={"help": "label dropout for classifier-free guidance (SiT 0.1)"})
    cond_noise: float = field(default=0.5, metadata={"help": "texture stage: std of noise on the normalized g_init condition (paper 0.5)"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay (SiT 0.9999, constant)"})
    ema_power: float = field(default=0.0, metadata={"help": "ramp the EMA decay as 1 - (1 + step)^-power up to --ema-decay, for short runs (0: constant, SiT)"})
    seed: int = field(default=0, metadata={"help": "seed of the initialization, data order and noise"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: default)"})
    log_every: int = field(default=100, metadata={"help": "steps between scalar logs"})
    ckpt_every: int = field(default=5000, metadata={"help": "steps between checkpoints"})
    keep: int = field(default=3, metadata={"help": "checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoints (exactly where it stopped)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})

    # They define the model, the data order and every sample's noise: a resume must not change them.
    FIXED_ON_RESUME = ("shards", "stage", "model", "batch", "seed", "class_dropout", "cond_noise", "optimizer")

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if not self.shards:
            raise ValueError("--shards is required (a folder from `gpstoken encode-dataset`)")
        if self.optimizer not in ("adamw", "adam"):
            raise ValueError(f"--optimizer must be adamw or adam, got {self.optimizer!r}")
        self.model = self.model or DEFAULT_MODEL[self.stage]
        require_positive(self, "batch", "steps", "ckpt_every", "log_every")
        if not 0 <= self.lr_decay_after < self.steps:
            raise ValueError(f"--lr-decay-after must be in [0, --steps), got {self.lr_decay_after}")
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"--lr-min must be in [0, --lr], got {self.lr_min}")
        if self.ema_power < 0:
            raise ValueError(f"--ema-power must be >= 0, got {self.ema_power}")

    def lr_at(self, step: int) -> float:
        """The LR of optimizer step ``step`` (0-based): constant, then a cosine tail when lr_decay_after > 0.

        Steps before lr_decay_after see exactly --lr, so a constant-LR run resumed with a tail added (and a
        larger --steps) continues the run it was."""
        if not self.lr_decay_after or step < self.lr_decay_after:
            return self.lr
        frac = (step - self.lr_decay_after) / (self.steps - self.lr_decay_after)
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def main(argv: list[str] | None = None) -> int:
    return distributed.run_trainer(train, parse_config(GeneratorTrainConfig, argv, __doc__), (DataError, CheckpointError, OSError, ValueError))


def build_config(cfg: GeneratorTrainConfig, shards: TokenShards, ddp: distributed.Distributed) -> SiTConfig:
    """The stage's preset fitted to the shards (tokens, channels, classes) with statistics from them."""
    role = STAGES[cfg.stage]
    base = preset(cfg.model)
    if base.role != role:
        raise ValueError(f"--model {cfg.model} is a {base.role} model, --stage {cfg.stage} trains a {role} model")
    sizes = {"num_tokens": shards.num_tokens, "num_classes": shards.num_classes, "class_dropout": cfg.class_dropout}
    if role != "layout":
        sizes["in_channels"] = 5 + shards.channels
    reduce = lambda t: distributed.all_reduce_sum(t.to(ddp.device)).cpu()  # noqa: E731 (nccl reduces GPU tensors)
    stats = shard_stats(shards, role, ddp.rank, ddp.world, reduce, progress=ddp.main)
    # learn_sigma only describes official weights; a trained model predicts the velocity alone
    return base.replace(learn_sigma=False, **sizes, **stats)


def sample_noise(items: list[tuple[int, int]], cfg: GeneratorTrainConfig, mc: SiTConfig) -> dict[str, torch.Tensor]:
    """Per-sample t (B,), noise (B, L, C), condition jitter (B, L, 5) and label-drop mask (B,), each drawn
    from the sample's own seed (StepBatches), so they do not depend on how the batch is split."""
    out = {"t": [], "noise": [], "jitter": [], "drop": []}
    for _, seed in items:
        gen = torch.Generator().manual_seed(seed)
        out["t"].append(torch.rand(1, generator=gen))
        out["noise"].append(torch.randn(1, mc.num_tokens, mc.in_channels, generator=gen))
        out["jitter"].append(torch.randn(1, mc.num_tokens, 5, generator=gen))
        out["drop"].append(torch.rand(1, generator=gen) < cfg.class_dropout)
    return {k: torch.cat(v) for k, v in out.items()}


def train(cfg: GeneratorTrainConfig, ddp: distributed.Distributed) -> int:
    out, device = Path(cfg.out), ddp.device
    ckpt_root = out / "checkpoints"
    if cfg.batch % ddp.world:
        raise DataError(f"--batch {cfg.batch} is not divisible by {ddp.world} processes")
    shards = TokenShards(cfg.shards)

    # ----------------------------------------------------------------- resume or a new model
    found = find_resume_checkpoint(ckpt_root, cfg, cfg.resume, GeneratorTrainConfig.FIXED_ON_RESUME, ddp.main, distributed.barrier)
    if found is not None:
        ckpt, parts, state = found
        if state.get("tokenizer_hash") != shards.info["tokenizer_hash"]:
            raise CheckpointError(f"{ckpt}: was written with a different tokenizer of the shards; resume with the same settings or start a new --out")
        mc = SiTConfig.from_dict(state["model_config"])  # the statistics of the first run
    else:
        ckpt = None
        mc = build_config(cfg, shards, ddp)
    shards.check_model(mc)

    # ----------------------------------------------------------------- model (same init on every rank)
    ddp.seed(cfg.seed)
    model = SiT(mc).to(device).train()
    model.y_embedder.dropout = 0.0  # label dropout is drawn per sample in sample_noise (split-independent)
    if mc.cond_channels and mc.cond_mode == "input":
        model.pos_embed.requires_grad_(False)  # unused: the layout takes its place (official); DDP wants every grad
    ema = EMA(model, cfg.ema_decay, power=cfg.ema_power or None, update_after_step=-1)  # SiT: constant from step 0
    opt_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_class(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    modules, optimizers = {"model": model, "ema": ema.model}, {"optimizer": opt}  # names = checkpoint files
    start = 0
    if ckpt is not None:
        start = restore_training_state(ckpt, parts, state, modules, optimizers)
        log.info(f"resumed from {ckpt} (step {start})")

    # ----------------------------------------------------------------- data (batches are functions of seed and step)
    batches = StepBatches(len(shards), cfg.batch, cfg.seed, start, cfg.steps, ddp.rank, ddp.world)
    progress = Progress(out, cfg.steps, start, ddp.main)
    if ddp.main:
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    log.info(
        f"{len(shards)} token rows, {mc.name} {mc.role} ({model.num_parameters():,} parameters), {mc.num_tokens} tokens x "
        f"{mc.in_channels} channels, {mc.num_classes} classes, global batch {cfg.batch} on {ddp.world} process(es) [{device}], "
        f"steps {start}..{cfg.steps}"
    )

    # ----------------------------------------------------------------- loop
    ddp_model = distributed.wrap(model)
    step, t_last = start, time.time()
    for items in batches:
        rows = shards.rows([i for i, _ in items])
        x, cond = model_data(rows, mc.role)
        labels = rows["label"]
        rnd = sample_noise(items, cfg, mc)
        y = torch.where(rnd["drop"], torch.full_like(labels, mc.num_classes), labels).to(device)
        if cond is not None:  # the paper's condition noise, in normalized units (velocity_loss's convention)
            cond = cond.to(device) + cfg.cond_noise * rnd["jitter"].to(device) * model.cond_std
        loss = velocity_loss(ddp_model, model.normalize(x.to(device)), y, cond, t=rnd["t"].to(device), noise=rnd["noise"].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        stats = {"loss": loss.item(), "lr": cfg.lr_at(step)}
        if cfg.grad_clip > 0:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        opt.step()
        ema.update(model, step)
        step += 1
        progress.step()

        # ------------------------------------------------------------- log (rank 0)
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.time()
            stats |= {"loss_mean": distributed.all_reduce_mean(loss.detach()).item(), "sec_per_step": (now - t_last) / cfg.log_every}
            t_last = now
            progress.scalars(step, stats, show=("loss_mean",))

        # ------------------------------------------------------------- save (rank 0 writes, all wait)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            if ddp.main:
                state = {"train_config": dataclasses.asdict(cfg), "model_config": mc.to_dict(), "tokenizer_hash": shards.info["tokenizer_hash"]}
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
    log.info(f"done: {out / 'model'} holds the EMA weights ({mc.role} SiT folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
