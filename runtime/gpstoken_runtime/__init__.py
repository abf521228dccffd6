"""gpstoken_runtime: run an exported GPSToken tokenizer with numpy + ONNX Runtime, no torch.

    from gpstoken_runtime import Tokenizer
    tok = Tokenizer.load("export_dir")              # written by `gpstoken export`
    tokens = tok.encode(image_uint8)                # partition (C++) + encoder.onnx
    images = tok.decode(tokens)                     # decoder.onnx -> (B, H, W, 3) uint8
"""

from .backends import Backend, OnnxRuntimeBackend
from .tokenizer import ExportError, Tokenizer, Tokens

__all__ = ["Backend", "ExportError", "OnnxRuntimeBackend", "Tokenizer", "Tokens"]
