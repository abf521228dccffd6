"""gpstoken_runtime: run an exported GPSToken tokenizer with numpy + ONNX Runtime (or TensorRT), no torch.

    from gpstoken_runtime import Tokenizer
    tok = Tokenizer.load("export_dir")              # written by `gpstoken export`
    tokens = tok.encode(image_uint8)                # partition (C++) + encoder.onnx, per tile, any size
    images = tok.decode(tokens)                     # decoder graph(s) -> (B, H, W, 3) uint8

    from gpstoken_runtime import Generator
    gen = Generator.load("generator_export")        # written by `gpstoken export-generator`
    images = gen.sample([3, 7], seed=0)             # the torch pipeline's images for that seed
"""

from gpstoken_core.manifest import ExportError

from .backends import Backend
from .backends.onnxruntime import OnnxRuntimeBackend
from .generator import Generator
from .tokenizer import Tokenizer, Tokens

__all__ = ["Backend", "ExportError", "Generator", "OnnxRuntimeBackend", "Tokenizer", "Tokens"]
