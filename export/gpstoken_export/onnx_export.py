"""torch -> ONNX for the tokenizer graphs, with the splat as one ``gpstoken::GaussianSplat`` node."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from gpstoken.splatting import SPLAT_OP
from gpstoken.tokenizer import GPSTokenizer
from gpstoken_core.official import TOKENS_PER_TILE
from gpstoken_core.tiling import TILE
from gpstoken_core.winograd import rewrite_convolutions

from .subpixel import fold_pads_into_convs, subpixel_upsampling
from .splat_function import DOMAIN, DOMAIN_VERSION, ONNX_OPSET, OP_TYPE, add_splat_function, drop_splat_function

_registered = False


def register_splat_symbolic() -> None:
    """Teach the TorchScript exporter to emit the bare GaussianSplat node for ``gpstoken::gaussian_splat``."""
    global _registered
    if _registered:
        return
    from torch.onnx import symbolic_helper

    def splat_symbolic(g, gaussians, features, height, width, support):
        h = symbolic_helper._get_const(height, "i", "height")
        w = symbolic_helper._get_const(width, "i", "width")
        s = symbolic_helper._get_const(support, "f", "support")
        out = g.op(f"{DOMAIN}::{OP_TYPE}", gaussians, features, height_i=h, width_i=w, support_f=s)
        sizes = symbolic_helper._get_tensor_sizes(features) or [None, None, None]
        out.setType(features.type().with_sizes([sizes[0], sizes[2], h, w]))  # (B, C, H, W)
        return out

    torch.onnx.register_custom_op_symbolic(SPLAT_OP, splat_symbolic, ONNX_OPSET)
    _registered = True


class DecoderGraph(nn.Module):
    """(g (B, L, 5), f (B, L, C)) -> image (B, 3, H, W) for a fixed image size.

    g is in whole-image coordinates; an image of several tiles is decoded as one map with per-tile
    normalization statistics over ``grid`` (the official merged decoding of S64/M128).
    """

    def __init__(self, model: GPSTokenizer, image_size: tuple[int, int], grid: tuple[int, int] = (1, 1)):
        super().__init__()
        self.model, self.image_size, self.grid = model, tuple(image_size), tuple(grid)

    def forward(self, g: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        decoder = self.model.decoder
        h, w = self.image_size
        image = decoder(decoder.render(g, f, decoder.map_size(h, w)), self.grid)
        if tuple(image.shape[-2:]) != (h, w):
            image = torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)
        return image


# Kept in float32 inside an fp16 graph (the converter adds the casts): normalization statistics, whose
# reductions over large maps lose too much in float16.
FP32_OPS = ["ReduceMean", "Sqrt"]


def to_float16(path: Path) -> onnx.ModelProto:
    """Rewrite an exported graph in float16 (inputs, outputs, weights, the GaussianSplat node), for
    TensorRT 11, whose strongly typed builds take precision from the ONNX types. Normalization
    statistics stay float32 (FP32_OPS); the splat node's plugin/function compute in float32 too."""
    from onnxconverter_common import float16

    model = onnx.load(str(path))
    drop_splat_function(model)
    # Intermediate types are re-inferred afterwards; the converter's own edits of them go wrong next to
    # the float32-kept ops.
    del model.graph.value_info[:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "float32 number truncated": tiny weights clamp to fp16's range
        model = float16.convert_float_to_float16(
            model, keep_io_types=False, op_block_list=float16.DEFAULT_OP_BLOCK_LIST + FP32_OPS
        )
    del model.graph.value_info[:]
    onnx.save(model, str(path))
    return finish(path)


def finish(path: Path) -> onnx.ModelProto:
    """Attach the splat function, infer shapes, check, save."""
    model = onnx.load(str(path))
    add_splat_function(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


def export_decoder(
    model: GPSTokenizer, path: str | Path, image_size=(TILE, TILE), tokens: int = TOKENS_PER_TILE, grid=(1, 1),
    subpixel: bool = True, winograd_min_channels: int | None = None,
) -> onnx.ModelProto:
    """``subpixel``: write the up-sampling convolutions in sub-pixel form (``subpixel.py``: 2.25x fewer
    FLOPs there, same function); False keeps nearest-resize + 3x3 convolution as the model is written.
    ``winograd_min_channels``: 3x3 convolutions with at least that many input and output channels as
    Winograd F(4x4, 3x3) (``gpstoken_core.winograd``, for ONNX Runtime on CPUs); None: none."""
    register_splat_symbolic()
    path = Path(path)
    model = model.eval()
    g = torch.rand(1, tokens, 5) * torch.tensor([0.1, 0.1, 0.0, 1.6, 1.6]) + torch.tensor([0.02, 0.02, 0.0, -0.8, -0.8])
    f = torch.randn(1, tokens, model.config.feature_channels)
    with (
        warnings.catch_warnings(),
        subpixel_upsampling(model) if subpixel else nullcontext(),
    ):
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            # eval(): torch.onnx.export restores the wrapper's mode afterwards, and a new module is in training mode
            DecoderGraph(model, image_size, grid).eval(),
            (g, f),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["g", "f"],
            output_names=["image"],
            dynamic_axes={"g": {0: "batch", 1: "tokens"}, "f": {0: "batch", 1: "tokens"}, "image": {0: "batch"}},
            custom_opsets={DOMAIN: DOMAIN_VERSION},
        )
    if subpixel or winograd_min_channels:
        proto = onnx.load(str(path))
        fold_pads_into_convs(proto)
        with_winograd(proto, winograd_min_channels)
        onnx.save(proto, str(path))
    return finish(path)


def with_winograd(proto: onnx.ModelProto, min_channels: int | None) -> onnx.ModelProto:
    """The wide 3x3 convolutions of ``proto`` rewritten as Winograd F(4x4, 3x3), in place (none if
    ``min_channels`` is None); shapes are inferred first so that maps of a static size skip the crop."""
    if min_channels:
        inferred = onnx.shape_inference.infer_shapes(proto)
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(inferred.graph.value_info)
        rewrite_convolutions(proto, min_channels)
    return proto


class EncoderGraph(nn.Module):
    """(image (B, 3, H, W) in [-1, 1], g_init (B, L, 5), boxes (B, L, 4) inclusive pixels) -> (g, f)."""

    def __init__(self, model: GPSTokenizer):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, g_init: torch.Tensor, boxes: torch.Tensor):
        return self.model.encoder(image, g_init, boxes)


def export_encoder(
    model: GPSTokenizer, path: str | Path, image_size=(TILE, TILE), tokens: int = TOKENS_PER_TILE,
    winograd_min_channels: int | None = None,
) -> onnx.ModelProto:
    """``winograd_min_channels``: the stem's 3x3 convolutions with at least that many channels in and out as
    Winograd F(4x4, 3x3) for tiles of any size (``gpstoken_core.winograd``); None: none."""
    import numpy as np

    from gpstoken_core.imageio import bundled_photo, center_crop_resize

    path = Path(path)
    model = model.eval()
    photo = center_crop_resize(bundled_photo("astronaut"), max(image_size))[: image_size[0], : image_size[1]]
    x, rgb = model.prepare(np.ascontiguousarray(photo))
    part = model.partition(rgb, tokens)[0]
    g_init = torch.from_numpy(part.g_init)[None]
    boxes = torch.from_numpy(part.boxes.astype(np.float32))[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            EncoderGraph(model).eval(),
            (x, g_init, boxes),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["image", "g_init", "boxes"],
            output_names=["g", "f"],
            dynamic_axes={
                "image": {0: "batch", 2: "height", 3: "width"},  # tiles of any size up to the model's tile
                "g_init": {0: "batch", 1: "tokens"},
                "boxes": {0: "batch", 1: "tokens"},
                "g": {0: "batch", 1: "tokens"},
                "f": {0: "batch", 1: "tokens"},
            },
        )
    model_proto = onnx.shape_inference.infer_shapes(with_winograd(onnx.load(str(path)), winograd_min_channels))
    onnx.checker.check_model(model_proto, full_check=True)
    onnx.save(model_proto, str(path))
    return model_proto
