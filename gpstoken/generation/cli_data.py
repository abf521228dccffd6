"""``gpstoken`` subcommands for generator data and evaluation: ``encode-dataset`` and ``eval-generator``.

Registered from ``gpstoken.generation.cli.register``; torch loads only when a command runs. Errors are
ValueError / FileExistsError / CheckpointError, which ``gpstoken.cli.main`` prints as one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gpstoken_core import sampling as core


def _cmd_encode_dataset(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from ..tokenizer import GPSTokenizer
    from .shards import TokenShards, encode_dataset

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = args.device
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # only barriers: gloo works beside GPUs too
    try:
        tokenizer = GPSTokenizer.from_pretrained(args.tokenizer, device)
        report = encode_dataset(
            args.data, tokenizer, args.out, size=args.size, num_tokens=args.tokens, shard_size=args.shard_size,
            batch=args.batch, flip=args.flip, num_classes=args.num_classes, resume=args.resume, rank=rank,
            world=world, barrier=dist.barrier if world > 1 else (lambda: None), progress=not args.quiet,
        )  # fmt: skip
        for item in report.skipped[:5]:
            print(f"warning: skipped unreadable image {item}", file=sys.stderr)
        if rank == 0:
            shards = TokenShards(args.out)  # checks the whole set once every process is done
            print(
                f"{args.out}/: {len(shards.paths)} shards, {len(shards)} token rows of {shards.num_tokens} tokens x "
                f"(5 + {shards.channels}), {shards.num_classes} classes; this run wrote {report.shards_written} shard(s), "
                f"kept {report.shards_kept}; {len(shards.skipped)} unreadable image(s) skipped"
                + (" (listed in the shards' metadata)" if shards.skipped else "")
            )
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _cmd_eval_generator(args: argparse.Namespace) -> None:
    from .evaluation import evaluate_generator_cli

    evaluate_generator_cli(args)


def register(sub) -> None:
    enc = sub.add_parser(
        "encode-dataset",
        help="encode images into token shards (g_init, g, f, label) for generator training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Encode DATA once with a tokenizer into OUT/shard-KKKKK-NNNNN.safetensors + OUT/dataset.json.\n"
            "DATA: an ImageNet-style folder (class = sub-folder, sorted), a list file of 'path label' lines,\n"
            "skimage: / sklearn: (each bundled photo its own class) or digits:. Images are resized and\n"
            "centre-cropped to --size and partitioned into --tokens tokens. Unreadable images are skipped and\n"
            "counted. Finished shards are kept by --resume; a half-written shard is never used.\n"
            "ImageNet: torchrun --nproc-per-node 8 -m gpstoken.cli encode-dataset train/ --tokenizer M128 --out S/\n"
            "(each process writes its own shards, K mod 8)."
        ),
    )
    enc.add_argument("data", help="image folder tree, list file, skimage:, sklearn: or digits:")
    enc.add_argument("--tokenizer", required=True, help="tokenizer folder (or hub id)")
    enc.add_argument("--out", required=True, type=Path, help="shard folder (new, or an unfinished one with --resume)")
    enc.add_argument("--size", type=int, help="crop size (default: the tokenizer's tile, 256)")
    enc.add_argument("--tokens", type=int, help="tokens per image (default: the tokenizer's tokens_per_tile)")
    enc.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    enc.add_argument("--batch", type=int, default=32, help="images per encoder batch (default 32)")
    enc.add_argument("--flip", action="store_true", help="store each image also mirrored (official: flip at tokenization)")
    enc.add_argument("--num-classes", type=int, help="class count of a list file (default: largest label + 1)")
    enc.add_argument("--resume", action="store_true", help="finish an interrupted run (same settings)")
    enc.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu or cuda (default auto)")
    enc.add_argument("--quiet", action="store_true", help="no progress bar")
    enc.set_defaults(run=_cmd_encode_dataset)

    ev = sub.add_parser(
        "eval-generator",
        help="generate N images per class and report FID against a reference folder (+ a judge's accuracy)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Generate --num-per-class images of each class with a generator folder and measure them:\n"
            "  FID against --reference (images, recursively) with local Inception weights (--inception-weights);\n"
            "  with --judge MODULE:FACTORY (FACTORY(--judge-weights) returns an object with predict(images) ->\n"
            "  labels and features(images) -> (N, D), images uint8 (N, H, W, 3)): per-class accuracy of the\n"
            "  judge on the generated images and a Frechet distance in its feature space against --reference.\n"
            "Writes the report as JSON to --report (and prints it); --samples keeps the PNGs."
        ),
    )
    ev.add_argument("--model", required=True, type=Path, help="generator folder (tokenizer/, texture/, layout/ ...)")
    ev.add_argument("--num-per-class", type=int, default=50, help="images per class (default 50, as the official run)")
    ev.add_argument("--classes", help="comma-separated class ids (default: all of the generator's classes)")
    ev.add_argument("--reference", type=Path, help="folder of real images (recursive) for FID / judge Frechet distance")
    ev.add_argument("--inception-weights", type=Path, help="local FID Inception-v3 weights (.safetensors or .pth)")
    ev.add_argument("--judge", help="MODULE:FACTORY returning a judge (predict, features); e.g. gpstoken.generation.digits:load_judge")
    ev.add_argument("--judge-weights", help="argument passed to the judge factory (e.g. its weights folder)")
    ev.add_argument("--report", type=Path, help="write the report here (JSON)")
    ev.add_argument("--samples", type=Path, help="also save the generated images as PNGs in this new folder")
    ev.add_argument("--seed", type=int, default=0, help="seed of batch 0; batch j uses seed + j (default 0)")
    ev.add_argument("--batch", type=int, default=8, help="images per sampler batch (default 8)")
    ev.add_argument("--cfg", type=float, default=core.CFG_SCALE, help=f"CFG scale (default {core.CFG_SCALE:g})")
    ev.add_argument("--sampler", choices=["sde", "euler", "heun"], default="sde", help="texture sampler (default sde)")
    ev.add_argument("--steps", type=int, default=core.SDE_STEPS, help=f"texture sampler steps (default {core.SDE_STEPS})")
    ev.add_argument("--layout-steps", type=int, default=5, help="layout-model ODE steps (default 5)")
    ev.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ev.set_defaults(run=_cmd_eval_generator)
