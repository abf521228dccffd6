"""``gpstoken-runtime``: run an exported tokenizer or generator without torch."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gpstoken_core.tiling import DECODE_MODES, parse_image_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpstoken-runtime", description="Run a `gpstoken export` folder with ONNX Runtime or TensorRT (no torch).")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconstruct", help="encode + decode an image; writes the reconstruction, prints PSNR/SSIM and latency")
    rec.add_argument("image", type=Path, help="image file")
    rec.add_argument("--model", required=True, type=Path, help="export folder (manifest.json, encoder.onnx, decoder graphs)")
    rec.add_argument("--size", default=None, metavar="N|WxH|0",
                     help="resize + centre-crop to N x N or W x H first, 0: keep the image's size (default: the export's first size)")
    rec.add_argument("--decode", choices=DECODE_MODES, default=None,
                     help="images of several tiles: merged (one map) or tiles (each alone); default: the model's")
    rec.add_argument("--tokens", type=int, default=None, help="token count (default: the export's tokens per tile)")
    rec.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                     help="onnxruntime (default) or tensorrt (engines from `gpstoken export --tensorrt`, needs a GPU)")
    rec.add_argument("--plugin", type=Path, help="libgpstoken_trt.so for --backend tensorrt (default: $GPSTOKEN_TRT_PLUGIN)")
    rec.add_argument("--device", default="cpu", help="cpu or cuda (needs onnxruntime-gpu); tensorrt always runs on cuda")
    rec.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    rec.add_argument("--precision", choices=["float", "int8"], default=None,
                     help="int8: the export's int8 variant (MODEL/int8, from `gpstoken export --int8`); default: the export as it is")
    rec.add_argument("--winograd", choices=["auto", "on", "off"], default="auto",
                     help="3x3 convolutions with >= 128 channels as Winograd F(4x4,3x3) on ONNX Runtime's CPU provider: "
                          "auto (default) in float32 exports, on (an error where it does not apply), off: as exported")
    rec.add_argument("--out", type=Path, default=Path("reconstruction.png"), help="output picture (default reconstruction.png)")
    gen = sub.add_parser("generate", help="sample images of a class from a `gpstoken export-generator` folder; writes PNGs")
    gen.add_argument("--model", required=True, type=Path, help="generator export folder (manifest.json with a generator section)")
    gen.add_argument("--class", dest="label", required=True, type=int, help="class id")
    gen.add_argument("--num", type=int, default=4, help="images to make (default 4)")
    gen.add_argument("--seed", type=int, default=0, help="seed (the torch pipeline makes the same images for it)")
    gen.add_argument("--steps", type=int, default=None, help="texture sampling steps (default: the export's, official 250 SDE)")
    gen.add_argument("--sampler", choices=["sde", "euler", "heun"], default=None, help="texture sampler (default: the export's)")
    gen.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default: the export's, 1.5)")
    gen.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime", help="onnxruntime (default) or tensorrt")
    gen.add_argument("--plugin", type=Path, help="libgpstoken_trt.so for --backend tensorrt (default: $GPSTOKEN_TRT_PLUGIN)")
    gen.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    gen.add_argument("--winograd", choices=["auto", "on", "off"], default="auto",
                     help="the tokenizer's 3x3 convolutions with >= 128 channels as Winograd F(4x4,3x3) on ONNX Runtime's "
                          "CPU provider: auto (default) in float32 exports, on (an error where it does not apply), off")
    gen.add_argument("--out", type=Path, default=Path("generated"), help="output folder (default generated/)")
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)

    from PIL import Image

    from gpstoken_core.manifest import ExportError

    from gpstoken_core import imageio, metrics
    from .tokenizer import Tokenizer

    try:
        options = {"plugin_library": args.plugin} if args.backend == "tensorrt" else {}
        if args.winograd != "auto":  # Tokenizer.load refuses it on TensorRT
            options["winograd"] = args.winograd == "on"
        tok = Tokenizer.load(args.model, backend=args.backend, device=args.device, threads=args.threads,
                             precision=args.precision, **options)
        image = imageio.load_image(args.image)
        size = tok.image_size if args.size is None else parse_image_size(args.size, allow_keep=True)
        if size is not None:
            image = imageio.center_crop_resize(image, size)
        h, w = image.shape[:2]
        tok.reconstruct(image, args.tokens, mode=args.decode)  # warm-up
        t0 = time.perf_counter()
        tokens = tok.encode(image, args.tokens)
        t1 = time.perf_counter()
        recon = tok.decode(tokens, mode=args.decode)[0]
        t2 = time.perf_counter()
    except (ExportError, imageio.ImageError, ValueError, RuntimeError) as err:
        print(f"gpstoken-runtime reconstruct: error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(recon).save(args.out)
    try:
        quality = f"PSNR {metrics.psnr(image, recon):.2f} dB  SSIM {metrics.ssim(image, recon):.4f}"
    except ImportError:  # the runtime-only wheel without its [metrics] extra
        quality = "PSNR/SSIM need scikit-image (pip install 'gpstoken-runtime[metrics]')"
    print(f"{args.image}: {w}x{h}, {tokens.g.shape[1]} tokens; {quality}")
    print(f"latency  encode {1000 * (t1 - t0):.0f} ms   decode {1000 * (t2 - t1):.0f} ms  [{args.backend}, {args.device if args.backend == 'onnxruntime' else 'cuda'}]; wrote {args.out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from gpstoken_core.manifest import ExportError

    from .generator import Generator

    try:
        if args.num < 1:
            raise ValueError(f"--num must be >= 1, got {args.num}")
        options = {"plugin_library": args.plugin} if args.backend == "tensorrt" else {}
        if args.winograd != "auto":  # Tokenizer.load refuses it on TensorRT
            options["winograd"] = args.winograd == "on"
        generator = Generator.load(args.model, backend=args.backend, threads=args.threads, **options)
        t0 = time.perf_counter()
        images = generator.sample([args.label] * args.num, seed=args.seed, cfg_scale=args.cfg_scale, steps=args.steps, sampler=args.sampler)
        seconds = time.perf_counter() - t0
    except (ExportError, ValueError, RuntimeError) as err:
        print(f"gpstoken-runtime generate: error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(args.out / f"class{args.label}_seed{args.seed}_{k}.png")
    print(f"{args.num} images of class {args.label} (seed {args.seed}) in {seconds:.2f} s [{args.backend}] -> {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
