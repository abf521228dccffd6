"""``gpstoken export``: a folder with encoder.onnx, decoder.onnx and manifest.json, written atomically.

encoder.onnx: (image (B, 3, T, T) in [-1, 1], g_init (B, L, 5), boxes (B, L, 4)) -> (g, f) for one tile
(T = the model's tile, 256); the runtime partitions images (C++) and encodes tile by tile.
decoder.onnx: (g (B, L, 5) in whole-image coordinates, f (B, L, C)) -> image (B, 3, H, W) for the exported
image size (one tile: H = W = 256; larger sizes decode all tiles' tokens as one map, as S64/M128 do;
L256-style models decode tile by tile with a tile-size graph). Batch and token count are dynamic.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import torch

import gpstoken
from gpstoken.tokenizer import GPSTokenizer

from gpstoken_runtime.tokenizer import sha256_file as sha256

from .onnx_export import export_decoder, export_encoder, to_float16
from .splat_function import DOMAIN, DOMAIN_VERSION, ONNX_OPSET, OP_TYPE

MANIFEST_FORMAT = "gpstoken-export"
MANIFEST_VERSION = 1


def _io(model: onnx.ModelProto) -> dict:
    def describe(values):
        out = {}
        for v in values:
            dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
            out[v.name] = {"shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


DTYPES = ("float32", "float16")


def export_model(model: GPSTokenizer, out: str | Path, image_size: tuple[int, int] = (256, 256), dtype: str = "float32") -> Path:
    """Export ``model`` for images of ``image_size`` (multiples of the tile) into the folder ``out``.

    ``dtype="float16"``: both graphs in float16 (inputs, outputs, weights, the splat node), as TensorRT 11
    needs for an fp16 engine; normalization statistics stay float32."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = Path(out)
    cfg = model.config
    h, w = (int(v) for v in image_size)
    if h % cfg.tile or w % cfg.tile:
        raise ValueError(f"image size {h}x{w} must be a multiple of the model's tile ({cfg.tile})")
    grid = (h // cfg.tile, w // cfg.tile)
    if grid == (1, 1):
        decode_mode, decoder_size = "single", (h, w)
    elif cfg.merge_tiles:
        decode_mode, decoder_size = "merged", (h, w)
    else:
        decode_mode, decoder_size = "per_tile", (cfg.tile, cfg.tile)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model = model.eval().float().cpu()
        tokens = cfg.tokens_per_tile
        enc = export_encoder(model, tmp / "encoder.onnx", (cfg.tile, cfg.tile), tokens)
        dec = export_decoder(model, tmp / "decoder.onnx", decoder_size, tokens, grid if decode_mode == "merged" else (1, 1))
        if dtype == "float16":
            enc, dec = to_float16(tmp / "encoder.onnx"), to_float16(tmp / "decoder.onnx")
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "model_config": cfg.to_dict(),
            "image_size": [h, w],
            "tile": cfg.tile,
            "grid": list(grid),
            "tokens_per_tile": tokens,
            "feature_channels": cfg.feature_channels,
            "decode_mode": decode_mode,
            "dtype": dtype,
            "custom_op": {"domain": DOMAIN, "name": OP_TYPE, "version": DOMAIN_VERSION, "attributes": ["height", "width", "support"]},
            "onnx_opset": ONNX_OPSET,
            "exporter": {"gpstoken": gpstoken.__version__, "torch": torch.__version__, "onnx": onnx.__version__},
            "files": {
                "encoder": {"path": "encoder.onnx", "sha256": sha256(tmp / "encoder.onnx"), **_io(enc)},
                "decoder": {"path": "decoder.onnx", "sha256": sha256(tmp / "decoder.onnx"), **_io(dec)},
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
