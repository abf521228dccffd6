"""The ``gpstoken`` command line.

A user error (missing file, corrupt image, bad value) prints one line naming the problem and exits
with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from gpstoken_core.official import MIN_REGION, PARTITION_LAMBDA, SUPPORT, TOKENS_PER_TILE
from gpstoken_core.tiling import DECODE_MODES, TILE

from .checkpoint import CheckpointError
from gpstoken_core.imageio import ImageError, bundled_photo, center_crop_resize, load_image


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_fit(args: argparse.Namespace) -> None:
    from .fit import fit_gaussians
    from .viz import draw_gaussians, panels

    if args.image is not None:
        image, source = load_image(args.image), str(args.image)
    else:
        image, source = bundled_photo(args.photo), f"skimage.data.{args.photo}"
    if min(image.shape[:2]) < 8:
        raise ImageError(f"{source}: {image.shape[1]}x{image.shape[0]} is too small (at least 8x8)")
    image = center_crop_resize(image, args.size)
    print(f"Fitting {args.tokens} Gaussian tokens to {source} ({args.size}x{args.size}), {args.steps} steps")
    result = fit_gaussians(image, tokens=args.tokens, steps=args.steps, support=args.support)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    picture = panels(
        [
            image,
            result.render_init,
            draw_gaussians(image, result.gaussians_init),
            result.render,
            draw_gaussians(image, result.gaussians),
        ],
        [
            "input",
            f"grid {result.psnr_init:.1f} dB",
            "grid Gaussians",
            f"optimized {result.psnr:.1f} dB",
            "optimized Gaussians",
        ],
        scale=2 if args.size <= 192 else 1,
    )
    picture.save(out / "fit.png")
    np.savez(out / "gaussians.npz", initial=result.gaussians_init, optimized=result.gaussians)
    print(f"PSNR  grid placement (least-squares colours): {result.psnr_init:.2f} dB")
    print(f"PSNR  after optimizing through the splat op:  {result.psnr:.2f} dB")
    print(f"time  {result.seconds:.1f} s")
    print(f"wrote {out / 'fit.png'} and {out / 'gaussians.npz'}")


def _box(text: str) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x0,y0,x1,y1 (integers), got {text!r}") from None
    return x0, y0, x1, y1


def _input_image(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """The image file or bundled photo the command works on, resized + centre-cropped to --size if > 0."""
    if args.image is not None:
        image, source = load_image(args.image), str(args.image)
    else:
        image, source = bundled_photo(args.photo), f"skimage.data.{args.photo}"
    if args.size:
        image = center_crop_resize(image, args.size)
    return image, source


def _cmd_partition(args: argparse.Namespace) -> None:
    from gpstoken_core.partition import partition, priority_from_boxes, priority_from_mask
    from .viz import draw_gaussians

    image, source = _input_image(args)
    h, w = image.shape[:2]
    priority = None
    if args.focus:
        priority = priority_from_boxes((h, w), args.focus, args.focus_weight)
    if args.focus_mask is not None:
        mask = load_image(args.focus_mask)
        if mask.shape[:2] != (h, w):
            raise ImageError(f"{args.focus_mask}: mask is {mask.shape[1]}x{mask.shape[0]}, the image {w}x{h}")
        mask_priority = priority_from_mask(mask, args.focus_weight)
        priority = mask_priority if priority is None else priority + mask_priority
    result = partition(image, args.tokens, lam=args.lam, min_size=args.min_size, priority=priority)
    picture = draw_gaussians(image, result.gaussians_in_image(), boxes=result.boxes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    sizes = (result.boxes[:, 2] - result.boxes[:, 0] + 1) * (result.boxes[:, 3] - result.boxes[:, 1] + 1)
    print(
        f"{source}: {w}x{h}, {len(result)} tokens in {len(result.tiles)} tile(s); region areas "
        f"{sizes.min()}..{sizes.max()} px; wrote {out}"
    )


def default_model() -> Path | None:
    """The small demo model shipped inside the package, if this install has it."""
    path = Path(__file__).parent / "weights" / "tiny"
    return path if (path / "model.safetensors").exists() else None


def load_model(model_arg, device: str):
    from .tokenizer import GPSTokenizer

    path = Path(model_arg) if model_arg else default_model()
    if path is None:
        raise ValueError(
            "no model given: pass --model DIR (a folder written by save_pretrained or `gpstoken convert-official`)"
        )
    return GPSTokenizer.from_pretrained(path, device=device), path


def _cmd_reconstruct(args: argparse.Namespace) -> None:
    import time

    import torch

    from .checkpoint import save_tensors
    from gpstoken_core.metrics import psnr, ssim
    from gpstoken_core.partition import priority_from_boxes
    from .tokenizer import to_uint8
    from .viz import draw_gaussians, error_map, panels

    image, source = _input_image(args)
    model, model_path = load_model(args.model, args.device)
    h, w = image.shape[:2]
    priority = priority_from_boxes((h, w), args.focus, args.focus_weight) if args.focus else None
    with torch.inference_mode():
        model.reconstruct(image[:64, :64], 16)  # warm-up, so latency excludes one-off setup
        t0 = time.perf_counter()
        tokens = model.encode(image, args.tokens, priority)
        t1 = time.perf_counter()
        recon = to_uint8(model.decode(tokens, args.decode))[0]
        t2 = time.perf_counter()
    g_init = tokens.image_g(tokens.g_init)[0].cpu().numpy()
    g = tokens.image_g()[0].cpu().numpy()
    quality = (psnr(image, recon), ssim(image, recon))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    pictures = {
        "input.png": Image.fromarray(image),
        "reconstruction.png": Image.fromarray(recon),
        "gaussians_init.png": draw_gaussians(image, g_init, color=(64, 160, 255)),
        "gaussians.png": draw_gaussians(image, g),
        "error.png": Image.fromarray(error_map(image, recon)),
    }
    pictures["compare.png"] = panels(
        list(pictures.values()),
        ["input", f"recon {quality[0]:.2f} dB", "g_init (partition)", "g (refined)", "|error| (64 = max)"],
        scale=2 if max(h, w) <= 160 else 1,
    )
    for name, picture in pictures.items():
        picture.save(out / name)
    save_tensors(
        out / "tokens.safetensors",
        {"g": tokens.g[0], "f": tokens.f[0], "g_init": tokens.g_init[0], "g_image": tokens.image_g()[0]},
        metadata={"image_size": f"{h},{w}", "model": str(model_path)},
    )
    mode = f" decoded {args.decode or model.config.decode_mode}" if len(tokens.tile_boxes) > 1 else ""
    print(f"{source}: {w}x{h}, {len(tokens)} tokens ({len(tokens.tile_boxes)} tile(s)){mode}, model {model_path} ({model.config.name})")
    print(f"PSNR {quality[0]:.2f} dB   SSIM {quality[1]:.4f}")
    print(f"latency  encode {1000 * (t1 - t0):.0f} ms (partition + encoder)   decode {1000 * (t2 - t1):.0f} ms  [{args.device}]")
    print(f"wrote {', '.join(sorted(pictures))} and tokens.safetensors to {out}/")


def _cmd_convert_official(args: argparse.Namespace) -> None:
    from .convert import convert_official

    model = convert_official(args.checkpoint, args.config, args.out)
    print(f"converted {args.checkpoint} ({model.num_parameters():,} parameters, {args.config}) -> {args.out}/")


def _cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate
    from .imagesets import list_images
    from .perceptual import InceptionFeatures, LPIPS

    model, model_path = load_model(args.model, args.device)
    files = list_images(args.data)
    lpips = LPIPS.from_weights(args.lpips_weights).to(args.device) if args.lpips_weights else None
    inception = InceptionFeatures.from_weights(args.inception_weights).to(args.device) if args.inception_weights else None
    result = evaluate(model, files, args.size, args.tokens, lpips, inception)
    print(f"model {model_path} ({model.config.name}) on {args.data}")
    print(result.table())
    off = [n for n, m in (("LPIPS", lpips), ("rFID", inception)) if m is None]
    if off:
        print(f"({' and '.join(off)} not computed: pass --lpips-weights / --inception-weights with local weight files)")
    for item in result.skipped:
        print(f"skipped {item}")


def _reconstruct_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("image", nargs="?", type=Path, help="image file (default: a bundled photo)")
    parser.add_argument("--photo", default="astronaut", help="skimage.data photo when no image is given (default astronaut)")
    parser.add_argument("--model", type=Path, help="model folder (save_pretrained / convert-official); default: the shipped demo model")
    parser.add_argument("--tokens", type=positive_int, default=None, help="token count (default: the model's tokens per 256x256 tile, scaled by area)")
    parser.add_argument("--size", type=int, default=256, help="resize short side + centre crop to this (0: keep the image size; default 256)")
    parser.add_argument("--focus", type=_box, action="append", help="x0,y0,x1,y1 box that attracts tokens (repeatable)")
    parser.add_argument("--focus-weight", type=float, default=200.0, help="priority per focused pixel (default 200)")
    parser.add_argument("--decode", choices=DECODE_MODES, default=None,
                        help="images of several tiles: 'merged' (one map, per-tile statistics; official S/M) or 'tiles' "
                             "(each tile alone; official L256); default: the model's config.decode_mode")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", default=default_out, help=f"output folder (default ./{default_out})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpstoken",
        description="GPSToken: images as 2D Gaussian tokens. Run `gpstoken COMMAND --help` for details.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="reconstruct a bundled photo with the shipped demo model: pictures, PSNR/SSIM, latency",
        description=(
            "`gpstoken reconstruct` with its defaults: the small demo model shipped in the package encodes "
            "scikit-image's astronaut (256x256) into 128 Gaussian tokens and decodes it. Writes OUT/input.png, "
            "reconstruction.png, gaussians_init.png, gaussians.png, error.png, compare.png and tokens.safetensors. "
            "See `gpstoken reconstruct --help` for every option."
        ),
    )
    _reconstruct_arguments(demo, default_out="gpstoken_demo")
    demo.set_defaults(run=_cmd_reconstruct)

    fit = sub.add_parser(
        "fit",
        help="fit Gaussian tokens to a photo through the differentiable splat op and draw them (no model)",
        description=(
            "An example of the splat op alone, no tokenizer model: place Gaussian tokens on a regular grid "
            "(official sigma = cell width / 3), solve their colours by least squares, then optimize every "
            "parameter (sigma, rho, mean, colour) through gpstoken.splat. Prints the PSNR before and after. "
            "Writes OUT/fit.png (input | grid render | grid Gaussians | optimized render | optimized Gaussians) "
            "and OUT/gaussians.npz (arrays 'initial' and 'optimized', each (L, 5) "
            "sigma_x, sigma_y, rho, mu_x, mu_y over the image). "
            "Uses a photo bundled with scikit-image unless --image is given."
        ),
    )
    fit.add_argument("--image", type=Path, help="an image file to use instead of the bundled photo")
    fit.add_argument("--photo", default="astronaut", help="name of a skimage.data photo (default: astronaut)")
    fit.add_argument("--size", type=positive_int, default=128, help="square working size in pixels (default 128)")
    fit.add_argument("--tokens", type=positive_int, default=256, help="number of tokens, rounded to a square (default 256)")
    fit.add_argument("--steps", type=positive_int, default=500, help="optimization steps (default 500)")
    fit.add_argument("--support", type=float, default=SUPPORT, help=f"support factor s of the splat (official: {SUPPORT:g})")
    fit.add_argument("--out", default="gpstoken_fit", help="output folder (default ./gpstoken_fit)")
    fit.set_defaults(run=_cmd_fit)

    part = sub.add_parser(
        "partition",
        help="place tokens with the entropy-driven partition (Alg. 1) and draw them",
        description=(
            "Split the image (per 256x256 tile) into regions by entropy-weighted complexity (paper Alg. 1, "
            "official rules) and write a picture with the region boxes (white) and the g_init Gaussians as "
            "1-sigma ellipses (red). --focus / --focus-mask pull tokens into a region (paper Fig. 5)."
        ),
    )
    part.add_argument("image", nargs="?", type=Path, help="image file (default: a bundled photo)")
    part.add_argument("--photo", default="astronaut", help="skimage.data photo when no image is given")
    part.add_argument("--tokens", type=positive_int, default=None,
                      help=f"token count (default {TOKENS_PER_TILE} per {TILE}x{TILE} tile)")
    part.add_argument("--size", type=int, default=256, help="resize short side + centre crop to this (0: keep; default 256)")
    part.add_argument("--lam", type=float, default=PARTITION_LAMBDA,
                      help=f"entropy exponent lambda (official {PARTITION_LAMBDA:g})")
    part.add_argument("--min-size", type=positive_int, default=MIN_REGION,
                      help=f"minimum region side (official {MIN_REGION})")
    part.add_argument("--focus", type=_box, action="append", help="x0,y0,x1,y1 box that attracts tokens (repeatable)")
    part.add_argument("--focus-mask", type=Path, help="image whose non-zero pixels attract tokens")
    part.add_argument("--focus-weight", type=float, default=200.0, help="priority per focused pixel (default 200)")
    part.add_argument("--out", default="partition.png", help="output picture (default partition.png)")
    part.set_defaults(run=_cmd_partition)

    rec = sub.add_parser(
        "reconstruct",
        help="encode a photo into Gaussian tokens and decode it back; pictures + PSNR/SSIM",
        description=(
            "Partition the image (Alg. 1), encode it into Gaussian tokens, decode them and write to OUT: "
            "input.png, reconstruction.png, gaussians_init.png (partition, blue), gaussians.png (refined, red), "
            "error.png (per-pixel |error|), compare.png (all side by side) and tokens.safetensors "
            "(g, f, g_init in tile coordinates, g_image over the whole image). Prints PSNR/SSIM and latency. "
            "Images larger than 256x256 are encoded per 256 tile (tokens scale with area)."
        ),
    )
    _reconstruct_arguments(rec, default_out="gpstoken_reconstruct")
    rec.set_defaults(run=_cmd_reconstruct)

    ev = sub.add_parser(
        "eval",
        help="reconstruction metrics (PSNR, SSIM, and LPIPS / rFID from local weights) over an image set",
        description=(
            "Resize + centre-crop every image to --size, reconstruct it and print the paper's Table 1 columns "
            "that can be computed: PSNR and SSIM always, LPIPS with --lpips-weights, rFID with "
            "--inception-weights (local files, nothing is downloaded). --data: a folder (recursive), a text "
            "file listing image paths, or skimage: / sklearn: for the bundled photos."
        ),
    )
    ev.add_argument("--model", type=Path, help="model folder; default: the shipped demo model")
    ev.add_argument("--data", default="sklearn:", help="images: folder, list file, skimage: or sklearn: (default sklearn:)")
    ev.add_argument("--size", type=positive_int, default=256, help="evaluation size (default 256)")
    ev.add_argument("--tokens", type=positive_int, default=None, help="tokens per image (default: the model's)")
    ev.add_argument("--lpips-weights", help="local LPIPS weights (VGG16 + heads; comma-separate two files)")
    ev.add_argument("--inception-weights", help="local FID Inception-v3 weights (pytorch-fid / torch-fidelity file)")
    ev.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ev.set_defaults(run=_cmd_eval)

    conv = sub.add_parser(
        "convert-official",
        help="convert an official GPSToken .safetensors checkpoint to a gpstoken model folder",
        description=(
            "Map the released official weights (gpstoken_s64/m128/l256.safetensors, a local file: nothing is "
            "downloaded) to this implementation's layout with strict name and shape checks, and save "
            "OUT/config.json + OUT/model.safetensors. Mismatches are listed by name."
        ),
    )
    conv.add_argument("checkpoint", type=Path, help="official .safetensors file")
    conv.add_argument("--config", required=True, choices=["s64", "m128", "l256", "tiny"], help="which official model it is (tiny: an official-layout file of our small config)")
    conv.add_argument("--out", required=True, type=Path, help="output model folder")
    conv.set_defaults(run=_cmd_convert_official)
    from .generation.cli import register as register_generation  # no torch until a command runs

    register_generation(sub)
    _register_plugin_commands(sub)
    return parser


COMMANDS_ENTRY_POINTS = "gpstoken.commands"


def _register_plugin_commands(sub) -> None:
    """Subcommands other packages add (``gpstoken export`` comes from gpstoken_export): each entry point of
    the group names a ``register(subparsers)`` function. The library itself never imports them."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=COMMANDS_ENTRY_POINTS), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError as err:  # e.g. the exporter without onnx installed: say so when it is asked for
            stub = sub.add_parser(entry.name, help=f"(unavailable: {err})")
            stub.set_defaults(run=_unavailable(entry.name, err))
            continue
        register(sub)


def _unavailable(name: str, err: Exception):
    def run(args: argparse.Namespace) -> None:
        raise ValueError(f"`gpstoken {name}` needs packages that are not installed ({err}); pip install 'gpstoken[export]'")

    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ImageError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"gpstoken {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
