"""``GPSTokenizer``: images <-> Gaussian tokens, with a from_pretrained / save_pretrained API.

Inputs to ``encode`` / ``reconstruct``:
  - uint8 arrays (H, W, 3) or (B, H, W, 3), a list of same-size uint8 arrays, or PIL images;
  - torch tensors (B, 3, H, W) or (3, H, W): float in [-1, 1] (the library's range) or uint8.
All images of a batch must have the same size (a mixed-size batch is refused: resize first, e.g. with
``gpstoken_core.imageio.center_crop_resize``). Images larger than the tile (256) are partitioned and encoded
per tile with ``tokens_per_tile`` tokens each (tokens scale with area), as the official high-resolution
path. ``decode`` returns float images in about [-1, 1]; ``to_uint8`` converts them.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from gpstoken_core.imageio import ImageError, to_rgb_uint8
from gpstoken_core.partition import Partition, partition
from gpstoken_core.tiling import DecoderSpec, check_decode_mode, decode_jobs, encode_groups

from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_tensors
from .config import PRESETS, TokenizerConfig, preset
from .decoder import GaussianDecoder
from .encoder import GaussianEncoder
from .modeling import HubFiles, PretrainedModel
from .tokens import Tokens

_RANGE_SLACK = 1e-3


class GPSTokenizer(PretrainedModel):
    config_class = TokenizerConfig
    config_metadata_key = "gpstoken_config"  # the key of every saved tokenizer, the shipped tiny model's too
    kind = "model"
    official_converter = "gpstoken convert-official FILE --config m128 --out DIR"

    def __init__(self, config: TokenizerConfig | str | None = None):
        super().__init__()
        if config is None or isinstance(config, str):
            config = preset(config or "m128")
        self.config = config
        self.encoder = GaussianEncoder(config)
        self.decoder = GaussianDecoder(config)

    # ----------------------------------------------------------------- files
    # save_pretrained / from_pretrained / load_weights: gpstoken.modeling.PretrainedModel
    @classmethod
    def looks_official(cls, tensors: dict) -> bool:
        return any(k.startswith(("attnblocks.", "preprocess_img.", "ema_model.attnblocks.")) for k in tensors)

    @classmethod
    def _from_hub_fallback(cls, hub: HubFiles) -> GPSTokenizer:
        """The official repository's layout: ``gpstoken_{s64,m128,l256}.safetensors``, converted on load.

        The size comes from the subfolder or repository name (``GPSToken-M128``: m128, see ``official_size``);
        the file is looked for in the subfolder, then at the repository root. Nothing converted is written:
        the hub cache keeps the official file, and conversion is a checked renaming of its tensors."""
        from .convert import convert_official_state_dict

        size = official_size(hub.subfolder or "") or official_size(hub.repo_id.split("/")[-1])
        if size is None:
            raise hub.not_found(
                f"gpstoken model folder ({CONFIG_FILE} + {WEIGHTS_FILE}); for an official file name its size "
                f"({', '.join(OFFICIAL_SIZES)}) in the subfolder, e.g. subfolder='GPSToken-M128'"
            )
        filename = f"gpstoken_{size}.safetensors"
        path = hub.get(filename)
        if path is None and hub.subfolder:
            path = hub.get(filename, subfolder=None)
        if path is None:
            raise hub.not_found(f"gpstoken model folder or official {filename}")
        config = preset(size)
        tensors, _ = load_tensors(path)
        source = f"{hub.repo_id}:{filename}"
        model = cls(config)
        model.load_weights(convert_official_state_dict(tensors, config, source=source), source=source)
        return model

    # ----------------------------------------------------------------- inputs
    def prepare(self, images) -> tuple[torch.Tensor, np.ndarray]:
        """(x (B, 3, H, W) float in [-1, 1] on the model's device, uint8 (B, H, W, 3) for the partition)."""
        device, dtype = self._device_dtype()
        if isinstance(images, torch.Tensor):
            x = images.unsqueeze(0) if images.ndim == 3 else images
            if x.ndim != 4 or x.shape[1] != 3:
                raise ImageError(f"image tensor must be (B, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}")
            if x.dtype == torch.uint8:
                x = x.to(device=device, dtype=dtype) / 127.5 - 1
            elif x.is_floating_point():
                if not torch.isfinite(x).all():
                    raise ImageError("image tensor contains NaN or Inf")
                lo, hi = float(x.min()), float(x.max())
                if lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
                    raise ImageError(
                        f"float image values must be in [-1, 1], got [{lo:.3g}, {hi:.3g}] "
                        "(pass uint8 for 0..255 data, or map [0, 1] data with x * 2 - 1)"
                    )
                x = x.to(device=device, dtype=dtype).clamp(-1, 1)
            else:
                raise ImageError(f"image tensor must be float or uint8, got {x.dtype}")
            rgb = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            return x, rgb.permute(0, 2, 3, 1).contiguous().numpy()
        if isinstance(images, (list, tuple)):
            arrays = [to_rgb_uint8(np.asarray(im), f"image {k}") for k, im in enumerate(images)]
            sizes = {a.shape[:2] for a in arrays}
            if len(sizes) > 1:
                raise ImageError(
                    f"images in a batch must share one size, got {sorted(sizes)}; resize them first "
                    "(gpstoken_core.imageio.center_crop_resize) or encode them one by one"
                )
            batch = np.stack(arrays) if arrays else np.zeros((0, 2, 2, 3), np.uint8)
        else:
            arr = np.asarray(images)
            if arr.ndim == 4:
                batch = np.stack([to_rgb_uint8(a, f"image {k}") for k, a in enumerate(arr)])
            else:
                batch = to_rgb_uint8(arr)[None]
        if len(batch) == 0:
            raise ImageError("no images given")
        x = torch.tensor(batch, device=device).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1
        return x, batch

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = self.encoder.query_base
        return p.device, p.dtype

    # ----------------------------------------------------------------- encode / decode
    def forward(self, images: torch.Tensor, g_init: torch.Tensor, boxes: torch.Tensor):
        """Training path on single-tile images: (reconstruction, g, f).

        images (B, 3, H, W) in [-1, 1]; g_init (B, L, 5) and boxes (B, L, 4) from the partition.
        """
        g, f = self.encoder(images, g_init, boxes)
        return self.decode_single(g, f, images.shape[-2:]), g, f

    def partition(self, rgb: np.ndarray, num_tokens: int | None = None, priority=None) -> list[Partition]:
        """Alg. 1 with the model's settings on uint8 (B, H, W, 3)."""
        h, w = rgb.shape[1:3]
        if num_tokens is None:
            rows, cols = -(-h // self.config.tile), -(-w // self.config.tile)
            num_tokens = self.config.tokens_per_tile * rows * cols
        return partition(
            rgb, num_tokens, lam=self.config.lam, min_size=self.config.min_region, priority=priority, tile=self.config.tile
        )

    def encode(self, images, num_tokens: int | None = None, priority=None) -> Tokens:
        """Partition (Alg. 1) and encode. ``num_tokens`` defaults to ``tokens_per_tile`` per 256x256 tile;
        ``priority``: an (H, W) map (or one per image) that pulls tokens to a region, see
        ``gpstoken_core.partition.priority_from_boxes``."""
        x, rgb = self.prepare(images)
        parts = self.partition(rgb, num_tokens, priority)
        return self.encode_partitions(x, parts)

    def encode_partitions(self, x: torch.Tensor, parts: list[Partition]) -> Tokens:
        """Encode images x (B, 3, H, W) with precomputed partitions (one per image, same layout)."""
        device, dtype = x.device, x.dtype
        first = parts[0]
        tiles = [tuple(int(v) for v in t) for t in first.tiles]
        for k, p in enumerate(parts):
            if not (np.array_equal(p.tiles, first.tiles) and np.array_equal(p.tile_index, first.tile_index)):
                raise ValueError(f"partition {k} has a different tile layout than partition 0")
        tile_index = torch.from_numpy(first.tile_index.astype(np.int64))
        g_init = torch.from_numpy(np.stack([p.g_init for p in parts])).to(device, dtype)
        boxes = torch.from_numpy(np.stack([p.boxes for p in parts]).astype(np.float32)).to(device, dtype)

        b, n = g_init.shape[:2]
        g = x.new_empty(b, n, 5)
        f = x.new_empty(b, n, self.config.feature_channels)
        # Tiles of one size and token count are encoded together, each as its own image.
        for ts in encode_groups(tiles, first.tile_index):
            crops, gi, bx, idx = [], [], [], []
            for t in ts:
                x0, y0, x1, y1 = tiles[t]
                sel = (tile_index == t).nonzero().squeeze(1).to(device)
                crops.append(x[:, :, y0 : y1 + 1, x0 : x1 + 1])
                gi.append(g_init[:, sel])
                bx.append(boxes[:, sel] - torch.tensor([x0, y0, x0, y0], dtype=dtype, device=device))
                idx.append(sel)
            gt, ft = self.encoder(torch.cat(crops), torch.cat(gi), torch.cat(bx))
            for k, sel in enumerate(idx):
                g[:, sel] = gt[k * b : (k + 1) * b]
                f[:, sel] = ft[k * b : (k + 1) * b]
        return Tokens(
            g=g, f=f, image_size=tuple(first.image_size), g_init=g_init, tiles=tuple(tiles), tile_index=tile_index.to(device)
        )

    def decode(self, tokens: Tokens, mode: str | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in about [-1, 1] from any number of tokens.

        ``mode`` decides how an image of several tiles is decoded: "merged" (one map, per-tile
        normalization statistics, the official S64/M128 path) or "tiles" (each tile alone, then placed;
        the official L256 path). Default: the model's ``config.decode_mode``."""
        self._check_tokens(tokens)
        mode = check_decode_mode(mode or self.config.decode_mode)
        device, dtype = self._device_dtype()
        tokens = tokens.to(device)
        g, f = tokens.g.to(dtype), tokens.f.to(dtype)
        jobs = decode_jobs(tokens.image_size, tokens.tile_boxes, mode)
        if len(jobs) == 1:
            return self.decode_spec(tokens.image_g(g), f, jobs[0].spec)
        h, w = tokens.image_size
        out = g.new_zeros(g.shape[0], 3, h, w)
        ids = tokens.tile_ids
        for job in jobs:
            sel = (ids == job.tile).nonzero().squeeze(1)
            x0, y0, x1, y1 = job.box
            out[:, :, y0 : y1 + 1, x0 : x1 + 1] = self.decode_spec(g[:, sel], f[:, sel], job.spec)
        return out

    def decode_spec(self, g: torch.Tensor, f: torch.Tensor, spec: DecoderSpec) -> torch.Tensor:
        """Decode tokens g (B, L, 5) (coordinates of the whole output), f (B, L, C) into an image of
        ``spec.image_size``, normalizing over ``spec.grid`` tiles (what one exported decoder graph does)."""
        h, w = spec.image_size
        return _resize(self.decoder(self.decoder.render(g, f, self.decoder.map_size(h, w)), spec.grid), (h, w))

    def decode_single(self, g: torch.Tensor, f: torch.Tensor, size) -> torch.Tensor:
        """Decode tokens of one tile covering a (H, W) image."""
        return self.decode_spec(g, f, DecoderSpec(tuple(int(v) for v in size)))

    def reconstruct(self, images, num_tokens: int | None = None, priority=None, decode_mode: str | None = None) -> torch.Tensor:
        return self.decode(self.encode(images, num_tokens, priority), decode_mode)

    def _check_tokens(self, tokens: Tokens) -> None:
        if not isinstance(tokens, Tokens):
            raise TypeError(f"decode expects gpstoken.Tokens, got {type(tokens).__name__}")
        c = self.config.feature_channels
        if tokens.f.shape[-1] != c:
            raise ValueError(f"tokens have {tokens.f.shape[-1]} feature channels, the {self.config.name} model expects {c}")
        for name, t in (("g", tokens.g), ("f", tokens.f)):
            if not torch.isfinite(t).all():
                raise ValueError(f"tokens.{name} contains NaN or Inf")
        g = tokens.g
        if (g[..., :2] <= 0).any():
            raise ValueError("tokens.g has sigma <= 0")
        if (g[..., 2].abs() >= 1).any():
            raise ValueError("tokens.g has |rho| >= 1")
        tiles = tokens.tile_boxes
        ids = tokens.tile_ids
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(tiles)):
            raise ValueError(f"tokens.tile_index must be in [0, {len(tiles)}) (the tile count), got {int(ids.min())}..{int(ids.max())}")


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 (rounded)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


OFFICIAL_SIZES = ("s64", "m128", "l256")


def official_size(name: str) -> str | None:
    """The config preset a name mentions (``GPSToken-M128``: m128, ``gpstoken_l256``: l256), or None.

    Any preset counts, not only the official three: ``convert-official --config tiny`` converts a file of
    official names at tiny shapes too, and such a file is what the offline tests serve."""
    low = name.lower()
    found = {p for p in PRESETS if re.search(rf"(?<![a-z0-9]){re.escape(p)}(?![a-z0-9])", low)}
    return found.pop() if len(found) == 1 else None
