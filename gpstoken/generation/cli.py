"""``gpstoken`` subcommands of the generator: official-file converters and sampling.

``register(subparsers)`` adds them to the ``gpstoken`` parser; ``gpstoken.cli.main`` prints a raised
CheckpointError / ValueError / FileExistsError as one line and exits 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpstoken_core import generation as stages
from gpstoken_core import sampling as core


def _cmd_convert_generator(args: argparse.Namespace) -> None:
    from .convert import convert_official_generator
    from .models import SiT

    if args.layouts is not None and args.tokenizer is None:
        raise ValueError("--layouts needs --tokenizer (both go into one generator folder)")
    if args.tokenizer is None:
        out = convert_official_generator(args.checkpoint, args.out, config=args.config, heads=args.heads)
        model = SiT.from_pretrained(out)
        what = "SiT folder"
    else:
        from .convert import convert_official_generator_folder

        gen = convert_official_generator_folder(
            args.checkpoint, args.out, args.tokenizer, layouts=args.layouts, config=args.config, heads=args.heads
        )
        model, out = gen.texture, args.out
        bank = f", layout bank of {len(gen.layout_bank)}" if gen.layout_bank is not None else ", no layout source"
        what = f"generator folder (tokenizer {gen.tokenizer.config.name}{bank})"
    cfg = model.config
    print(
        f"converted {args.checkpoint} ({cfg.name}: {model.num_parameters():,} parameters, depth {cfg.depth}, "
        f"width {cfg.hidden}, {cfg.num_tokens} tokens x {cfg.in_channels} channels) -> {what} {out}/"
    )


def _cmd_convert_layouts(args: argparse.Namespace) -> None:
    from .convert import convert_official_layout_bank

    bank = convert_official_layout_bank(args.pickle, args.out, num_classes=args.num_classes)
    print(f"converted {args.pickle} ({len(bank)} layouts, {len(bank.layouts)} classes, {bank.num_tokens} tokens) -> {args.out}")


def _check_generate_args(args: argparse.Namespace) -> None:
    """Checks that need no model, before torch loads and before anything is written."""
    if args.model is None:
        from . import shipped_generator_folder

        args.model = shipped_generator_folder()
        if args.model is None:
            raise ValueError(
                "no generator given and the demo generator is not installed: pass --model DIR (a folder written by "
                "GPSGenerator.save_pretrained or `gpstoken convert-official-generator ... --tokenizer DIR`)"
            )
    if args.class_id < 0:
        raise ValueError(f"unknown class id {args.class_id}: class ids are >= 0")
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise FileExistsError(f"{args.out}: exists and is not empty; choose a new folder")


def _cmd_generate(args: argparse.Namespace) -> None:
    _check_generate_args(args)

    from gpstoken_core.files import atomic_folder

    from .pictures import pipeline_picture
    from .pipeline import GPSGenerator

    gen = GPSGenerator.from_pretrained(args.model, device=args.device)
    gen._labels([args.class_id])  # unknown class: one line, before any sampling
    d = gen.sampler_defaults  # flags not given take the generator's own settings
    guidance = [d["guidance"][0] if args.guidance_low is None else args.guidance_low,
                d["guidance"][1] if args.guidance_high is None else args.guidance_high]
    o = stages.resolve_options(d, cfg_scale=args.cfg, guidance=guidance, layout_steps=args.layout_steps,
                               texture_steps=args.steps, sampler=args.sampler)
    steps, sampler = o["texture_steps"], o["sampler"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if sampler == "sde" and steps < 2:
        raise ValueError(f"--steps must be >= 2 for the SDE sampler (one Euler-Maruyama step + the last step), got {steps}")
    if o["layout_steps"] < 1:
        raise ValueError(f"--layout-steps must be >= 1, got {o['layout_steps']}")
    core.check_guidance(o["cfg_scale"], *o["guidance"])
    if gen.two_stage:
        source = "layout model" if gen.layout is not None else "layout bank"
    else:
        source = "one-stage"
    batches = [list(range(i, min(i + args.batch, args.num))) for i in range(0, args.num, args.batch)]
    written = []
    # Everything goes to a temporary folder renamed to --out at the end: an error or Ctrl-C leaves no
    # half-written output folder.
    with atomic_folder(args.out) as tmp:
        (tmp / "pipeline").mkdir()
        for j, batch in enumerate(batches):
            seed = args.seed + j  # batch j of --batch images draws from seed + j (the noise protocol is per batch)
            result = gen.generate(
                [args.class_id] * len(batch),
                seed=seed,
                cfg_scale=o["cfg_scale"],
                guidance=tuple(o["guidance"]),
                layout_steps=o["layout_steps"],
                texture_steps=o["texture_steps"],
                sampler=o["sampler"],
                progress=True,
            )
            for k, index in enumerate(batch):
                name = f"class{args.class_id}_seed{args.seed}_{index:04d}.png"
                _save_png(tmp / name, result.images[k])
                header = (
                    f"class {args.class_id}  sample {index}  seed {seed} (batch {j})  sampler {o['sampler']} "
                    f"{o['texture_steps']} steps  cfg {o['cfg_scale']:g} on t in [{o['guidance'][0]:g}, {o['guidance'][1]:g}]"
                )
                picture = pipeline_picture(result, k, source, header)
                _save_png(tmp / "pipeline" / name, picture)
                written.append(name)
    print(f"wrote {len(written)} images of class {args.class_id} to {args.out}/ and their pipeline pictures to {args.out}/pipeline/")


def _save_png(path: Path, image) -> None:
    from PIL import Image

    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    picture.save(path, format="PNG")


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
    conv.add_argument(
        "--tokenizer",
        type=Path,
        help="a gpstoken tokenizer folder (e.g. from `gpstoken convert-official`): OUT becomes a whole generator "
        "folder (tokenizer/, texture/) that `gpstoken generate --model OUT` reads",
    )
    conv.add_argument(
        "--layouts",
        type=Path,
        help="the layout bank from `gpstoken convert-official-layouts` (the official g_init source); needs --tokenizer",
    )
    conv.set_defaults(run=_cmd_convert_generator)

    lay = sub.add_parser(
        "convert-official-layouts",
        help="convert the official initg.pickle layout bank to safetensors (restricted unpickler, no code runs)",
    )
    lay.add_argument("pickle", type=Path, help="official initg.pickle")
    lay.add_argument("--out", required=True, type=Path, help="output .safetensors layout bank")
    lay.add_argument("--num-classes", type=int, default=1000, help="class count (default 1000)")
    lay.set_defaults(run=_cmd_convert_layouts)

    gen = sub.add_parser(
        "generate",
        help="class-conditional images from a generator folder, with a picture of each sample's pipeline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Generate --num images of ImageNet class --class with a GPSToken generator folder:\n"
            "  1. a layout: g_init (sigma_x, sigma_y, rho, mu_x, mu_y per token) from the layout model (few-step\n"
            "     ODE, then Alg. 2 calibration) or, for converted official weights, from the layout bank;\n"
            "  2. the texture SiT samples (dg, f) under that layout (--sampler, --steps, CFG --cfg);\n"
            "  3. g = g_init + dg and f are decoded by the folder's tokenizer.\n"
            "Writes OUT/class{N}_seed{S}_{k}.png and OUT/pipeline/ (same names): sampled g_init, calibrated\n"
            "g_init, refined g, image. OUT must not exist (or be empty); it appears only when all is written.\n"
            "Official defaults: SDE (Euler-Maruyama, SBDM diffusion) with 250 steps, cfg 1.5 for t in [0.2, 1].\n"
            "Default --model: the small digits demo generator shipped in the package (10 classes, 32x32 digits\n"
            "upscaled from scikit-learn's load_digits; a demo, not the paper's ImageNet model)."
        ),
    )
    gen.add_argument("--model", type=Path, help="generator folder (tokenizer/, texture/, layout/ or layout_bank.safetensors); default: the shipped digits demo")
    gen.add_argument("--class", dest="class_id", type=int, required=True, metavar="N", help="class id (digits demo: 0..9; ImageNet models: 0..999)")
    gen.add_argument("--num", type=int, default=1, metavar="K", help="images to make (default 1)")
    gen.add_argument("--out", type=Path, required=True, help="output folder for the PNGs (must be new or empty)")
    gen.add_argument("--seed", type=int, default=0, help="seed of batch 0; batch j uses seed + j (default 0)")
    gen.add_argument("--batch", type=int, default=8, help="images per sampler batch (default 8, as official)")
    model_default = "default: the generator's sampler.json, else"
    gen.add_argument("--cfg", type=float, help=f"classifier-free guidance scale, >= 0; 1 = off ({model_default} {core.CFG_SCALE:g}, official)")
    gen.add_argument("--guidance-low", type=float, help=f"CFG only from this t on, t = 0 noise ({model_default} {core.GUIDANCE_LOW:g}, official)")
    gen.add_argument("--guidance-high", type=float, help=f"CFG only up to this t ({model_default} {core.GUIDANCE_HIGH:g})")
    gen.add_argument("--sampler", choices=["sde", "euler", "heun"],
                     help=f"texture sampler: sde (official Euler-Maruyama), or fixed-step ODE euler / heun ({model_default} sde)")
    gen.add_argument("--steps", type=int, help=f"texture sampler steps ({model_default} {core.SDE_STEPS}, the official SDE; heun: 2 model calls per step)")
    gen.add_argument("--layout-steps", type=int, help=f"layout-model Heun ODE steps ({model_default} 5)")
    gen.add_argument("--device", default="cpu", help="torch device (default cpu)")
    gen.set_defaults(run=_cmd_generate)

    from .cli_data import register as register_data  # encode-dataset, eval-generator

    register_data(sub)
