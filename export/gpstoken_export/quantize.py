"""int8 variant of a tokenizer export for the CPU: ONNX Runtime static quantization (QDQ) of the decoder's
convolutions, calibrated on photos.

    python -m gpstoken_export.quantize EXPORT            # writes EXPORT/int8/ (or: gpstoken export --int8)
    Tokenizer.load(EXPORT, precision="int8")             # the runtime picks the variant

What is int8 and what is not: every Conv of the decoder graphs gets int8 weights (per output channel,
symmetric) and uint8 activations (per tensor, min/max calibrated on the decoder inputs of the calibration
photos); the splat, the normalizations, activations, residual adds and upsampling stay float32 (ONNX
Runtime runs each quantized Conv as one QLinearConv between a QuantizeLinear and a DequantizeLinear).
The encoder stays float32: its outputs are the Gaussians' positions and shapes, and int8 there cost
3 dB on a held-out photo while saving little time (its convolutions are a small part of the FLOPs).

The quality cost is measured when the variant is written (PSNR against the photo, fp32 vs int8, on
held-out photos) and recorded in its manifest; ``QUALITY_BOUND_DB`` is the bound this project states for
it, checked by the tests on the shipped model.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np

from gpstoken_core.files import atomic_folder, sha256_file
from gpstoken_core.imageio import bundled_photo, center_crop_resize
from gpstoken_core.manifest import ENCODER, read_manifest, write_manifest

INT8_FOLDER = "int8"
QUANTIZED_OPS = ("Conv",)
# Largest PSNR drop (dB, against the input photo) the int8 variant may cost vs float32 on held-out photos.
QUALITY_BOUND_DB = 0.3
CALIBRATION_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "brick", "cat")


def calibration_images(size: int) -> list[np.ndarray]:
    """scikit-image's bundled photos (the held-out set for quality is scikit-learn's)."""
    return [center_crop_resize(bundled_photo(name), size) for name in CALIBRATION_PHOTOS]


def held_out_images(size: int) -> list[np.ndarray]:
    """scikit-learn's two sample photos (china, flower), never used for training or calibration."""
    from sklearn.datasets import load_sample_images

    return [center_crop_resize(image, size) for image in load_sample_images().images]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


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


def _quantize_graph(source: Path, target: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    quantize_static(
        str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def quality(fp32, int8, images: list[np.ndarray]) -> list[dict[str, float]]:
    """Per image: PSNR (dB, against the image) of the float32 and int8 reconstructions, and their difference."""
    out = []
    for image in images:
        a = psnr(image, fp32.reconstruct(image[None])[0])
        b = psnr(image, int8.reconstruct(image[None])[0])
        out.append({"psnr_fp32": round(a, 3), "psnr_int8": round(b, 3), "change_db": round(b - a, 3)})
    return out


def quantize_export(folder: str | Path, out: str | Path | None = None, images: list[np.ndarray] | None = None,
                    replace: bool = False) -> Path:
    """Write the int8 variant of the tokenizer export ``folder`` to ``out`` (default ``folder/int8``): the
    decoder graphs quantized (see the module text), the encoder and everything else as in ``folder``.
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
    fp32 = Tokenizer.load(folder)
    h, w = fp32.image_size
    feeds = _record_feeds(fp32, images if images is not None else calibration_images((h, w)))
    quantized = sorted(name for name in manifest["files"] if name != ENCODER)
    with atomic_folder(out, replace=replace) as tmp:
        files = {}
        for name, entry in manifest["files"].items():
            source, target = folder / entry["path"], tmp / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if name in quantized and name in feeds:
                _quantize_graph(source, target, feeds[name])
            else:
                shutil.copyfile(source, target)
            files[name] = {**entry, "sha256": sha256_file(target)}
        variant = {**manifest, "files": files, "precision": "int8"}
        variant["quantization"] = {
            "method": "onnxruntime static quantization, QDQ",
            "graphs": [n for n in quantized if n in feeds],
            "ops": list(QUANTIZED_OPS),
            "weights": "int8, per output channel, symmetric",
            "activations": "uint8, per tensor, min/max over the calibration images",
            "calibration_images": len(next(iter(feeds.values()))),
            "float": "encoder, splat, normalizations, activations, adds, upsampling",
        }
        write_manifest(tmp, variant)
        int8 = Tokenizer.load(tmp)
        scores = quality(fp32, int8, held_out_images((h, w)))
        variant["quantization"]["held_out_quality"] = scores
        variant["quantization"]["quality_bound_db"] = QUALITY_BOUND_DB
        write_manifest(tmp, variant)
    worst = min(s["change_db"] for s in scores)
    if worst < -QUALITY_BOUND_DB:
        print(f"warning: {out}: int8 costs {-worst:.2f} dB PSNR on a held-out photo, more than the {QUALITY_BOUND_DB} dB "
              "bound this project states; prefer the float32 export for this model")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gpstoken_export.quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export", type=Path, help="a float32 `gpstoken export` folder")
    parser.add_argument("--out", type=Path, help=f"output folder (default EXPORT/{INT8_FOLDER})")
    parser.add_argument("--replace", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    out = quantize_export(args.export, args.out, replace=args.replace)
    q = read_manifest(out)["quantization"]
    changes = ", ".join(f"{s['change_db']:+.2f} dB" for s in q["held_out_quality"])
    print(f"int8 variant -> {out}/ (quantized: {', '.join(q['graphs'])}; PSNR change on held-out photos: {changes})")


if __name__ == "__main__":
    main()
