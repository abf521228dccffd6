"""Parity of an export with the torch model, with polygraphy's Comparator, on real photos.

    python -m gpstoken_export.parity EXPORT_DIR [--model MODEL_DIR]      (or `gpstoken export --check`)

Per graph (encoder, decoder) and end to end (partition -> encoder -> decoder), torch (a CPU runner) vs
ONNX Runtime; prints the max absolute / relative error of each output and fails above tolerance
(fp32: rtol 1e-4 with atol 1e-4 x the output's scale).
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

from gpstoken.imageio import bundled_photo, center_crop_resize
from gpstoken.tokenizer import GPSTokenizer

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


def _feeds(model: GPSTokenizer, size: int):
    """Encoder and decoder inputs from real photos (batch of all photos, then one)."""
    photos = np.stack([center_crop_resize(bundled_photo(n), size) for n in PARITY_PHOTOS])
    enc_feeds, dec_feeds = [], []
    for batch in (photos, photos[:1]):
        x, rgb = model.prepare(batch)
        parts = model.partition(rgb)
        enc = {
            "image": x.numpy(),
            "g_init": np.stack([p.g_init for p in parts]).astype(np.float32),
            "boxes": np.stack([p.boxes for p in parts]).astype(np.float32),
        }
        enc_feeds.append(enc)
        with torch.inference_mode():
            tokens = model.encode_partitions(x, parts)
        dec_feeds.append({"g": tokens.image_g().numpy(), "f": tokens.f.numpy()})
    return photos, enc_feeds, dec_feeds


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
    """True when the encoder, the decoder and the end-to-end runtime agree with ``model``."""
    import json

    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    h, w = manifest["image_size"]
    if h != w or manifest["decode_mode"] != "single":
        raise ValueError("parity checks cover single-tile exports (256x256)")
    model = model.eval().float()
    photos, enc_feeds, dec_feeds = _feeds(model, h)
    if manifest.get("dtype", "float32") == "float16":
        # Float16 graphs can't meet float32 tolerances; check the runtime end to end with an fp16 bound.
        print("float16 export: end-to-end check only, atol 5e-2 x the image's scale")
        return _end_to_end(export_dir, model, photos, rtol=0.0, scale_atol=5e-2)
    tile = manifest["tile"]
    enc_torch = TorchRunner(EncoderGraph(model), {"image": (None, 3, tile, tile), "g_init": (None, None, 5), "boxes": (None, None, 4)}, ["g", "f"], "torch-encoder")
    enc_ort = OnnxrtRunner(SessionFromOnnx(str(export_dir / "encoder.onnx")), name="onnxrt-encoder")
    ok = _compare("encoder", [enc_torch, enc_ort], enc_feeds, rtol, scale_atol)
    dec_torch = TorchRunner(DecoderGraph(model, (h, w)), {"g": (None, None, 5), "f": (None, None, model.config.feature_channels)}, ["image"], "torch-decoder")
    dec_ort = OnnxrtRunner(SessionFromOnnx(str(export_dir / "decoder.onnx")), name="onnxrt-decoder")
    ok &= _compare("decoder", [dec_torch, dec_ort], dec_feeds, rtol, scale_atol)

    return ok and _end_to_end(export_dir, model, photos, rtol, scale_atol)


def _end_to_end(export_dir: Path, model: GPSTokenizer, photos: np.ndarray, rtol: float, scale_atol: float) -> bool:
    """The runtime (partition + both graphs) against GPSTokenizer.reconstruct."""
    from gpstoken_runtime import Tokenizer

    runtime = Tokenizer.load(export_dir)
    got = runtime.decode(runtime.encode(photos), as_uint8=False)
    with torch.inference_mode():
        ref = model.reconstruct(photos).numpy()
    atol = scale_atol * float(np.abs(ref).max())
    passed = np.allclose(got, ref, rtol=rtol, atol=atol)
    print(f"end2end  batch {len(photos)} image  max abs {float(np.abs(got - ref).max()):.3g}  {'PASS' if passed else 'FAIL'}")
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
