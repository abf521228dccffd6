"""Parity of an export with the torch model, with polygraphy's Comparator, on real photos.

    python -m gpstoken_export.parity EXPORT_DIR [--model MODEL_DIR]      (or `gpstoken export --check`)

Per graph (the encoder, every decoder graph at its own output size) and end to end for every size the
export was made for, in both decode modes (partition -> encoder -> decoder(s): the slim runtime against
``GPSTokenizer.reconstruct``), torch (a CPU runner) vs ONNX Runtime; prints the max absolute / relative
error of each output and fails above tolerance (fp32: rtol 1e-4 with atol 1e-4 x the output's scale).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator
from polygraphy.comparator.compare import SimpleCompareFunc

from gpstoken_core.imageio import bundled_photo, center_crop_resize
from gpstoken.tokenizer import GPSTokenizer
from gpstoken_core.manifest import ENCODER, decoder_graphs, read_manifest
from gpstoken_core.tiling import DECODE_MODES, DecoderSpec

from .onnx_export import DecoderGraph, EncoderGraph

PARITY_PHOTOS = ("astronaut", "coffee", "chelsea")


class TorchRunner(BaseRunner):
    """A polygraphy runner around a torch module on the CPU (polygraphy's own PytRunner needs CUDA)."""

    def __init__(self, module: torch.nn.Module, inputs: dict[str, tuple], outputs: list[str], name: str):
        super().__init__(name=name, prefix="torch-runner")
        self.module, self.inputs, self.outputs = module.eval(), inputs, outputs

    def activate_impl(self):
        pass

    def deactivate_impl(self):
        pass

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name, shape in self.inputs.items():
            meta.add(name, np.float32, shape)
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(np.asarray(feed_dict[k])) for k in self.inputs))
        out = out if isinstance(out, tuple) else (out,)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((k, v.numpy()) for k, v in zip(self.outputs, out))


def _photos(size: tuple[int, int]) -> np.ndarray:
    return np.stack([center_crop_resize(bundled_photo(n), size) for n in PARITY_PHOTOS])


def _feeds(model: GPSTokenizer, spec: DecoderSpec):
    """Encoder inputs (tiles of images of ``spec.image_size``) and the decoder inputs of ``spec`` (batch of
    all photos, then one). A spec's image size cut into tiles gives exactly the spec's grid."""
    photos = _photos(spec.image_size)
    enc_feeds, dec_feeds = [], []
    for batch in (photos, photos[:1]):
        x, rgb = model.prepare(batch)
        parts = model.partition(rgb)
        first = parts[0]
        x0, y0, x1, y1 = first.tiles[0]
        sel = first.tile_index == 0
        enc_feeds.append({
            "image": np.ascontiguousarray(x.numpy()[:, :, y0 : y1 + 1, x0 : x1 + 1]),
            "g_init": np.stack([p.g_init[sel] for p in parts]).astype(np.float32),
            "boxes": np.stack([p.boxes[sel] - np.array([x0, y0, x0, y0]) for p in parts]).astype(np.float32),
        })  # fmt: skip
        with torch.inference_mode():
            tokens = model.encode_partitions(x, parts)
        dec_feeds.append({"g": tokens.image_g().numpy(), "f": tokens.f.numpy()})
    return enc_feeds, dec_feeds


def _compare(name: str, runners, feeds, rtol: float, scale_atol: float) -> bool:
    results = Comparator.run(runners, data_loader=feeds)
    ok = True
    for (_, torch_iters), (_, ort_iters) in [(results[0], results[1])]:
        for it, (ref, got) in enumerate(zip(torch_iters, ort_iters)):
            for key in ref:
                a, b = ref[key], got[key]
                atol = scale_atol * max(float(np.abs(a).max()), 1e-6)
                abs_err = float(np.abs(a - b).max())
                rel_err = float((np.abs(a - b) / (np.abs(a) + atol)).max())
                passed = np.allclose(b, a, rtol=rtol, atol=atol)
                ok &= passed
                print(f"{name:8} batch {a.shape[0]} {key:6} max abs {abs_err:.3g}  max rel {rel_err:.3g}  {'PASS' if passed else 'FAIL'}")
    # polygraphy's own verdict with the same tolerances: atol per output scales with that output's magnitude
    first = results[0][1][0]
    atol = {key: scale_atol * max(float(np.abs(first[key]).max()), 1e-6) for key in first}
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(rtol=rtol, atol=atol))
    return ok and bool(accuracy)


def check_export(export_dir: str | Path, model: GPSTokenizer, rtol: float = 1e-4, scale_atol: float = 1e-4) -> bool:
    """True when the encoder, every decoder graph and the end-to-end runtime agree with ``model``."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    model = model.eval().float()
    sizes = [tuple(s) for s in manifest["sizes"]]
    if manifest["dtype"] == "float16":
        # Float16 graphs can't meet float32 tolerances; check the runtime end to end with an fp16 bound.
        print("float16 export: end-to-end check only, atol 5e-2 x the image's scale")
        return all(_end_to_end(export_dir, model, size, mode, rtol=0.0, scale_atol=5e-2) for size in sizes for mode in DECODE_MODES)
    ok = True
    channels = model.config.feature_channels
    for spec, name in decoder_graphs(manifest).items():
        enc_feeds, dec_feeds = _feeds(model, spec)
        if spec.grid == (1, 1) and spec.image_size == (manifest["tile"], manifest["tile"]):  # the encoder, at full tile size
            enc_torch = TorchRunner(EncoderGraph(model), {"image": (None, 3, None, None), "g_init": (None, None, 5), "boxes": (None, None, 4)}, ["g", "f"], "torch-encoder")
            enc_ort = OnnxrtRunner(SessionFromOnnx(str(export_dir / manifest["files"][ENCODER]["path"])), name="onnxrt-encoder")
            ok &= _compare("encoder", [enc_torch, enc_ort], enc_feeds, rtol, scale_atol)
        dec_torch = TorchRunner(DecoderGraph(model, spec.image_size, spec.grid), {"g": (None, None, 5), "f": (None, None, channels)}, ["image"], f"torch-{name}")
        dec_ort = OnnxrtRunner(SessionFromOnnx(str(export_dir / manifest["files"][name]["path"])), name=f"onnxrt-{name}")
        ok &= _compare(name, [dec_torch, dec_ort], dec_feeds, rtol, scale_atol)
    for size in sizes:
        for mode in DECODE_MODES:
            ok &= _end_to_end(export_dir, model, size, mode, rtol, scale_atol)
    return ok


def _end_to_end(export_dir: Path, model: GPSTokenizer, size: tuple[int, int], mode: str, rtol: float, scale_atol: float) -> bool:
    """The runtime (partition + all graphs) against GPSTokenizer.reconstruct on photos of ``size``."""
    from gpstoken_runtime import Tokenizer  # the parity tool checks the deployed runtime itself

    photos = _photos(size)
    runtime = Tokenizer.load(export_dir)
    got = runtime.decode(runtime.encode(photos), as_uint8=False, mode=mode)
    with torch.inference_mode():
        ref = model.reconstruct(photos, decode_mode=mode).numpy()
    atol = scale_atol * float(np.abs(ref).max())
    passed = np.allclose(got, ref, rtol=rtol, atol=atol)
    h, w = size
    print(f"end2end  {w}x{h} {mode:6} batch {len(photos)}  max abs {float(np.abs(got - ref).max()):.3g}  {'PASS' if passed else 'FAIL'}")
    return bool(passed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--model", type=Path, help="the torch model folder (default: the shipped demo model)")
    parser.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    import gpstoken

    model_dir = args.model or Path(gpstoken.__file__).parent / "weights" / "tiny"
    ok = check_export(args.export_dir, GPSTokenizer.from_pretrained(model_dir), rtol=args.rtol)
    print("parity PASSED" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
