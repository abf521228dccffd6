"""The official generator files: ``generator.safetensors`` -> a SiT folder, ``initg.pickle`` -> a layout bank.

The official loader keeps the ``ema_model.*`` tensors of an EMA wrapper (ignoring ``online_model.*``,
``step``, ``initted``), strips the prefix and loads strictly; so do we. The architecture is read from the
shapes (width, depth, channels, tokens, classes, learn_sigma, layout condition); the head count is not in
the shapes and comes from SiT's size table. Official names equal ours except the 1x1-conv token embedder,
which becomes a Linear.

``initg.pickle`` is a pickle: it is read by ``restricted_pickle_load``, which builds numpy arrays and plain
containers only and refuses every other global (a pickle that would run code is an error, nothing runs).
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from gpstoken_core.files import atomic_folder

from ..checkpoint import CheckpointError, load_tensors
from .config import HEADS_BY_HIDDEN, OFFICIAL_MEANS, OFFICIAL_STDS, SiTConfig
from .layouts import LayoutBank
from .models import SiT

EMA_PREFIX = "ema_model."
WRAPPER_KEYS = re.compile(r"^(online_model\..*|step|initted)$")


# ----------------------------------------------------------------------------- generator weights
def _official_tensors(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    ema = {k[len(EMA_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    if ema:
        return ema
    bare = {k: v for k, v in tensors.items() if not WRAPPER_KEYS.match(k)}
    if "x_embedder.proj.weight" not in bare:
        raise CheckpointError(f"{source}: not an official SiT generator (no ema_model.* tensors, no x_embedder.proj.weight)")
    return bare


def read_official_stats(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(means, stds) from an official gpstoken_generator.yaml (pretrained_gpstoken_means / _stds)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such config file")
    text = path.read_text()
    try:
        import yaml

        data = yaml.safe_load(text) or {}
    except ImportError:  # the two keys are flat lists; no YAML library needed for them
        data = {}
        for key in ("pretrained_gpstoken_means", "pretrained_gpstoken_stds"):
            m = re.search(rf"^{key}\s*:\s*\[([^\]]*)\]", text, re.M)
            if m:
                data[key] = [float(v) for v in m[1].split(",") if v.strip()]
    except Exception as err:
        raise CheckpointError(f"{path}: not readable YAML ({err})") from None
    try:
        means = tuple(float(v) for v in data["pretrained_gpstoken_means"])
        stds = tuple(float(v) for v in data["pretrained_gpstoken_stds"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: no numeric pretrained_gpstoken_means / pretrained_gpstoken_stds lists") from None
    return means, stds


def infer_official_config(
    tensors: dict[str, torch.Tensor], source: str = "checkpoint", stats=None, heads: int | None = None
) -> SiTConfig:
    """The SiTConfig that official (prefix-stripped) tensors describe; CheckpointError when they are not a
    token SiT (patch size 1)."""

    def shape(key):
        if key not in tensors:
            raise CheckpointError(f"{source}: missing {key}; not an official SiT generator")
        return tuple(tensors[key].shape)

    emb = shape("x_embedder.proj.weight")
    if len(emb) != 4:
        raise CheckpointError(f"{source}: x_embedder.proj.weight has shape {emb}, expected a (D, C, 1, 1) conv")
    hidden, channels, ph, pw = emb
    if (ph, pw) != (1, 1):
        raise CheckpointError(
            f"{source}: patch size {ph}x{pw}: only the token models (SiT-*-gs, patch size 1) convert, "
            "this looks like an image-latent SiT"
        )
    if heads is None:
        if hidden not in HEADS_BY_HIDDEN:
            raise CheckpointError(f"{source}: width {hidden} is not in SiT's size table ({sorted(HEADS_BY_HIDDEN)}); give heads=")
        heads = HEADS_BY_HIDDEN[hidden]
    blocks = {int(m[1]) for k in tensors if (m := re.match(r"^blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    if blocks != set(range(depth)) or depth == 0:
        raise CheckpointError(f"{source}: transformer blocks are missing or not numbered 0..N-1 (found {sorted(blocks)[:8]})")
    out = shape("final_layer.linear.weight")[0]
    if out not in (channels, 2 * channels):
        raise CheckpointError(f"{source}: final_layer.linear has {out} outputs for {channels} input channels")
    pos = shape("pos_embed")
    table = shape("y_embedder.embedding_table.weight")
    mlp = shape("blocks.0.mlp.fc1.weight")[0]
    freq = shape("t_embedder.mlp.0.weight")[1]
    cond = tuple(tensors["cond_embedder.0.weight"].shape)[1] if "cond_embedder.0.weight" in tensors else 0
    role = "texture" if cond else ("layout" if channels == 5 else "onestage")
    if stats is None and role == "texture" and channels == len(OFFICIAL_MEANS):
        stats = (OFFICIAL_MEANS, OFFICIAL_STDS)
    if stats is not None and len(stats[0]) != channels:
        raise CheckpointError(f"{source}: the statistics have {len(stats[0])} channels, the model has {channels}")
    known = {(28, 1152): "SiT-XL/2-gs", (12, 384): "SiT-S/2-gs"}
    try:
        return SiTConfig(
            name=known.get((depth, hidden), f"official SiT depth {depth} width {hidden}"),
            role=role,
            num_tokens=pos[1],
            in_channels=channels,
            hidden=hidden,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp / hidden,
            num_classes=table[0] - 1,  # the last row is the null class
            cond_channels=cond,
            cond_mode="input",  # the official forward adds the layout once, in place of pos_embed
            learn_sigma=out == 2 * channels,
            frequency_dim=freq,
            mean=None if stats is None else stats[0],
            std=None if stats is None else stats[1],
        )
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None


def convert_official_generator_state_dict(
    tensors: dict[str, torch.Tensor], source: str = "checkpoint", stats=None, heads: int | None = None
) -> SiT:
    """A SiT holding the official weights (strict: every tensor used, every shape checked)."""
    official = _official_tensors(tensors, source)
    config = infer_official_config(official, source, stats, heads)
    ours = {}
    for key, value in official.items():
        if key.startswith("x_embedder.proj."):
            key = "x_embedder." + key.removeprefix("x_embedder.proj.")
            value = value.reshape(value.shape[0], -1) if value.ndim == 4 else value
        ours[key] = value.float() if value.is_floating_point() else value
    model = SiT(config)
    model.load_weights(ours, source=f"{source} (official)")  # strict: lists missing / unexpected / mis-shaped
    return model.eval()


def convert_official_generator(
    checkpoint: str | Path, out: str | Path, config: str | Path | None = None, heads: int | None = None
) -> Path:
    """``generator.safetensors`` (+ optional gpstoken_generator.yaml for the statistics) -> SiT folder ``out``,
    loadable with ``SiT.from_pretrained(out)``. ``out`` must not exist or be empty; it appears complete or
    not at all."""
    path = Path(checkpoint)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors generator files are read (pickle files are never loaded)")
    stats = read_official_stats(config) if config is not None else None
    tensors, _ = load_tensors(path)
    model = convert_official_generator_state_dict(tensors, str(path), stats, heads)
    try:
        with atomic_folder(out) as tmp:
            model.save_pretrained(tmp)
    except FileExistsError as err:
        raise CheckpointError(str(err)) from None
    return Path(out)


def convert_official_generator_folder(
    checkpoint: str | Path,
    out: str | Path,
    tokenizer: str | Path,
    layouts: str | Path | None = None,
    config: str | Path | None = None,
    heads: int | None = None,
):
    """``generator.safetensors`` + a gpstoken tokenizer folder (+ the converted layout bank) -> a whole
    generator folder ``out`` (tokenizer/, texture/, layout_bank.safetensors) for ``GPSGenerator`` and
    ``gpstoken generate --model``. Every part is read and checked against the others (token count, feature
    channels, classes) before ``out`` is written; it appears complete or not at all."""
    from ..tokenizer import GPSTokenizer
    from .pipeline import GPSGenerator

    path = Path(checkpoint)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors generator files are read (pickle files are never loaded)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new folder")
    stats = read_official_stats(config) if config is not None else None
    tensors, _ = load_tensors(path)
    texture = convert_official_generator_state_dict(tensors, str(path), stats, heads)
    tok = GPSTokenizer.from_pretrained(tokenizer)
    bank = None
    if layouts is not None:
        if Path(layouts).suffix != ".safetensors":
            raise CheckpointError(f"{layouts}: give the layout bank from `gpstoken convert-official-layouts` (.safetensors)")
        bank = LayoutBank.load(layouts)
        if bank.num_classes != texture.config.num_classes:
            raise CheckpointError(
                f"{layouts}: a bank for {bank.num_classes} classes, the generator has {texture.config.num_classes}"
            )
    try:
        gen = GPSGenerator(texture, tok, layout_bank=bank)
    except ValueError as err:
        raise CheckpointError(f"{path} with {tokenizer}: {err}") from None
    try:
        gen.save_pretrained(out)
    except FileExistsError as err:
        raise CheckpointError(str(err)) from None
    return gen


# ----------------------------------------------------------------------------- restricted pickle
_ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol 2 stores array bytes as latin-1 text; encode only turns str into bytes
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: only numpy arrays and plain containers are allowed "
                "(the file may try to run code)"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id: only numpy arrays and plain containers are allowed")


def restricted_pickle_load(source: str | Path | bytes):
    """Unpickle a file (or bytes) that may hold only numpy arrays, numbers, strings and plain containers.

    Any other global (a function call, a class) is refused with a CheckpointError before it is created;
    object arrays are refused too.
    """
    name = "pickle data" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        data = path.read_bytes()
    try:
        obj = _ArraysOnlyUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{name}: {err}") from None
    except Exception as err:  # truncated or corrupt streams raise many kinds of errors
        raise CheckpointError(f"{name}: not a readable pickle ({type(err).__name__}: {err})") from None
    _refuse_objects(obj, name)
    return obj


def _refuse_objects(obj, name: str) -> None:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray) and item.dtype.hasobject:
            raise CheckpointError(f"{name}: holds an object array; only numeric arrays are allowed")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)


def convert_official_layout_bank(pickle_path: str | Path, out: str | Path, num_classes: int = 1000) -> LayoutBank:
    """The official ``initg.pickle`` (class id -> list of (L, >=5) arrays, raw [sigma_x, sigma_y, rho, mu_x,
    mu_y] first) -> a layout bank safetensors file ``out``."""
    obj = restricted_pickle_load(pickle_path)
    if isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    elif isinstance(obj, dict):
        items = list(obj.items())
    else:
        raise CheckpointError(f"{pickle_path}: expected a dict or list indexed by class id, got {type(obj).__name__}")
    layouts = {}
    for key, entry in items:
        try:
            c = int(key)
        except (TypeError, ValueError):
            raise CheckpointError(f"{pickle_path}: class key {key!r} is not an integer") from None
        arrays = [entry] if isinstance(entry, np.ndarray) and entry.ndim == 2 else list(entry)
        if not arrays:
            continue
        try:
            stacked = np.stack([np.asarray(a, dtype=np.float32) for a in arrays])
        except ValueError as err:
            raise CheckpointError(f"{pickle_path}: class {c}: layouts of different shapes ({err})") from None
        if stacked.ndim != 3 or stacked.shape[-1] < 5:
            raise CheckpointError(f"{pickle_path}: class {c}: expected arrays (L, >=5), got {stacked.shape[1:]}")
        layouts[c] = torch.from_numpy(np.ascontiguousarray(stacked[..., :5]))
    try:
        bank = LayoutBank(layouts, num_classes)
    except ValueError as err:
        raise CheckpointError(f"{pickle_path}: {err}") from None
    bank.save(out)
    return bank
