"""The runtime tokenizer: partition (the library's C++ code) + the exported ONNX graphs / engines.

Images of any size are handled as the library does (``gpstoken_core.tiling``): partitioned and encoded
per tile, decoded "merged" or per "tiles" with the decoder graphs the export holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpstoken_core.manifest import ENCODER, decoder_graph, read_manifest
from gpstoken_core.tiling import check_decode_mode, decode_jobs, encode_groups, tile_grid, tile_to_image

from gpstoken_core import imageio, partition as _partition
from .backends import Backend, load_graphs


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
        return tile_to_image(self.g, self.tiles[self.tile_index].astype(self.g.dtype), self.image_size, np.stack)


class Tokenizer:
    def __init__(self, folder: Path, manifest: dict, graphs: dict[str, Backend], max_batch: int | None = None):
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        self.folder, self.manifest, self.graphs = folder, manifest, graphs
        self.max_batch = max_batch  # images per graph run; None: the whole batch at once
        cfg = manifest["model_config"]
        self.tile = int(manifest["tile"])
        self.tokens_per_tile = int(manifest["tokens_per_tile"])
        self.feature_channels = int(manifest["feature_channels"])
        self.lam, self.min_region = float(cfg["lam"]), int(cfg["min_region"])
        self.decode_mode = manifest["decode_mode"]  # the model's default
        self.dtype = manifest["dtype"]  # of the graphs' inputs and outputs
        self.sizes = [tuple(s) for s in manifest.get("sizes", [[self.tile, self.tile]])]
        self._input_dtypes = {
            name: {k: np.dtype(io["dtype"]) for k, io in manifest["files"][name]["inputs"].items()} for name in graphs
        }

    @property
    def image_size(self) -> tuple[int, int]:
        """The first size the export was made for (what the CLI resizes to by default)."""
        return self.sizes[0]

    @classmethod
    def load(cls, folder: str | Path, backend: str = "onnxruntime", device: str = "cpu", threads: int | None = None,
             precision: str | None = None, max_batch: int | None = None, winograd: bool | int | None = None,
             **backend_options) -> Tokenizer:
        """Load every graph of an export folder on ``backend`` (onnxruntime, tensorrt).

        ``precision="int8"``: the folder's int8 variant (``FOLDER/int8``, written by ``gpstoken export --int8``
        or ``python -m gpstoken_export.quantize``: int8 convolutions in the decoder, for ONNX Runtime on the
        CPU); None or "float": the folder as it is.

        ``max_batch``: images per graph run, larger batches are run in chunks of it. Default: 1 on ONNX
        Runtime's CPU provider (one image's maps already make large GEMMs; more images only push the
        maps out of the caches: the tiny decoder took 241 instead of 208 ms per image at batch 8),
        the whole batch on a GPU.

        ``winograd`` (ONNX Runtime): None (default) runs a float32 export's 3x3 convolutions with >= 128
        channels in and out as Winograd F(4x4, 3x3) on the CPU (rewritten when loading,
        ``gpstoken_core.winograd``: M128's decoder ~1.45x faster, images within one grey level, but ~2 s
        more to load on a 2-core VM); True the same, an error where it does not apply; an int from that
        many channels; False as the files are."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if precision not in (None, "float", "int8"):
            raise ValueError(f"unknown precision {precision!r} (float or int8)")
        if precision == "int8" and manifest.get("precision") != "int8":
            variant = folder / "int8"
            if not (variant / "manifest.json").exists():
                raise FileNotFoundError(f"{folder}: no int8 variant ({variant} is missing); make it with "
                                        f"`python -m gpstoken_export.quantize {folder}` or `gpstoken export --int8`")
            folder, manifest = variant, read_manifest(variant)
            if manifest.get("precision") != "int8":
                raise ValueError(f"{folder}/manifest.json: field 'precision' is not 'int8'")
        if max_batch is None and backend == "onnxruntime" and device == "cpu":
            max_batch = 1
        if backend == "onnxruntime":
            backend_options["winograd"] = winograd
        elif winograd:
            raise ValueError("winograd convolutions are for the onnxruntime backend on the CPU")
        return cls(folder, manifest, load_graphs(folder, manifest, backend, device, threads, **backend_options), max_batch)

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Feeds cast to the graph's input dtypes (float16 exports); outputs returned as float32."""
        types = self._input_dtypes[graph]
        feeds = {k: np.ascontiguousarray(v, dtype=types.get(k, v.dtype)) for k, v in feeds.items()}
        run = self.graphs[graph].run
        n = len(next(iter(feeds.values())))  # every graph input is batch-first
        if self.max_batch is None or n <= self.max_batch:
            return [np.asarray(o, dtype=np.float32) for o in run(feeds)]
        step = self.max_batch
        chunks = [run({k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
        return [np.concatenate([np.asarray(c[j], dtype=np.float32) for c in chunks]) for j in range(len(chunks[0]))]

    # ------------------------------------------------------------------ images
    def _batch(self, images) -> np.ndarray:
        if isinstance(images, (list, tuple)):
            arrays = [imageio.to_rgb_uint8(np.asarray(im), f"image {k}") for k, im in enumerate(images)]
            if len({a.shape for a in arrays}) > 1:
                raise imageio.ImageError(f"images in a batch must share one size, got {sorted({a.shape for a in arrays})}")
            return np.stack(arrays)
        arr = np.asarray(images)
        return np.stack([imageio.to_rgb_uint8(a, f"image {k}") for k, a in enumerate(arr)]) if arr.ndim == 4 else imageio.to_rgb_uint8(arr)[None]

    def encode(self, images, num_tokens: int | None = None, priority=None) -> Tokens:
        """Partition (Alg. 1) per tile and encode; images of any size (one size per batch)."""
        batch = self._batch(images)
        h, w = batch.shape[1:3]
        total = num_tokens or self.tokens_per_tile * len(tile_grid(h, w, self.tile))
        parts = _partition.partition(batch, total, lam=self.lam, min_size=self.min_region, priority=priority, tile=self.tile)
        first = parts[0]
        x = np.ascontiguousarray((batch.astype(np.float32) / 127.5 - 1).transpose(0, 3, 1, 2))
        g_init = np.stack([p.g_init for p in parts]).astype(np.float32)
        boxes = np.stack([p.boxes for p in parts]).astype(np.float32)
        b, n = g_init.shape[:2]
        g = np.empty((b, n, 5), np.float32)
        f = np.empty((b, n, self.feature_channels), np.float32)
        # tiles of one size and token count run as one batch, as the library does
        for group in encode_groups(first.tiles, first.tile_index):
            sels = [np.nonzero(first.tile_index == t)[0] for t in group]
            crops, gi, bx = [], [], []
            for t, sel in zip(group, sels):
                x0, y0, x1, y1 = first.tiles[t]
                crops.append(x[:, :, y0 : y1 + 1, x0 : x1 + 1])
                gi.append(g_init[:, sel])
                bx.append(boxes[:, sel] - np.array([x0, y0, x0, y0], np.float32))
            gt, ft = self._run(ENCODER, {"image": np.concatenate(crops), "g_init": np.concatenate(gi), "boxes": np.concatenate(bx)})
            for k, sel in enumerate(sels):
                g[:, sel], f[:, sel] = gt[k * b : (k + 1) * b], ft[k * b : (k + 1) * b]
        return Tokens(g=g, f=f, g_init=g_init, image_size=(h, w), tiles=first.tiles, tile_index=first.tile_index)

    def decode(self, tokens: Tokens, as_uint8: bool = True, mode: str | None = None) -> np.ndarray:
        """(B, H, W, 3) uint8, or with ``as_uint8=False`` the decoder's (B, 3, H, W) float output.

        ``mode``: "merged" or "tiles" (see ``gpstoken_core.tiling``); default: the model's."""
        if tokens.f.shape[-1] != self.feature_channels:
            raise ValueError(f"tokens have {tokens.f.shape[-1]} feature channels, the export expects {self.feature_channels}")
        if not (np.isfinite(tokens.g).all() and np.isfinite(tokens.f).all()):
            raise ValueError("tokens contain NaN or Inf")
        mode = check_decode_mode(mode or self.decode_mode)
        h, w = tokens.image_size
        jobs = decode_jobs((h, w), tokens.tiles, mode)
        names = [decoder_graph(self.manifest, job.spec, (h, w), mode) for job in jobs]
        g, f = tokens.g.astype(np.float32), tokens.f.astype(np.float32)
        if len(jobs) == 1:
            out = self._run(names[0], {"g": tokens.image_g().astype(np.float32), "f": f})[0]
        else:
            out = np.zeros((g.shape[0], 3, h, w), np.float32)
            for job, name in zip(jobs, names):
                sel = np.nonzero(tokens.tile_index == job.tile)[0]
                x0, y0, x1, y1 = job.box
                out[:, :, y0 : y1 + 1, x0 : x1 + 1] = self._run(name, {"g": g[:, sel], "f": f[:, sel]})[0]
        return to_uint8(out) if as_uint8 else out

    def reconstruct(self, images, num_tokens: int | None = None, priority=None, mode: str | None = None) -> np.ndarray:
        return self.decode(self.encode(images, num_tokens, priority), mode=mode)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded as gpstoken.to_uint8."""
    x = np.rint((np.clip(images, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
