"""int8 variant of a tokenizer export for the CPU: ONNX Runtime static quantization (QDQ) of the decoder's
convolutions, calibrated on photos.

    python -m gpstoken_export.quantize EXPORT            # writes EXPORT/int8/ (or: gpstoken export --int8)
    Tokenizer.load(EXPORT, precision="int8")             # the runtime picks the variant

What is int8 and what is not: the decoder's convolutions below the output resolution get int8 weights
(per output channel, symmetric) and uint8 activations (per tensor, min/max calibrated on the decoder
inputs of the calibration photos); the splat, the normalizations, activations, residual adds and
upsampling stay float32 (ONNX Runtime runs each quantized Conv as one QLinearConv between a
QuantizeLinear and a DequantizeLinear). The convolutions at the output resolution (the last stage and
conv_out) stay float32 by default: int8 there adds visible noise (SSIM -0.05 to -0.07 on the held-out
photos with the shipped model, vs < 0.01 without) for ~3% of the time on M128 (``all_convs=True``
quantizes them too). The encoder stays float32: its outputs are the Gaussians' positions and shapes, and
int8 convolutions there cost 3 dB on a held-out photo.

The quality cost is measured when the variant is written (PSNR against the photo, fp32 vs int8, on
held-out photos) and recorded in its manifest; ``QUALITY_BOUND_DB`` is the bound this project states for
it, checked by the tests on the shipped model.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from gpstoken_core.files import atomic_folder, sha256_file
from gpstoken_core.imageio import bundled_photo, center_crop_resize
from gpstoken_core.manifest import ENCODER, has_winograd, read_manifest, write_manifest
from gpstoken_core.metrics import psnr, ssim

INT8_FOLDER = "int8"
QUANTIZED_OPS = ("Conv",)
# Largest PSNR drop (dB) and SSIM drop (both against the input photo) the int8 variant may cost vs float32
# on held-out photos (default quantization, stated in the README, tested on the shipped model).
QUALITY_BOUND_DB = 0.3
SSIM_BOUND = 0.02
CALIBRATION_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "brick", "cat")


def calibration_images(size: int) -> list[np.ndarray]:
    """scikit-image's bundled photos (the held-out set for quality is scikit-learn's)."""
    return [center_crop_resize(bundled_photo(name), size) for name in CALIBRATION_PHOTOS]


def held_out_images(size: int) -> list[np.ndarray]:
    """scikit-learn's two sample photos (china, flower), never used for training or calibration."""
    from sklearn.datasets import load_sample_images

    return [center_crop_resize(image, size) for image in load_sample_images().images]


def _record_feeds(tokenizer, images: list[np.ndarray]) -> dict[str, list[dict[str, np.ndarray]]]:
    """The inputs each graph of ``tokenizer`` receives while it reconstructs ``images`` one at a time."""
    seen: dict[str, list[dict[str, np.ndarray]]] = {}
    originals = {}
    for name, backend in tokenizer.graphs.items():
        originals[name] = backend.run

        def record(feeds, name=name, run=backend.run):
            seen.setdefault(name, []).append({k: np.array(v) for k, v in feeds.items()})
            return run(feeds)

        backend.run = record
    try:
        for image in images:
            tokenizer.reconstruct(image[None])
    finally:
        for name, backend in tokenizer.graphs.items():
            backend.run = originals[name]
    return seen


def output_resolution_convs(path: Path, manifest: dict) -> list[str]:
    """Names of the decoder graph's Conv nodes at the output resolution: the last up-sampling stage and
    conv_out (our decoder's module names, which the ONNX node names carry)."""
    import onnx

    last = len(manifest["model_config"]["decoder"]["channel_mult"]) - 1
    prefixes = (f"/decoder/stages.{last}/", "/decoder/conv_out/")
    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "Conv" and n.name.startswith(prefixes)]


def _quantize_graph(source: Path, target: Path, feeds: list[dict[str, np.ndarray]], keep_float: list[str]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    quantize_static(
        str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float,
    )
    import onnx

    model = onnx.load(str(target))
    if shapes_before_dequantize(model):
        onnx.save(model, str(target))


def shapes_before_dequantize(model) -> int:
    """Point every Shape node that reads a DequantizeLinear's output at that node's input (the same shape),
    in place; returns how many. ONNX Runtime gives each consumer of a DequantizeLinear a copy of it, so the
    GroupNorms' Shape nodes (3-4 per norm, from the export's dynamic reshapes) each cost a full float pass:
    12 of the tiny decoder's 27 ms of DequantizeLinear at batch 1, outputs bit for bit the same."""
    produced_by_dequantize = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    rewired = 0
    for node in model.graph.node:
        if node.op_type == "Shape" and node.input[0] in produced_by_dequantize:
            node.input[0] = produced_by_dequantize[node.input[0]]
            rewired += 1
    return rewired


def quality(fp32, int8, images: list[np.ndarray]) -> list[dict[str, float]]:
    """Per image: PSNR (dB) and SSIM against the image of the float32 and int8 reconstructions, and the changes."""
    out = []
    for image in images:
        a, b = fp32.reconstruct(image[None])[0], int8.reconstruct(image[None])[0]
        pa, pb, sa, sb = psnr(image, a), psnr(image, b), ssim(image, a), ssim(image, b)
        out.append({"psnr_fp32": round(pa, 3), "psnr_int8": round(pb, 3), "change_db": round(pb - pa, 3),
                    "ssim_fp32": round(sa, 4), "ssim_int8": round(sb, 4), "ssim_change": round(sb - sa, 4)})
    return out


def quantize_export(folder: str | Path, out: str | Path | None = None, images: list[np.ndarray] | None = None,
                    replace: bool = False, all_convs: bool = False) -> Path:
    """Write the int8 variant of the tokenizer export ``folder`` to ``out`` (default ``folder/int8``): the
    decoder graphs quantized (see the module text; ``all_convs``: the output-resolution convolutions too),
    the encoder and everything else as in ``folder``.
    Calibrated on ``images`` (default: the bundled scikit-image photos) at the export's first size. Its
    manifest says ``"precision": "int8"`` and records how it was made and its measured quality cost."""
    from gpstoken_runtime import Tokenizer

    folder = Path(folder)
    out = Path(out) if out is not None else folder / INT8_FOLDER
    manifest = read_manifest(folder)
    if manifest.get("precision") == "int8":
        raise ValueError(f"{folder}: already an int8 export")
    if manifest["dtype"] != "float32":
        raise ValueError(f"{folder}: int8 variants are made from float32 exports (this one is {manifest['dtype']})")
    if has_winograd(manifest):
        raise ValueError(f"{folder}: int8 variants are made from exports without --winograd (its transforms would be quantized)")
    fp32 = Tokenizer.load(folder, winograd=False)  # calibrate on the graphs as they are quantized
    h, w = fp32.image_size
    feeds = _record_feeds(fp32, images if images is not None else calibration_images((h, w)))
    quantized = sorted(name for name in manifest["files"] if name != ENCODER)
    kept: dict[str, list[str]] = {}
    with atomic_folder(out, replace=replace) as tmp:
        files = {}
        for name, entry in manifest["files"].items():
            source, target = folder / entry["path"], tmp / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if name in quantized and name in feeds:
                kept[name] = [] if all_convs else output_resolution_convs(source, manifest)
                _quantize_graph(source, target, feeds[name], kept[name])
            else:
                shutil.copyfile(source, target)
            files[name] = {**entry, "sha256": sha256_file(target)}
        variant = {**manifest, "files": files, "precision": "int8"}
        variant["quantization"] = {
            "method": "onnxruntime static quantization, QDQ",
            "graphs": [n for n in quantized if n in feeds],
            "ops": list(QUANTIZED_OPS),
            "kept_float": kept,
            "weights": "int8, per output channel, symmetric",
            "activations": "uint8, per tensor, min/max over the calibration images",
            "calibration_images": len(next(iter(feeds.values()))),
            "float": "encoder, splat, normalizations, activations, adds, upsampling, the convolutions in kept_float",
        }
        write_manifest(tmp, variant)
        int8 = Tokenizer.load(tmp)
        scores = quality(fp32, int8, held_out_images((h, w)))
        variant["quantization"]["held_out_quality"] = scores
        variant["quantization"]["quality_bound"] = {"psnr_db": QUALITY_BOUND_DB, "ssim": SSIM_BOUND}
        write_manifest(tmp, variant)
    worst_db, worst_ssim = min(s["change_db"] for s in scores), min(s["ssim_change"] for s in scores)
    if worst_db < -QUALITY_BOUND_DB or worst_ssim < -SSIM_BOUND:
        print(f"warning: {out}: int8 costs up to {-worst_db:.2f} dB PSNR / {-worst_ssim:.3f} SSIM on the held-out photos, "
              f"more than the bound this project states ({QUALITY_BOUND_DB} dB / {SSIM_BOUND}); prefer the float32 export")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gpstoken_export.quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export", type=Path, help="a float32 `gpstoken export` folder")
    parser.add_argument("--out", type=Path, help=f"output folder (default EXPORT/{INT8_FOLDER})")
    parser.add_argument("--replace", action="store_true", help="replace an existing output folder")
    parser.add_argument("--all-convs", action="store_true",
                        help="also quantize the convolutions at the output resolution (a little faster, visibly noisier)")
    args = parser.parse_args(argv)
    out = quantize_export(args.export, args.out, replace=args.replace, all_convs=args.all_convs)
    q = read_manifest(out)["quantization"]
    changes = ", ".join(f"{s['change_db']:+.2f} dB / SSIM {s['ssim_change']:+.4f}" for s in q["held_out_quality"])
    print(f"int8 variant -> {out}/ (quantized: {', '.join(q['graphs'])}; change on held-out photos: {changes})")


if __name__ == "__main__":
    main()
