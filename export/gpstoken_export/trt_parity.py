"""TensorRT parity recipes: reference data saved on the CPU from torch, checked on the CPU by polygraphy's
plugin reference runner and on a GPU by ``polygraphy run --trt``.

    python -m gpstoken_export.trt_parity EXPORT_DIR --out parity/ [--model DIR]

writes into ``parity/``
    splat.onnx                     the decoder's GaussianSplat node alone (inputs g, f; no local function)
    splat_inputs.json / _outputs.json     real tokens of photos and torch's rendered map
    decoder.trt.onnx               decoder.onnx without the local function (the node goes to the plugin)
    decoder_inputs.json / _outputs.json   the same tokens and torch's decoded images
plus ``run_on_gpu.sh`` (the commands below with a TensorRT profile of the files' shapes), and checks
splat.onnx with polygraphy's ``PluginRefRunner``, GaussianSplat being registered with a NumPy
reference of its own (float64, dense, written from the paper's formula). On a GPU machine:

    polygraphy run parity/splat.onnx --trt --plugins build/libgpstoken_trt_selfregister.so \\
        --load-inputs parity/splat_inputs.json --load-outputs parity/splat_outputs.json --atol 1e-4 --rtol 1e-4
    polygraphy run parity/decoder.trt.onnx --trt --plugins build/libgpstoken_trt_selfregister.so \\
        --load-inputs parity/decoder_inputs.json --load-outputs parity/decoder_outputs.json --atol 1e-3 --rtol 1e-3

``--tensorrt`` additionally compares torch, ONNX Runtime and the TensorRT backend end to end (GPU only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from gpstoken_core.official import SUPPORT

from .splat_function import DOMAIN, DOMAIN_VERSION, ONNX_OPSET, OP_TYPE, drop_splat_function, splat_nodes

PHOTOS = ("astronaut", "coffee", "chelsea")


def splat_numpy(g: np.ndarray, f: np.ndarray, height: int, width: int, support: float) -> np.ndarray:
    """GaussianSplat in float64 NumPy, straight from the definition (paper Eq. 2-3, official conventions):
    pixel centres at 2i/(n-1)-1, G = exp(-(a^2 - 2 rho a b + b^2) / (2 (1 - rho^2))) inside
    |dx| <= s sigma_x, |dy| <= s sigma_y, out[b, c] = sum_i G_i f_i[c]."""
    g = np.asarray(g, np.float64)
    f = np.asarray(f, np.float64)
    ys = 2.0 * np.arange(height) / (height - 1) - 1.0
    xs = 2.0 * np.arange(width) / (width - 1) - 1.0
    sx, sy, rho, mx, my = (g[..., k][..., None, None] for k in range(5))  # (B, L, 1, 1)
    dx = xs[None, None, None, :] - mx
    dy = ys[None, None, :, None] - my
    a, b = dx / sx, dy / sy
    weight = np.exp(-(a * a - 2 * rho * a * b + b * b) / (2 * (1 - rho * rho)))
    weight = np.where((np.abs(dx) <= support * sx) & (np.abs(dy) <= support * sy), weight, 0.0)
    return np.einsum("blhw,blc->bchw", weight, f)


def register_pluginref() -> None:
    """Make polygraphy's PluginRefRunner (and ``polygraphy run --pluginref``) execute GaussianSplat."""
    from polygraphy.backend.pluginref import references

    if OP_TYPE in references.OP_REGISTRY:
        return

    @references.register(OP_TYPE)
    def _gaussian_splat(attrs, g, f):
        out = splat_numpy(g, f, int(attrs["height"]), int(attrs["width"]), float(attrs.get("support", SUPPORT)))
        return [out.astype(np.asarray(f).dtype)]


def splat_model(decoder_path: Path, out: Path) -> dict:
    """A one-node model with the decoder's (first) GaussianSplat node and its attributes; returns them."""
    decoder = onnx.load(str(decoder_path))
    nodes = splat_nodes(decoder)
    if not nodes:
        raise ValueError(f"{decoder_path}: no {DOMAIN}::{OP_TYPE} node")
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    node = helper.make_node(OP_TYPE, ["g", "f"], ["map"], domain=DOMAIN, name="splat", **attrs)
    graph = helper.make_graph(
        [node], "gaussian_splat",
        [helper.make_tensor_value_info("g", TensorProto.FLOAT, ["batch", "tokens", 5]),
         helper.make_tensor_value_info("f", TensorProto.FLOAT, ["batch", "tokens", "channels"])],
        [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["batch", "channels", attrs["height"], attrs["width"]])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    onnx.save(model, str(out))
    return attrs


def write_parity_data(export_dir: Path, model, out: Path, photos: np.ndarray) -> dict:
    """Write the files listed in the module docstring; returns the splat attributes."""
    import torch
    from polygraphy.json import save_json

    import gpstoken

    out.mkdir(parents=True, exist_ok=True)
    attrs = splat_model(export_dir / "decoder.onnx", out / "splat.onnx")
    decoder = onnx.load(str(export_dir / "decoder.onnx"))
    onnx.save(drop_splat_function(decoder), str(out / "decoder.trt.onnx"))
    with torch.inference_mode():
        tokens = model.encode(photos)
        g, f = tokens.g.float(), tokens.f.float()
        rendered = gpstoken.splat(g, f, (int(attrs["height"]), int(attrs["width"])), float(attrs["support"]))
        images = model.decode(tokens)
    feed = {"g": g.numpy(), "f": f.numpy()}
    save_json([feed], str(out / "splat_inputs.json"))
    save_json([feed], str(out / "decoder_inputs.json"))
    _save_outputs(out / "splat_outputs.json", "torch", {"map": rendered.numpy()})
    _save_outputs(out / "decoder_outputs.json", "torch", {"image": images.numpy()})
    write_gpu_recipe(out, feed)
    return attrs


def write_gpu_recipe(out: Path, feed: dict[str, np.ndarray]) -> Path:
    """``run_on_gpu.sh``: the polygraphy commands for these files, with a TensorRT profile of exactly their shapes."""
    shapes = " ".join(f"{k}:[{','.join(str(d) for d in v.shape)}]" for k, v in feed.items())
    profile = f"--trt-min-shapes {shapes} --trt-opt-shapes {shapes} --trt-max-shapes {shapes}"
    lines = [
        "#!/usr/bin/env bash",
        "# TensorRT parity of the GaussianSplat plugin against torch outputs saved on the CPU.",
        "# usage: bash run_on_gpu.sh path/to/libgpstoken_trt_selfregister.so",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'PLUGIN=${1:?path to libgpstoken_trt_selfregister.so}',
        f"polygraphy run splat.onnx --trt --plugins \"$PLUGIN\" {profile} \\",
        "    --load-inputs splat_inputs.json --load-outputs splat_outputs.json --atol 1e-4 --rtol 1e-4",
        f"polygraphy run decoder.trt.onnx --trt --plugins \"$PLUGIN\" {profile} \\",
        "    --load-inputs decoder_inputs.json --load-outputs decoder_outputs.json --atol 1e-3 --rtol 1e-3",
    ]
    path = out / "run_on_gpu.sh"
    path.write_text("\n".join(lines) + "\n")
    return path


def _save_outputs(path: Path, runner: str, outputs: dict) -> None:
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    results = RunResults()
    results.append((runner, [IterationResult(outputs=outputs, runner_name=runner)]))
    results.save(str(path))


def check_with_pluginref(folder: Path, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    """polygraphy's PluginRefRunner on splat.onnx with the saved inputs vs torch's saved outputs."""
    from polygraphy.backend.onnx import GsFromOnnx, OnnxFromPath
    from polygraphy.backend.pluginref import PluginRefRunner
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.json import load_json

    register_pluginref()
    inputs = load_json(str(folder / "splat_inputs.json"))
    runner = PluginRefRunner(GsFromOnnx(OnnxFromPath(str(folder / "splat.onnx"))), name="pluginref")
    ours = Comparator.run([runner], data_loader=inputs)
    reference = RunResults.load(str(folder / "splat_outputs.json"))
    scale = max(float(np.abs(r["map"]).max()) for _, its in reference.items() for r in its)
    compare = SimpleCompareFunc(atol=atol * max(scale, 1.0), rtol=rtol, check_error_stat="max")
    combined = RunResults()
    for name, iterations in list(reference.items()) + list(ours.items()):
        combined.append((name, iterations))
    return bool(Comparator.compare_accuracy(combined, compare_func=compare))


def compare_backends(export_dir: Path, model, photos: np.ndarray, plugin_library=None) -> dict:
    """torch vs ONNX Runtime vs TensorRT, end to end on photos: max |difference| in grey levels."""
    import torch
    from gpstoken_runtime import Tokenizer

    import gpstoken

    with torch.inference_mode():
        reference = gpstoken.to_uint8(model.reconstruct(photos)).astype(int)
    ort = Tokenizer.load(export_dir, backend="onnxruntime").reconstruct(photos).astype(int)
    trt = Tokenizer.load(export_dir, backend="tensorrt", plugin_library=plugin_library).reconstruct(photos).astype(int)
    return {
        "onnxruntime vs torch": int(np.abs(ort - reference).max()),
        "tensorrt vs torch": int(np.abs(trt - reference).max()),
        "tensorrt vs onnxruntime": int(np.abs(trt - ort).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path, help="a `gpstoken export` folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the parity files")
    parser.add_argument("--model", type=Path, help="the exported model's folder (default: the shipped demo model)")
    parser.add_argument("--tensorrt", action="store_true", help="also compare the TensorRT backend (needs a GPU and engines)")
    parser.add_argument("--plugin", type=Path, help="libgpstoken_trt.so for --tensorrt")
    args = parser.parse_args(argv)

    import gpstoken
    from gpstoken_core.imageio import bundled_photo, center_crop_resize

    model = gpstoken.GPSTokenizer.from_pretrained(args.model or Path(gpstoken.__file__).parent / "weights" / "tiny").eval()
    photos = np.stack([center_crop_resize(bundled_photo(p), model.config.tile) for p in PHOTOS])
    write_parity_data(args.export_dir, model, args.out, photos)
    ok = check_with_pluginref(args.out)
    print(f"polygraphy PluginRefRunner (NumPy GaussianSplat) vs torch on splat.onnx: {'PASS' if ok else 'FAIL'}")
    if args.tensorrt:
        for name, diff in compare_backends(args.export_dir, model, photos, args.plugin).items():
            print(f"{name}: max |diff| {diff} grey levels")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
