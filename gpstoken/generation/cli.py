"""``gpstoken`` subcommands of the generator: official-file converters and sampling.

``register(subparsers)`` adds them to the ``gpstoken`` parser; ``gpstoken.cli.main`` prints a raised
CheckpointError / ValueError / FileExistsError as one line and exits 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpstoken_core import sampling as core


def _cmd_convert_generator(args: argparse.Namespace) -> None:
    from .convert import convert_official_generator
    from .models import SiT

    out = convert_official_generator(args.checkpoint, args.out, config=args.config, heads=args.heads)
    model = SiT.from_pretrained(out)
    cfg = model.config
    print(
        f"converted {args.checkpoint} ({cfg.name}: {model.num_parameters():,} parameters, depth {cfg.depth}, "
        f"width {cfg.hidden}, {cfg.num_tokens} tokens x {cfg.in_channels} channels) -> {out}/"
    )


def _cmd_convert_layouts(args: argparse.Namespace) -> None:
    from .convert import convert_official_layout_bank

    bank = convert_official_layout_bank(args.pickle, args.out, num_classes=args.num_classes)
    print(f"converted {args.pickle} ({len(bank)} layouts, {len(bank.layouts)} classes, {bank.num_tokens} tokens) -> {args.out}")


def _cmd_generate(args: argparse.Namespace) -> None:
    from PIL import Image

    from gpstoken_core.files import atomic_write

    from .pipeline import GPSGenerator

    gen = GPSGenerator.from_pretrained(args.model, device=args.device)
    images = gen.sample(
        args.labels,
        seed=args.seed,
        cfg_scale=args.cfg_scale,
        guidance=(args.guidance_low, args.guidance_high),
        layout_steps=args.layout_steps,
        texture_steps=args.steps,
        sampler=args.sampler,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for k, (label, image) in enumerate(zip(args.labels, images)):
        path = args.out / f"{args.seed}_{k}_class{label}.png"
        atomic_write(path, lambda tmp, im=image: Image.fromarray(im).save(tmp, format="PNG"))
    print(f"wrote {len(images)} images to {args.out}/")


def register(sub) -> None:
    conv = sub.add_parser(
        "convert-official-generator",
        help="convert the official generator.safetensors (SiT-XL/2-gs) to a gpstoken generator folder",
        description=(
            "Read the released generator weights (a local file; nothing is downloaded), keep the ema_model.* "
            "tensors as the official loader does, infer the architecture from the shapes and save "
            "OUT/config.json + OUT/model.safetensors, loadable with gpstoken.generation.SiT.from_pretrained."
        ),
    )
    conv.add_argument("checkpoint", type=Path, help="official generator .safetensors file")
    conv.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    conv.add_argument("--config", type=Path, help="official gpstoken_generator.yaml for the channel statistics (default: built-in official values)")
    conv.add_argument("--heads", type=int, help="attention heads, for widths outside SiT's table")
    conv.set_defaults(run=_cmd_convert_generator)

    lay = sub.add_parser(
        "convert-official-layouts",
        help="convert the official initg.pickle layout bank to safetensors (restricted unpickler, no code runs)",
    )
    lay.add_argument("pickle", type=Path, help="official initg.pickle")
    lay.add_argument("--out", required=True, type=Path, help="output .safetensors layout bank")
    lay.add_argument("--num-classes", type=int, default=1000, help="class count (default 1000)")
    lay.set_defaults(run=_cmd_convert_layouts)

    gen = sub.add_parser("generate", help="class-conditional images from a generator folder (tokenizer/, texture/, layout/)")
    gen.add_argument("model", type=Path, help="generator folder")
    gen.add_argument("--labels", type=int, nargs="+", required=True, help="class ids, one image each")
    gen.add_argument("--out", type=Path, default=Path("generated"), help="output folder for PNGs")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--cfg-scale", type=float, default=core.CFG_SCALE)
    gen.add_argument("--guidance-low", type=float, default=core.GUIDANCE_LOW, help="CFG from this t (t units; official 0.2)")
    gen.add_argument("--guidance-high", type=float, default=core.GUIDANCE_HIGH)
    gen.add_argument("--steps", type=int, default=core.SDE_STEPS, help="texture sampler steps (official SDE: 250)")
    gen.add_argument("--layout-steps", type=int, default=5)
    gen.add_argument("--sampler", choices=["sde", "euler", "heun"], default="sde")
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(run=_cmd_generate)

    from .cli_data import register as register_data  # encode-dataset, eval-generator

    register_data(sub)
