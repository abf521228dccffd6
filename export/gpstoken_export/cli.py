"""``gpstoken export``: registered into the ``gpstoken`` command through the ``gpstoken.commands`` entry
point, so the library never imports the exporter."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpstoken.cli import load_model, positive_int
from gpstoken_core.tiling import DECODE_MODES, parse_image_size


def image_size(text: str) -> tuple[int, int]:
    try:
        return parse_image_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import export_model

    model, model_path = load_model(args.model, "cpu")
    sizes = args.sizes or [(model.config.tile, model.config.tile)]
    modes = DECODE_MODES if args.decode == "both" else (args.decode,)
    if args.winograd and (args.int8 or args.tensorrt or args.dtype != "float32"):
        raise ValueError("--winograd is for float32 graphs on ONNX Runtime: not with --int8, --tensorrt or --dtype float16")
    out = export_model(model, args.out, sizes, dtype=args.dtype, decode_modes=modes, winograd=args.winograd)
    from gpstoken_core.manifest import read_manifest

    graphs = sorted(read_manifest(out)["files"])
    listed = ", ".join(f"{w}x{h}" for h, w in sizes)
    print(f"exported {model_path} ({model.config.name}, {args.dtype}) for {listed} images -> {out}/ ({', '.join(graphs)}, manifest.json)")
    if args.check:
        from .parity import check_export

        if not check_export(out, model):
            raise ValueError(f"parity check failed: {out} does not reproduce the torch model within tolerance")
        print("parity PASSED (torch vs ONNX Runtime: encoder, decoders, end to end)")
    if args.int8:
        from .quantize import QUALITY_BOUND_DB, SSIM_BOUND, quantize_export

        if args.dtype != "float32":
            raise ValueError("--int8 is made from a float32 export; drop --dtype float16")
        q = read_manifest(quantize_export(out))["quantization"]
        changes = ", ".join(f"{s['change_db']:+.2f} dB / SSIM {s['ssim_change']:+.3f}" for s in q["held_out_quality"])
        print(f"int8 variant -> {out}/int8/ (decoder convolutions int8; change on the held-out photos {changes}, "
              f"bound {QUALITY_BOUND_DB} dB / SSIM {SSIM_BOUND}); load it with Tokenizer.load(folder, precision='int8')")
    if args.tensorrt:
        _build_tensorrt(out, args)


def _build_tensorrt(out: Path, args: argparse.Namespace) -> None:
    from gpstoken_core.tensorrt import TensorRTUnavailable

    from .build_engine import build_engines

    try:
        build_engines(out, args.plugin, max_batch=args.max_batch, max_tokens=getattr(args, "max_tokens", None))
    except TensorRTUnavailable as err:
        raise ValueError(f"the ONNX export in {out}/ is complete, but no TensorRT engines were built: {err}") from None
    print(f"TensorRT engines: {out}/*.engine, one per graph (manifest.json has the tensorrt section)")


def register(sub) -> None:
    exp = sub.add_parser(
        "export",
        help="export a model to ONNX (encoder, decoders with the GaussianSplat node, manifest.json)",
        description=(
            "Write OUT/encoder.onnx (one tile of any size up to 256: image, g_init, boxes -> g, f), decoder graphs "
            "(g, f -> image; the splat is one gpstoken::GaussianSplat node with a model-local function, so plain "
            "ONNX Runtime runs it): decoder.onnx for one 256 tile plus those the --sizes need in each decode mode "
            "(merged: one graph per multi-tile size; tiles: one per tile size), and OUT/manifest.json (config, "
            "shapes, versions, file hashes). Batch and token count are dynamic. The folder is written under a "
            "temporary name and renamed when complete."
        ),
    )
    exp.add_argument("--model", type=Path, help="model folder; default: the shipped demo model")
    exp.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    exp.add_argument("--sizes", type=image_size, nargs="+", metavar="N|WxH",
                     help="image sizes the runtime should decode, e.g. 256 512 600x400 (default: 256, one tile)")
    exp.add_argument("--decode", choices=[*DECODE_MODES, "both"], default="both",
                     help="decoder graphs for which decode modes (default both: the runtime can then choose)")
    exp.add_argument("--check", action="store_true", help="then compare torch and ONNX Runtime with polygraphy on photos (fails above tolerance)")
    exp.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                     help="graph precision (default float32); float16 is what TensorRT 11 needs for an fp16 engine")
    exp.add_argument("--winograd", action="store_true",
                     help="for ONNX Runtime on CPUs: the 3x3 convolutions with >= 128 channels (decoders and the encoder's "
                          "stem) as Winograd F(4x4,3x3) in the files (fewer multiplies; ~1e-5 relative error per "
                          "convolution); float32 only, not for TensorRT engines or int8 variants. The slim runtime "
                          "applies the same rewrite itself when it loads a plain export on a CPU")
    exp.add_argument("--int8", action="store_true",
                     help="also write OUT/int8/: the decoder's convolutions in int8 for ONNX Runtime on the CPU (static "
                          "quantization calibrated on the bundled photos; quality measured on held-out photos and recorded)")
    exp.add_argument("--tensorrt", action="store_true",
                     help="then build TensorRT engines next to the ONNX files (needs a GPU, tensorrt, cuda-bindings and the plugin)")
    exp.add_argument("--plugin", type=Path, help="libgpstoken_trt.so for --tensorrt (default: $GPSTOKEN_TRT_PLUGIN or the installed one)")
    exp.add_argument("--max-batch", type=positive_int, default=8, help="largest batch of the engines' optimization profile (default 8)")
    exp.add_argument("--max-tokens", type=positive_int, help="largest token count per tile in the profile (default 2x the model's)")
    exp.set_defaults(run=_cmd_export)


# ----------------------------------------------------------------------------- export-generator
def _cmd_export_generator(args: argparse.Namespace) -> None:
    from gpstoken.generation import GPSGenerator

    from .generator_export import export_generator

    from gpstoken.generation import shipped_generator_folder

    folder = args.model or shipped_generator_folder()
    if folder is None:
        raise ValueError("the shipped demo generator is not installed; pass --model DIR (a GPSGenerator folder)")
    if not (folder / "texture").is_dir():
        raise ValueError(f"{folder}: not a generator folder (no texture/ folder); --model takes a GPSGenerator folder (tokenizer/, texture/, optional layout/)")
    generator = GPSGenerator.from_pretrained(folder)
    out = export_generator(generator, args.out, dtype=args.dtype)
    from gpstoken_core.manifest import read_generator_manifest

    manifest, _ = read_generator_manifest(out)
    graphs = ", ".join(f"{n}.onnx" for n in sorted(manifest["files"]))
    print(f"exported {folder} ({manifest['generator']['kind']}, {args.dtype}) -> {out}/ ({graphs}, tokenizer/, manifest.json)")
    if args.check:
        from .generator_parity import check_generator_export

        if not check_generator_export(out, generator):
            raise ValueError(f"parity check failed: {out} does not reproduce the torch generator within tolerance")
        print("parity PASSED (torch vs ONNX Runtime: velocity graphs at batch 1 and 3, sampled tokens)")
    if args.tensorrt:
        _build_tensorrt(out, args)  # velocity engines and the tokenizer export's engines


def register_generator(sub) -> None:
    exp = sub.add_parser(
        "export-generator",
        help="export a generator (velocity graphs, its tokenizer export, manifest.json) for the slim runtime",
        description=(
            "Write OUT/texture.onnx (and OUT/layout.onnx for a two-stage generator with a layout model): one velocity "
            "evaluation each, inputs x (B, L, C), t (B,), y (B,) int64 [, cond (B, L, 5)], dynamic batch; the runtime "
            "doubles the batch for classifier-free guidance. OUT/tokenizer/ is the tokenizer's export, OUT/manifest.json "
            "the generator section (statistics, classes, null class, token count, channels, sampler defaults, hashes). "
            "Run it with `gpstoken-runtime generate --model OUT`."
        ),
    )
    exp.add_argument("--model", type=Path, help="GPSGenerator folder (tokenizer/, texture/, optional layout/); default: the shipped demo generator")
    exp.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    exp.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="graph precision (default float32)")
    exp.add_argument("--check", action="store_true", help="then compare torch and ONNX Runtime with polygraphy (fails above tolerance)")
    exp.add_argument("--tensorrt", action="store_true",
                     help="then build TensorRT engines for the velocity graphs and the tokenizer export (needs a GPU, "
                          "tensorrt, cuda-bindings and the plugin); run them with `gpstoken-runtime generate --backend tensorrt`")
    exp.add_argument("--plugin", type=Path, help="libgpstoken_trt.so for --tensorrt (default: $GPSTOKEN_TRT_PLUGIN or the installed one)")
    exp.add_argument("--max-batch", type=positive_int, default=8,
                     help="most images per sampling call the engines accept (default 8; velocity engines take 2x rows for CFG)")
    exp.set_defaults(run=_cmd_export_generator)
