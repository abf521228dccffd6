"""Token data sets for generator training: images encoded once into shards of (g_init, g, f, label).

Folder layout (``encode_dataset`` writes it, ``TokenShards`` reads it)::

  dataset.json                         what was encoded: source, classes, tokenizer hash, token shape, flip
  shard-KKKKK-NNNNN.safetensors        shard K of N: images [K*S, (K+1)*S) of the sorted image list

A shard holds ``g_init`` (n, L, 5), ``g`` (n, L, 5), ``f`` (n, L, C) float32, ``label`` (n,) int64,
``index`` (n,) int64 (the image's position in the list) and ``flipped`` (n,) uint8; its metadata repeats
the facts a reader checks (tokenizer hash, L, C, class count, shard K of N). Each shard is written to a
temporary name and renamed (``gpstoken_core.files.atomic_write``), so a half-written shard is never
visible; a resumed run keeps the finished ones. Shard K belongs to process K mod world, so N processes
under torchrun write disjoint shards, and a resume may use a different process count.

Labels: an ImageNet-style folder tree (class = sub-folder, sorted by name), a list file of
``path label`` lines, ``skimage:`` / ``sklearn:`` (each bundled photo its own class) or ``digits:[train|test|all]``
(``gpstoken.generation.digits``; ``digits:`` is the training split).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gpstoken_core.files import atomic_write, atomic_write_text, read_json
from gpstoken_core.imageio import ImageError, center_crop_resize

from ..checkpoint import CheckpointError, load_tensors
from ..imagesets import IMAGE_SUFFIXES, SKIMAGE_PHOTOS, SKLEARN_PHOTOS, DataError, read_image

SHARD_FORMAT = "gpstoken-token-shards"
INFO_FILE = "dataset.json"
SHARD_RE = re.compile(r"^shard-(\d{5})-(\d{5})\.safetensors$")
TENSORS = ("g_init", "g", "f", "label", "index", "flipped")
# Facts that every shard must share with dataset.json (and a resumed run with the first run).
SHARED_FACTS = ("tokenizer_hash", "num_tokens", "channels", "num_classes", "size", "num_shards", "shard_size", "flip")

# Crash testing (tests/test_generation_shards.py): "after_shard:K" dies right after shard K is complete,
# "during_shard:K" while shard K exists only under its temporary name, as ``kill -9`` would.
CRASH_TEST_ENV = "GPSTOKEN_ENCODE_CRASH_TEST"


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-{count:05d}.safetensors"


def _crash_point(point: str, index: int) -> None:
    if os.environ.get(CRASH_TEST_ENV) == f"{point}:{index}":
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- labelled images
@dataclass
class LabeledImages:
    """Image names (paths or ``skimage:NAME``) with class ids; ``arrays`` replaces reading for in-memory sets."""

    names: list[str]
    labels: list[int]
    class_names: list[str]
    source: str
    arrays: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> np.ndarray:
        return self.arrays[i] if self.arrays is not None else read_image(self.names[i])


def labeled_images(source: str, num_classes: int | None = None) -> LabeledImages:
    """The images of ``source`` and their labels; DataError for an empty source or a bad label.

    ``num_classes``: the class count of a list file (default: largest label + 1); a label outside
    ``[0, num_classes)`` is an error naming the line."""
    if source.startswith("digits:"):
        return _digits(source)
    if source in ("skimage:", "sklearn:"):
        photos = SKIMAGE_PHOTOS if source == "skimage:" else SKLEARN_PHOTOS
        out = LabeledImages([f"{source}{p}" for p in photos], list(range(len(photos))), list(photos), source)
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"{path}: no such folder or list file")
        out = _folder_tree(path) if path.is_dir() else _list_file(path, num_classes)
    if num_classes is not None and num_classes != out.num_classes:
        raise DataError(f"{source}: has {out.num_classes} classes, --num-classes says {num_classes}")
    return out


def _folder_tree(root: Path) -> LabeledImages:
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        raise DataError(
            f"{root}: images directly in the folder ({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}); "
            "an ImageNet-style tree keeps each class's images in its own sub-folder"
        )
    names, labels, classes = [], [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(str(p) for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            continue  # an empty sub-folder is not a class (ImageFolder skips it too)
        names += files
        labels += [len(classes)] * len(files)
        classes.append(sub.name)
    if not names:
        raise DataError(f"{root}: no images in class sub-folders (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return LabeledImages(names, labels, classes, str(root))


def _list_file(path: Path, num_classes: int | None) -> LabeledImages:
    names, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)  # the label is the last field; a path may contain spaces
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise DataError(f"{path}:{number}: expected 'path label' (an integer class id), got {line!r}")
        name, label = parts[0], int(parts[1])
        if num_classes is not None and not 0 <= label < num_classes:
            raise DataError(f"{path}:{number}: label {label} is outside [0, {num_classes}) (--num-classes {num_classes})")
        if label < 0:
            raise DataError(f"{path}:{number}: label {label} is negative")
        is_bundled = name.startswith(("skimage:", "sklearn:"))
        names.append(name if is_bundled or Path(name).is_absolute() else str(path.parent / name))
        labels.append(label)
    if not names:
        raise DataError(f"{path}: the list file names no images")
    count = num_classes if num_classes is not None else max(labels) + 1
    return LabeledImages(names, labels, [str(c) for c in range(count)], str(path))


def _digits(source: str) -> LabeledImages:
    """``digits:`` (= ``digits:train``), ``digits:test``, ``digits:all``: scikit-learn's digits, upscaled."""
    from . import digits

    try:
        names = digits.image_names(source)
        images, labels = digits.digit_images(digits.parse_source(source))
    except digits.DigitsError as err:
        raise DataError(str(err)) from None
    labels = np.asarray(labels).astype(np.int64)
    count = int(labels.max()) + 1
    return LabeledImages(names, labels.tolist(), [str(c) for c in range(count)], source, np.asarray(images))


# ----------------------------------------------------------------------------- writing
def tokenizer_hash(tokenizer) -> str:
    """SHA-256 of the tokenizer's config and weights: shards from another tokenizer (or another training
    of the same size) are told apart."""
    h = hashlib.sha256(tokenizer.config.to_json().encode())
    for name, value in sorted(tokenizer.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class EncodeReport:
    shards_written: int
    shards_kept: int  # finished by an earlier run
    images: int  # this process's images encoded now
    skipped: list[str]  # "name: error" of this process's unreadable images


def encode_dataset(
    source: str,
    tokenizer,
    out: str | Path,
    *,
    size: int | None = None,
    num_tokens: int | None = None,
    shard_size: int = 1000,
    batch: int = 32,
    flip: bool = False,
    num_classes: int | None = None,
    resume: bool = False,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> EncodeReport:
    """Encode the images of ``source`` into shards in ``out`` (this process's share: shards K = rank mod world).

    Images are resized (short side) and centre-cropped to ``size`` (default the tokenizer's tile, as the
    official data set), partitioned into ``num_tokens`` tokens (default ``tokens_per_tile``) and encoded.
    ``flip``: each image is stored twice, as is and mirrored (the official flip at tokenization, made
    deterministic). Unreadable images are skipped and listed in their shard's metadata. ``barrier`` is
    called where all processes must meet (torch.distributed.barrier under torchrun)."""
    if shard_size < 1 or batch < 1:
        raise ValueError(f"--shard-size and --batch must be >= 1, got {shard_size} and {batch}")
    images = labeled_images(source, num_classes)
    kc = tokenizer.config
    size = int(size or kc.tile)
    num_tokens = int(num_tokens or kc.tokens_per_tile)
    if not 2 <= size <= kc.tile:
        raise ValueError(f"--size {size} must be in [2, {kc.tile}] (one tile of the {kc.name} tokenizer)")
    out = Path(out)
    info = {
        "format": SHARD_FORMAT,
        "source": images.source,
        "num_images": len(images),
        "num_classes": images.num_classes,
        "class_names": images.class_names,
        "tokenizer": kc.name,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "num_tokens": num_tokens,
        "channels": kc.feature_channels,
        "size": size,
        "flip": bool(flip),
        "shard_size": shard_size,
        "num_shards": -(-len(images) // shard_size),
    }
    # Read-only checks on every process first, so all of them fail alike before anything is written.
    if (out / INFO_FILE).exists():
        if not resume:
            raise FileExistsError(f"{out}: already holds token shards; pass --resume to finish them, or choose another --out")
        old = read_json(out / INFO_FILE)
        changed = [f"{k} ({old.get(k)!r} vs now {v!r})" for k, v in info.items() if k != "class_names" and old.get(k) != v]
        if changed:
            raise ValueError(f"{out}: was encoded with a different {', '.join(changed)}; resume with the same settings or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists, is not empty and holds no {INFO_FILE}; choose another --out")
    barrier()
    if rank == 0 and not (out / INFO_FILE).exists():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / INFO_FILE, json.dumps(info, indent=1) + "\n")
    barrier()

    mine = list(range(rank, info["num_shards"], world))
    done = [k for k in mine if _finished(out / shard_name(k, info["num_shards"]), info)]
    for k in mine:  # temporary files of a killed run: never complete, never read
        for stale in out.glob(f".{shard_name(k, info['num_shards'])}.*.tmp"):
            stale.unlink(missing_ok=True)
    todo = [k for k in mine if k not in done]
    rows = lambda k: range(k * shard_size, min((k + 1) * shard_size, len(images)))  # noqa: E731
    from tqdm import tqdm

    total = sum(len(rows(k)) for k in mine)
    bar = tqdm(
        total=total, initial=total - sum(len(rows(k)) for k in todo), unit="img", disable=not progress,
        desc=f"encode (rank {rank}/{world})" if world > 1 else "encode", dynamic_ncols=True, mininterval=1,
    )
    report = EncodeReport(0, len(done), 0, [])
    for k in todo:
        tensors, skipped = _encode_rows(images, rows(k), tokenizer, size, num_tokens, batch, flip, bar)
        meta = {key: json.dumps(info[key]) for key in SHARED_FACTS} | {
            "format": SHARD_FORMAT, "shard": str(k), "rows": str(len(tensors["label"])), "skipped": json.dumps(skipped),
            "written_by": f"{rank}/{world}",  # process / process count, for the record
        }  # fmt: skip
        _write_shard(out / shard_name(k, info["num_shards"]), tensors, meta, k)
        _crash_point("after_shard", k)
        report.shards_written += 1
        report.images += len(rows(k)) - len(skipped)
        report.skipped += skipped
    bar.close()
    barrier()
    return report


def _finished(path: Path, info: dict) -> bool:
    """A complete shard of this data set (a final name is only ever given to a complete file)."""
    if not path.exists():
        return False
    try:
        _check_meta(path, _read_meta(path), info)
    except CheckpointError:
        return False  # damaged after it was written: encode it again
    return True


def _encode_rows(images: LabeledImages, rows: range, tokenizer, size, num_tokens, batch, flip, bar):
    out = {k: [] for k in TENSORS}
    skipped = []
    for start in range(rows.start, rows.stop, batch):
        arrays, ids = [], []
        for i in range(start, min(start + batch, rows.stop)):
            try:
                arrays.append(center_crop_resize(images.load(i), size))
                ids.append(i)
            except (ImageError, OSError, ValueError) as err:
                name = images.names[i]
                skipped.append(str(err) if name in str(err) else f"{name}: {err}")  # most errors name the file already
            bar.update(1)
        if not arrays:
            continue
        views = [(np.stack(arrays), 0)] + ([(np.stack(arrays)[:, :, ::-1], 1)] if flip else [])
        for pixels, mirrored in views:
            with torch.no_grad():
                tokens = tokenizer.encode(np.ascontiguousarray(pixels), num_tokens)
            out["g_init"].append(tokens.g_init.float().cpu())
            out["g"].append(tokens.g.float().cpu())
            out["f"].append(tokens.f.float().cpu())
            out["label"].append(torch.tensor([images.labels[i] for i in ids], dtype=torch.int64))
            out["index"].append(torch.tensor(ids, dtype=torch.int64))
            out["flipped"].append(torch.full((len(ids),), mirrored, dtype=torch.uint8))
    if not out["label"]:  # every image of the shard was unreadable: an empty, still complete shard
        c = tokenizer.config.feature_channels
        empty = {"g_init": torch.zeros(0, num_tokens, 5), "g": torch.zeros(0, num_tokens, 5), "f": torch.zeros(0, num_tokens, c)}
        ints = {"label": torch.zeros(0, dtype=torch.int64), "index": torch.zeros(0, dtype=torch.int64)}
        return empty | ints | {"flipped": torch.zeros(0, dtype=torch.uint8)}, skipped
    return {k: torch.cat(v) for k, v in out.items()}, skipped


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], index: int) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        _crash_point("during_shard", index)

    atomic_write(path, write)


# ----------------------------------------------------------------------------- reading
def _read_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None


def _check_meta(path: Path, meta: dict[str, str], info: dict) -> None:
    if meta.get("format") != SHARD_FORMAT:
        raise CheckpointError(f"{path}: not a gpstoken token shard (format {meta.get('format')!r})")
    try:
        facts = {k: json.loads(meta[k]) for k in SHARED_FACTS}
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: bad shard metadata ({err})") from None
    wrong = [f"{k} {facts[k]!r} (data set: {info[k]!r})" for k in SHARED_FACTS if facts[k] != info[k]]
    if wrong:
        what = "another tokenizer" if "tokenizer_hash" in " ".join(wrong) else "another encoding"
        raise CheckpointError(f"{path}: comes from {what}: {'; '.join(wrong)}")


class TokenShards:
    """A folder written by ``encode_dataset``, checked whole: every shard present, from one tokenizer,
    one token shape and class count. Rows are read on demand (memory-mapped), so an ImageNet-size set is
    shared through the page cache by all the processes of a run."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / INFO_FILE).exists():
            raise DataError(f"{self.folder}: no {INFO_FILE}; not a token-shard folder (make one with `gpstoken encode-dataset`)")
        try:
            self.info = read_json(self.folder / INFO_FILE)
        except ValueError as err:
            raise DataError(str(err)) from None
        if self.info.get("format") != SHARD_FORMAT:
            raise DataError(f"{self.folder / INFO_FILE}: not a token data set (format {self.info.get('format')!r})")
        n = int(self.info["num_shards"])
        self.paths = [self.folder / shard_name(k, n) for k in range(n)]
        missing = [p.name for p in self.paths if not p.exists()]
        if missing:
            raise DataError(
                f"{self.folder}: {len(missing)} of {n} shards missing ({', '.join(missing[:3])}); "
                "finish them with `gpstoken encode-dataset ... --resume`"
            )
        strays = sorted(p.name for p in self.folder.glob("shard-*.safetensors") if p not in self.paths)
        if strays:
            raise DataError(f"{self.folder}: shards of another encoding ({', '.join(strays[:3])}); remove them")
        self.rows_per_shard, self.skipped = [], []
        for p in self.paths:
            meta = _read_meta(p)
            _check_meta(p, meta, self.info)
            self.rows_per_shard.append(int(meta["rows"]))
            self.skipped += json.loads(meta["skipped"])
        self.offsets = np.concatenate([[0], np.cumsum(self.rows_per_shard)]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise DataError(f"{self.folder}: the shards hold no tokens (every image was unreadable)")
        self._handles: dict[int, object] = {}

    num_tokens = property(lambda self: int(self.info["num_tokens"]))
    channels = property(lambda self: int(self.info["channels"]))
    num_classes = property(lambda self: int(self.info["num_classes"]))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _handle(self, k: int):
        if k not in self._handles:  # opened per process (handles do not survive fork/pickle)
            from safetensors import safe_open

            self._handles[k] = safe_open(str(self.paths[k]), framework="pt")
        return self._handles[k]

    def rows(self, indices) -> dict[str, torch.Tensor]:
        """Rows ``indices`` (global, in this order) as g_init (B, L, 5), g (B, L, 5), f (B, L, C), label (B,)."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row indices must be in [0, {len(self)})")
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        out = {k: [] for k in ("g_init", "g", "f", "label")}
        for i, k in zip(idx.tolist(), shard.tolist()):
            fh, r = self._handle(k), i - int(self.offsets[k])
            for name in out:
                out[name].append(fh.get_slice(name)[r : r + 1])
        return {k: torch.cat(v) for k, v in out.items()}

    def shard(self, k: int) -> dict[str, torch.Tensor]:
        return load_tensors(self.paths[k])[0]

    def check_model(self, config) -> None:
        """ValueError when a SiTConfig does not fit these tokens (token count, channels, classes)."""
        problems = []
        if config.num_tokens != self.num_tokens:
            problems.append(f"the model has {config.num_tokens} tokens, the shards {self.num_tokens}")
        if config.role != "layout" and config.feature_channels != self.channels:
            problems.append(f"the model has {config.feature_channels} feature channels, the shards {self.channels}")
        if config.num_classes != self.num_classes:
            problems.append(f"the model has {config.num_classes} classes, the shards {self.num_classes}")
        if problems:
            raise ValueError(f"{self.folder}: the {config.name} model does not fit the token shards: " + "; ".join(problems))


def model_data(rows: dict[str, torch.Tensor], role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a generator of ``role`` models, and its layout condition: layout g_init; texture (g - g_init, f)
    under g_init; onestage (g, f)."""
    from .transport import texture_targets

    if role == "layout":
        return rows["g_init"], None
    if role == "texture":
        return texture_targets(rows["g_init"], rows["g"], rows["f"]), rows["g_init"]
    if role == "onestage":
        return torch.cat([rows["g"], rows["f"]], dim=-1), None
    raise ValueError(f"unknown generator role {role!r}")


def shard_stats(
    shards: TokenShards, role: str, rank: int = 0, world: int = 1, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: bool = False
) -> dict[str, tuple[float, ...] | None]:
    """Per-channel mean / std (``channel_stats``' definition) of the modelled data and of the condition.

    Each process reads shards K = rank mod world; per-shard (count, mean, M2) in float64 are summed over
    processes with ``reduce_sum`` (every other row is zero) and merged in shard order (Chan et al.), so
    the result is the same for any process count."""
    n = len(shards.paths)
    parts: dict[str, torch.Tensor] = {}
    from tqdm import tqdm

    for k in tqdm(range(rank, n, world), desc="statistics", unit="shard", disable=not progress):
        x, cond = model_data(shards.shard(k), role)
        for name, t in (("x", x), ("cond", cond)):
            if t is None:
                continue
            v = t.reshape(-1, t.shape[-1]).double()
            table = parts.setdefault(name, torch.zeros(n, 1 + 2 * v.shape[1], dtype=torch.float64))
            mean = v.mean(0) if len(v) else torch.zeros(v.shape[1], dtype=torch.float64)
            table[k] = torch.cat([torch.tensor([float(len(v))], dtype=torch.float64), mean, ((v - mean) ** 2).sum(0)])
    out: dict[str, tuple[float, ...] | None] = {"mean": None, "std": None, "cond_mean": None, "cond_std": None}
    for name in ["x"] + (["cond"] if role == "texture" else []):
        table = parts.get(name)
        if table is None:  # this process read no shard; the others fill the table
            c = (5 + shards.channels) if (name == "x" and role != "layout") else 5
            table = torch.zeros(n, 1 + 2 * c, dtype=torch.float64)
        if reduce_sum is not None:
            table = reduce_sum(table)
        c = (table.shape[1] - 1) // 2
        count, mean, m2 = 0.0, torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        for row in table:
            nb, mb, m2b = float(row[0]), row[1 : 1 + c], row[1 + c :]
            if nb == 0:
                continue
            delta = mb - mean
            total = count + nb
            mean = mean + delta * (nb / total)
            m2 = m2 + m2b + delta**2 * (count * nb / total)
            count = total
        if count < 2:
            raise DataError(f"{shards.folder}: too few token vectors for statistics ({int(count)})")
        std = (m2 / count).sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel is left unscaled (as channel_stats)
        prefix = "" if name == "x" else "cond_"
        out[prefix + "mean"], out[prefix + "std"] = tuple(mean.tolist()), tuple(std.tolist())
    return out
