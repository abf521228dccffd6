"""The runtime tokenizer: partition (the library's C++ code) + the exported ONNX graphs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._library import imageio, partition as _partition

from .backends import BACKENDS, Backend

MANIFEST_FORMAT = "gpstoken-export"
SUPPORTED_VERSIONS = (1,)


class ExportError(ValueError):
    """An export folder is missing, damaged or inconsistent; the message names the file and field."""


@dataclass
class Tokens:
    g: np.ndarray  # (B, L, 5) in tile coordinates
    f: np.ndarray  # (B, L, C)
    g_init: np.ndarray  # (B, L, 5)
    image_size: tuple[int, int]
    tiles: np.ndarray  # (T, 4) inclusive tile boxes
    tile_index: np.ndarray  # (L,)

    def image_g(self) -> np.ndarray:
        if len(self.tiles) == 1:
            return self.g
        return _partition.tile_to_image(self.g, self.tiles[self.tile_index].astype(self.g.dtype), self.image_size, np.stack)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file (the manifest's integrity field)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such export folder")
    if not path.exists():
        raise ExportError(f"{path}: missing (is {folder} a `gpstoken export` folder?)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"{path}: field 'format' is not {MANIFEST_FORMAT!r}")
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        raise ExportError(
            f"{path}: field 'version' is {manifest.get('version')!r}; this runtime reads {SUPPORTED_VERSIONS} "
            "(re-export with the matching gpstoken, or update gpstoken_runtime)"
        )
    for key in ("model_config", "image_size", "tile", "tokens_per_tile", "feature_channels", "decode_mode", "files"):
        if key not in manifest:
            raise ExportError(f"{path}: field {key!r} is missing")
    for graph in ("encoder", "decoder"):
        entry = manifest["files"].get(graph)
        if not entry:
            raise ExportError(f"{path}: field 'files.{graph}' is missing")
        file = folder / entry["path"]
        if not file.exists():
            raise ExportError(f"{file}: missing ({graph} graph named in the manifest)")
        if sha256_file(file) != entry["sha256"]:
            raise ExportError(
                f"{file}: its SHA-256 differs from the manifest's files.{graph}.sha256: the file is damaged or comes "
                "from another export (encoder and decoder must come from the same export)"
            )
    return manifest


class Tokenizer:
    def __init__(self, manifest: dict, encoder: Backend, decoder: Backend, folder: Path):
        self.manifest, self.encoder, self.decoder, self.folder = manifest, encoder, decoder, folder
        cfg = manifest["model_config"]
        self.image_size = tuple(manifest["image_size"])
        self.tile = int(manifest["tile"])
        self.tokens_per_tile = int(manifest["tokens_per_tile"])
        self.feature_channels = int(manifest["feature_channels"])
        self.lam, self.min_region = float(cfg["lam"]), int(cfg["min_region"])
        self.decode_mode = manifest["decode_mode"]
        self.dtype = manifest.get("dtype", "float32")  # of the graphs' inputs and outputs
        self._input_dtypes = {
            graph: {name: np.dtype(io["dtype"]) for name, io in manifest["files"][graph]["inputs"].items()}
            for graph in ("encoder", "decoder")
        }

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Feeds cast to the graph's input dtypes (float16 exports); outputs returned as float32."""
        types = self._input_dtypes[graph]
        feeds = {k: np.ascontiguousarray(v, dtype=types.get(k, v.dtype)) for k, v in feeds.items()}
        backend = self.encoder if graph == "encoder" else self.decoder
        return [np.asarray(o, dtype=np.float32) for o in backend.run(feeds)]

    @classmethod
    def load(cls, folder: str | Path, backend: str = "onnxruntime", device: str = "cpu", threads: int | None = None, **backend_options) -> Tokenizer:
        folder = Path(folder)
        manifest = read_manifest(folder)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
        make = BACKENDS[backend]
        files = manifest["files"]
        if backend == "tensorrt":
            from .tensorrt_backend import EngineMismatch, TensorRTUnavailable

            section = manifest.get("tensorrt")
            if not section or "files" not in section:
                raise ExportError(f"{folder / 'manifest.json'}: no 'tensorrt' section; build the engines first (gpstoken export --tensorrt)")
            files = section["files"]
            for name in ("encoder", "decoder"):
                engine = folder / files[name]["path"]
                if not engine.exists():
                    raise ExportError(f"{engine}: missing ({name} engine named in the manifest)")
                if sha256_file(engine) != files[name]["sha256"]:
                    raise ExportError(f"{engine}: its SHA-256 differs from the manifest's tensorrt.files.{name}.sha256")
            device = "cuda" if device == "cpu" else device
            backend_options.setdefault("manifest_section", section)
            passthrough: tuple[type[Exception], ...] = (TensorRTUnavailable, EngineMismatch)
        else:
            passthrough = ()
        graphs = []
        for name in ("encoder", "decoder"):
            try:
                graph = make(folder / files[name]["path"], device=device, threads=threads, **backend_options)
            except passthrough:
                raise
            except Exception as err:  # the backend's own error types (ORT's InvalidProtobuf, ...)
                raise ExportError(f"{folder / files[name]['path']}: cannot be loaded ({err})") from None
            expected = list(manifest["files"][name]["inputs"])
            if graph.input_names != expected:
                raise ExportError(f"{name} graph inputs {graph.input_names} differ from the manifest's {expected}")
            graphs.append(graph)
        return cls(manifest, graphs[0], graphs[1], folder)

    # ------------------------------------------------------------------ images
    def _batch(self, images) -> np.ndarray:
        if isinstance(images, (list, tuple)):
            arrays = [imageio.to_rgb_uint8(np.asarray(im), f"image {k}") for k, im in enumerate(images)]
            if len({a.shape for a in arrays}) > 1:
                raise imageio.ImageError(f"images in a batch must share one size, got {sorted({a.shape for a in arrays})}")
            batch = np.stack(arrays)
        else:
            arr = np.asarray(images)
            batch = np.stack([imageio.to_rgb_uint8(a, f"image {k}") for k, a in enumerate(arr)]) if arr.ndim == 4 else imageio.to_rgb_uint8(arr)[None]
        if batch.shape[1:3] != self.image_size:
            h, w = self.image_size
            raise imageio.ImageError(
                f"this export takes {w}x{h} images, got {batch.shape[2]}x{batch.shape[1]}; resize first "
                "(gpstoken.imageio.center_crop_resize) or export for that size (`gpstoken export --size`)"
            )
        return batch

    def encode(self, images, num_tokens: int | None = None, priority=None) -> Tokens:
        batch = self._batch(images)
        h, w = self.image_size
        tiles_total = (h // self.tile) * (w // self.tile)
        total = num_tokens or self.tokens_per_tile * tiles_total
        parts = _partition.partition(batch, total, lam=self.lam, min_size=self.min_region, priority=priority, tile=self.tile)
        first = parts[0]
        x = batch.astype(np.float32) / 127.5 - 1
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        g_init = np.stack([p.g_init for p in parts]).astype(np.float32)
        boxes = np.stack([p.boxes for p in parts]).astype(np.float32)
        b, n = g_init.shape[:2]
        g = np.empty((b, n, 5), np.float32)
        f = np.empty((b, n, self.feature_channels), np.float32)
        for t, (x0, y0, x1, y1) in enumerate(first.tiles):
            sel = np.nonzero(first.tile_index == t)[0]
            gt, ft = self._run(
                "encoder",
                {
                    "image": np.ascontiguousarray(x[:, :, y0 : y1 + 1, x0 : x1 + 1]),
                    "g_init": np.ascontiguousarray(g_init[:, sel]),
                    "boxes": np.ascontiguousarray(boxes[:, sel] - np.array([x0, y0, x0, y0], np.float32)),
                }
            )
            g[:, sel], f[:, sel] = gt, ft
        return Tokens(g=g, f=f, g_init=g_init, image_size=(h, w), tiles=first.tiles, tile_index=first.tile_index)

    def decode(self, tokens: Tokens, as_uint8: bool = True) -> np.ndarray:
        """(B, H, W, 3) uint8, or with ``as_uint8=False`` the decoder's (B, 3, H, W) float output."""
        if tokens.f.shape[-1] != self.feature_channels:
            raise ValueError(f"tokens have {tokens.f.shape[-1]} feature channels, the export expects {self.feature_channels}")
        if not (np.isfinite(tokens.g).all() and np.isfinite(tokens.f).all()):
            raise ValueError("tokens contain NaN or Inf")
        if tuple(tokens.image_size) != self.image_size:
            raise ValueError(f"tokens describe a {tokens.image_size} image, the export decodes {self.image_size}")
        g, f = tokens.g.astype(np.float32), tokens.f.astype(np.float32)
        if self.decode_mode == "per_tile":
            h, w = self.image_size
            out = np.zeros((g.shape[0], 3, h, w), np.float32)
            for t, (x0, y0, x1, y1) in enumerate(tokens.tiles):
                sel = np.nonzero(tokens.tile_index == t)[0]
                out[:, :, y0 : y1 + 1, x0 : x1 + 1] = self._run("decoder", {"g": g[:, sel], "f": f[:, sel]})[0]
        else:
            out = self._run("decoder", {"g": tokens.image_g(), "f": f})[0]
        return to_uint8(out) if as_uint8 else out

    def reconstruct(self, images, num_tokens: int | None = None, priority=None) -> np.ndarray:
        return self.decode(self.encode(images, num_tokens, priority))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded as gpstoken.to_uint8."""
    x = np.rint((np.clip(images, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
