"""The ``gpstoken`` command line.

A user error (missing file, corrupt image, bad value) prints one line naming the problem and exits
with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .imageio import ImageError, bundled_photo, center_crop_resize, load_image


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_demo(args: argparse.Namespace) -> None:
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
    picture.save(out / "demo.png")
    np.savez(out / "gaussians.npz", initial=result.gaussians_init, optimized=result.gaussians)
    print(f"PSNR  grid placement (least-squares colours): {result.psnr_init:.2f} dB")
    print(f"PSNR  after optimizing through the splat op:  {result.psnr:.2f} dB")
    print(f"time  {result.seconds:.1f} s")
    print(f"wrote {out / 'demo.png'} and {out / 'gaussians.npz'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpstoken",
        description="GPSToken: images as 2D Gaussian tokens. Run `gpstoken COMMAND --help` for details.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="fit Gaussian tokens to a photo through the differentiable splat op and draw them",
        description=(
            "Place Gaussian tokens on a regular grid (official sigma = cell width / 3), solve their colours by "
            "least squares, then optimize every parameter (sigma, rho, mean, colour) through gpstoken.splat. "
            "Writes OUT/demo.png (input | grid render | grid Gaussians | optimized render | optimized Gaussians) "
            "and OUT/gaussians.npz. Uses a photo bundled with scikit-image unless --image is given."
        ),
    )
    demo.add_argument("--image", type=Path, help="an image file to use instead of the bundled photo")
    demo.add_argument("--photo", default="astronaut", help="name of a skimage.data photo (default: astronaut)")
    demo.add_argument("--size", type=_positive_int, default=128, help="square working size in pixels (default 128)")
    demo.add_argument("--tokens", type=_positive_int, default=256, help="number of tokens, rounded to a square (default 256)")
    demo.add_argument("--steps", type=_positive_int, default=500, help="optimization steps (default 500)")
    demo.add_argument("--support", type=float, default=3.0, help="support factor s of the splat (official: 3)")
    demo.add_argument("--out", default="gpstoken_demo", help="output folder (default ./gpstoken_demo)")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ImageError, FileNotFoundError, ValueError) as err:
        print(f"gpstoken {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
