"""Training data: image lists, the paper's augmentation, and a deterministic, resumable batch order.

Every sample's randomness (crop, flip) comes from (seed, step, slot in the global batch), and the image
order from (seed, epoch), so a run continues exactly after a resume, and N ranks together see exactly
the global batches a single process would.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from gpstoken_core.imageio import ImageError
from gpstoken.imagesets import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, DataError, list_images, read_image  # noqa: F401 (re-exported)
from gpstoken_core.partition import partition
from gpstoken_core.tiling import TILE

log = logging.getLogger("gpstoken.train")


def augment(image: np.ndarray, size: int, rng: random.Random, flip: bool, scale_jitter: float) -> np.ndarray:
    """Resize the short side to ``size`` (times a random factor in [1, 1 + scale_jitter]), crop, flip.

    scale_jitter 0 and a centre crop is the paper / official recipe; jitter > 0 draws random crops at
    random scales, which helps when there are few photos.
    """
    h, w = image.shape[:2]
    short = size * (1 + rng.uniform(0, scale_jitter)) if scale_jitter > 0 else size
    scale = short / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    im = Image.fromarray(image).resize((nw, nh), Image.BICUBIC)
    if scale_jitter > 0:
        top, left = rng.randint(0, nh - size), rng.randint(0, nw - size)
    else:
        top, left = (nh - size) // 2, (nw - size) // 2
    out = np.asarray(im.crop((left, top, left + size, top + size)))
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


class TokenizerDataset(torch.utils.data.Dataset):
    """Items are (image index, sample seed); returns the augmented image, g_init and region boxes.

    The partition (Alg. 1, C++) runs here, i.e. in the DataLoader workers. An unreadable image is
    replaced by the next readable one (deterministically) and counted in ``bad`` of the sample.
    """

    def __init__(
        self, files: list[str], size: int, tokens: int, lam: float, min_region: int, flip: bool, scale_jitter: float, tile: int = TILE
    ):
        self.files, self.size, self.tokens, self.tile = files, size, tokens, tile
        self.lam, self.min_region, self.flip, self.scale_jitter = lam, min_region, flip, scale_jitter

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        index, seed = item
        bad = []
        for attempt in range(len(self.files)):
            name = self.files[(index + attempt) % len(self.files)]
            try:
                image = read_image(name)
                break
            except (ImageError, OSError) as err:
                bad.append(f"{name}: {err}")
        else:
            raise DataError("no image in the data set can be read")
        small = min(image.shape[:2]) < self.size
        rng = random.Random(seed)
        crop = augment(image, self.size, rng, self.flip, self.scale_jitter)
        part = partition(crop, self.tokens, lam=self.lam, min_size=self.min_region, tile=self.tile, threads=1)
        x = torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 127.5 - 1
        return {
            "image": x,
            "g_init": torch.from_numpy(part.g_init),
            "boxes": torch.from_numpy(part.boxes.astype(np.float32)),
            "bad": bad,
            "small": int(small),
        }


def collate(samples: list[dict]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "g_init": torch.stack([s["g_init"] for s in samples]),
        "boxes": torch.stack([s["boxes"] for s in samples]),
        "bad": [b for s in samples for b in s["bad"]],
        "small": sum(s["small"] for s in samples),
    }


class StepBatches(torch.utils.data.Sampler):
    """For steps start..total-1, this rank's share of each global batch: [(image index, sample seed)].

    Epoch e visits the images in a permutation drawn from (seed, e); global batch s holds positions
    s*B .. s*B+B-1 of the endless sequence of epochs; rank r takes slots r, r+world, ...
    """

    def __init__(self, num_images: int, global_batch: int, seed: int, start_step: int, total_steps: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        self.n, self.batch, self.seed = num_images, global_batch, seed
        self.start, self.total, self.rank, self.world = start_step, total_steps, rank, world

    def _order(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cache: dict[int, list[int]] = {}
        for step in range(self.start, self.total):
            items = []
            for slot in range(self.rank, self.batch, self.world):
                pos = step * self.batch + slot
                epoch = pos // self.n
                if epoch not in cache:
                    cache = {epoch: self._order(epoch)}
                items.append((cache[epoch][pos % self.n], (self.seed * 1_000_003 + pos) % 2**63))
            yield items

    def __len__(self) -> int:
        return max(0, self.total - self.start)

