"""``gpstoken export``: a folder with encoder.onnx, decoder graphs and manifest.json, written atomically.

encoder.onnx: (image (B, 3, h, w) in [-1, 1], g_init (B, L, 5), boxes (B, L, 4)) -> (g, f) for one tile
of any size up to the model's tile (256); the runtime partitions images (C++) and encodes tile by tile.
Decoder graphs: (g (B, L, 5) in the output's coordinates, f (B, L, C)) -> image (B, 3, H, W) for one
``gpstoken_core.tiling.DecoderSpec`` each (output size + normalization grid): ``decoder.onnx`` for one
tile, plus what the requested ``sizes`` need in each decode mode (a merged decoder per multi-tile size,
a per-tile decoder per tile size). Batch and token count are dynamic. The manifest's schema is
``gpstoken_core.manifest``.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

import gpstoken
from gpstoken.tokenizer import GPSTokenizer
from gpstoken_core.files import atomic_folder
from gpstoken_core.manifest import ENCODER, graph_entry, write_manifest
from gpstoken_core.tiling import DECODE_MODES, TILE, DecoderSpec, decoder_specs
from gpstoken_core.winograd import MIN_CHANNELS as WINOGRAD_MIN_CHANNELS

from .onnx_export import export_decoder, export_encoder, to_float16
from .splat_function import DOMAIN, DOMAIN_VERSION, ONNX_OPSET, OP_TYPE, SPLAT_ATTRIBUTES


def _io(model: onnx.ModelProto) -> dict:
    def describe(values):
        out = {}
        for v in values:
            dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
            out[v.name] = {"shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


DTYPES = ("float32", "float16")
WINOGRAD = f"winograd F(4x4,3x3) from {WINOGRAD_MIN_CHANNELS} channels"  # the manifest's decoder_convolutions
PRIMARY_DECODER = "decoder"  # the single-tile decoder's graph name (decoder.onnx)


def graph_name(spec: DecoderSpec, tile: int) -> str:
    return PRIMARY_DECODER if spec == DecoderSpec((tile, tile)) else spec.name


def export_model(
    model: GPSTokenizer,
    out: str | Path,
    sizes=((TILE, TILE),),
    dtype: str = "float32",
    decode_modes=DECODE_MODES,
    subpixel: bool = True,
    winograd: bool = False,
) -> Path:
    """Export ``model`` into the folder ``out`` for images of ``sizes`` ((H, W) pairs; any size the
    library takes), with decoder graphs for each size in each of ``decode_modes``.

    ``dtype="float16"``: all graphs in float16 (inputs, outputs, weights, the splat node), as TensorRT 11
    needs for an fp16 engine; normalization statistics stay float32.

    ``subpixel=False`` keeps the decoder's up-sampling as nearest-resize + 3x3 convolution instead of the
    sub-pixel form (``subpixel.py``); for comparisons only, the outputs agree to float rounding.

    ``winograd=True``: the 3x3 convolutions with >= ``gpstoken_core.winograd.MIN_CHANNELS`` channels in and
    out (decoders and the encoder's stem) as Winograd F(4x4, 3x3), for ONNX Runtime on CPUs: faster there,
    ~1e-5 relative error per convolution; float32 only, and neither for TensorRT engines nor int8
    variants. (The slim runtime applies the same rewrite itself to the widest convolutions of a float32
    export it runs on a CPU; this bakes it in, from fewer channels.)"""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if winograd and dtype != "float32":
        raise ValueError("Winograd convolutions are exported in float32 only (float16 loses too much in the transforms)")
    cfg = model.config
    sizes = [(int(h), int(w)) for h, w in (sizes if sizes else [(cfg.tile, cfg.tile)])]
    for h, w in sizes:
        if h < 2 * cfg.min_region or w < 2 * cfg.min_region:
            raise ValueError(f"image size {w}x{h} is too small: both sides must be >= {2 * cfg.min_region}")
    specs: dict[DecoderSpec, None] = {DecoderSpec((cfg.tile, cfg.tile)): None}
    for size in sizes:
        for mode in decode_modes:
            for spec in decoder_specs(size, cfg.tile, mode):
                specs.setdefault(spec)
    model = model.eval().float().cpu()
    tokens = cfg.tokens_per_tile
    with atomic_folder(out) as tmp:
        graphs = {ENCODER: (export_encoder(model, tmp / "encoder.onnx", (cfg.tile, cfg.tile), tokens,
                                           WINOGRAD_MIN_CHANNELS if winograd else None), None)}
        for spec in specs:
            name = graph_name(spec, cfg.tile)
            tiles = spec.grid[0] * spec.grid[1]
            graphs[name] = (export_decoder(model, tmp / f"{name}.onnx", spec.image_size, tokens * tiles, spec.grid, subpixel,
                                           WINOGRAD_MIN_CHANNELS if winograd else None), spec)
        if dtype == "float16":
            graphs = {name: (to_float16(tmp / f"{name}.onnx"), spec) for name, (_, spec) in graphs.items()}
        write_manifest(
            tmp,
            {
                "model_config": cfg.to_dict(),
                "tile": cfg.tile,
                "tokens_per_tile": tokens,
                "feature_channels": cfg.feature_channels,
                "decode_mode": cfg.decode_mode,
                "sizes": [list(s) for s in sizes],
                "dtype": dtype,
                "custom_op": {"domain": DOMAIN, "name": OP_TYPE, "version": DOMAIN_VERSION, "attributes": list(SPLAT_ATTRIBUTES)},
                "onnx_opset": ONNX_OPSET,
                "decoder_upsampling": "subpixel" if subpixel else "resize",
                "decoder_convolutions": WINOGRAD if winograd else "direct",
                "encoder_convolutions": WINOGRAD if winograd else "direct",
                "exporter": {"gpstoken": gpstoken.__version__, "torch": torch.__version__, "onnx": onnx.__version__},
                "files": {name: graph_entry(tmp / f"{name}.onnx", _io(proto), spec) for name, (proto, spec) in graphs.items()},
            },
        )
    return Path(out)
