"""The stages of a two-stage generation without the networks, shared by ``gpstoken.generation.GPSGenerator``
(torch) and ``gpstoken_runtime.Generator`` (numpy + ONNX Runtime / TensorRT).

Both callers hand in the velocity networks as callables; everything between them lives here once:
option checks, the seeded noise protocol, the CFG row doubling, the layout / texture sampling loops (through
``gpstoken_core.sampling``), de-normalization with stored statistics, calibration (Alg. 2, C++) and the
official post-processing. Arrays are numpy or torch (``sampling.ops_for``); noise always comes from numpy's
PCG64, so a seed gives the same numbers on both.

Seeded noise protocol, from ``sampling.pcg64(seed)``:
  1. layout: float32 normal (B, L, 5) as the layout ODE's start, or the layout bank's picks (rng.integers);
  2. texture start: float32 normal (B, L, C), duplicated for the unconditional rows;
  3. each SDE step: float32 normal (2B, L, C), rows [:B] for the conditional state (all 2B with CFG).
So a seed gives the same conditional noise with and without CFG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from . import sampling
from .sampling import Array, Progress

SAMPLERS = ("sde", "euler", "heun")
LAYOUT_SAMPLERS = sampling.ODE_METHODS
SIGMA_RANGE = (1e-5, 0.99999)  # official post-processing clamps
RHO_LIMIT = 0.99999
LAYOUT_CHANNELS = 5  # a Gaussian (sigma_x, sigma_y, rho, mu_x, mu_y)

# The sampler settings a generator uses when a call does not give them: the official ones, unless the
# generator folder's sampler.json (or an export's manifest, generator.sampler_defaults) says otherwise.
SAMPLER_FILE = "sampler.json"
OFFICIAL_SAMPLER_DEFAULTS = {
    "sampler": "sde", "texture_steps": sampling.SDE_STEPS, "layout_steps": 5, "layout_sampler": "heun",
    "cfg_scale": sampling.CFG_SCALE, "guidance": [sampling.GUIDANCE_LOW, sampling.GUIDANCE_HIGH], "layout_cfg_scale": 1.0,
}  # fmt: skip

# network(x (B, L, C), t (B,), y (B,) int64, cond (B, L, 5) or None) -> velocity (B, L, C)
Network = Callable[[Array, Array, Array, "Array | None"], Array]


# ----------------------------------------------------------------------------- checks
def check_labels(labels, num_classes: int) -> np.ndarray:
    """(B,) int64 class ids, each in [0, num_classes); one-line ValueError otherwise."""
    y = np.atleast_1d(np.asarray(labels))
    if y.ndim != 1 or len(y) == 0 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty list of integer class ids, got {labels!r}")
    bad = [int(v) for v in y if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"unknown class id(s) {bad}: the generator knows classes 0..{num_classes - 1}")
    return y.astype(np.int64)


def check_steps(name: str, steps, least: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {steps!r}")


def check_options(sampler: str, cfg_scale: float, guidance: Sequence[float], layout_cfg_scale: float,
                  layout_steps: int, texture_steps: int, layout_sampler: str | None = None) -> None:
    """The checks of one generation call, before any noise is drawn."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if layout_sampler is not None and layout_sampler not in LAYOUT_SAMPLERS:
        raise ValueError(f"unknown layout sampler {layout_sampler!r}; choose euler or heun")
    sampling.check_guidance(cfg_scale, *guidance)
    sampling.check_guidance(layout_cfg_scale, 0.0, 1.0)
    check_steps("layout_steps", layout_steps, 1)
    check_steps("texture_steps", texture_steps, 2 if sampler == "sde" else 1)


def sampler_defaults(given: dict | None = None, where: str = "sampler defaults") -> dict:
    """The official sampler settings updated with ``given`` (a generator's own), checked; a ValueError names
    ``where`` and the bad key."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(OFFICIAL_SAMPLER_DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(OFFICIAL_SAMPLER_DEFAULTS)}")
    out = {**OFFICIAL_SAMPLER_DEFAULTS, **given}
    out["guidance"] = [float(v) for v in out["guidance"]]
    try:
        check_options(out["sampler"], out["cfg_scale"], out["guidance"], out["layout_cfg_scale"], out["layout_steps"],
                      out["texture_steps"], out["layout_sampler"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None
    return out


def resolve_options(defaults: dict, **given) -> dict:
    """A call's sampler options: each one given (not None) wins over the generator's ``defaults``."""
    return {k: (defaults[k] if given.get(k) is None else given[k]) for k in OFFICIAL_SAMPLER_DEFAULTS}


# ----------------------------------------------------------------------------- noise and guidance
def start_noise(rng, rows: int, tokens: int, channels: int, like: Array) -> Array:
    """One float32 standard normal (rows, tokens, channels) from ``rng`` in ``like``'s namespace/device."""
    return sampling.ops_for(like).from_float32(sampling.normal_float32(rng, (rows, tokens, channels)), like)


def pick_layouts(layouts: dict, labels: Sequence[int], rng) -> list:
    """One stored layout per label from a bank {class: (N_c, L, 5)}, uniform with replacement (protocol 1)."""
    out = []
    for y in [int(v) for v in labels]:
        if y not in layouts:
            raise ValueError(f"the layout bank has no layouts for class {y}")
        g = layouts[y]
        out.append(g[int(rng.integers(len(g)))])
    return out


def guided_velocity(network: Network, y: Array, cond: Array | None, cfg_scale: float = 1.0,
                    guidance: Sequence[float] = (0.0, 1.0), null_class: int | None = None):
    """velocity(x, t) of ``network`` for labels y (B,), with the time broadcast to (B,) rows.

    With cfg_scale != 1 the state has 2B rows [conditional; unconditional]: labels [y; null], layout
    [cond; cond], combined by ``sampling.cfg_velocity`` (the batch is doubled here, not in the graph)."""
    sampling.check_guidance(cfg_scale, *guidance)
    ops = sampling.ops_for(y)

    def rows_time(x: Array, t: Array) -> Array:
        return sampling.ops_for(x).rows(x, float(t))

    if cfg_scale == 1.0:
        return lambda x, t: network(x, rows_time(x, t), y, cond)
    if null_class is None:
        raise ValueError("classifier-free guidance needs the null class id")
    y2 = ops.concat([y, ops.full_like(y, null_class)])
    cond2 = None if cond is None else sampling.ops_for(cond).concat([cond, cond])

    def velocity(x: Array, t: Array) -> Array:
        return sampling.cfg_velocity(lambda rows: network(rows, rows_time(rows, t), y2, cond2), x, float(t),
                                     float(cfg_scale), guidance[0], guidance[1])

    return velocity


def _doubled(z: Array, cfg_scale: float) -> Array:
    return sampling.ops_for(z).concat([z, z]) if cfg_scale != 1.0 else z


# ----------------------------------------------------------------------------- stages
def sample_layout(velocity, z: Array, steps: int, sampler: str = "heun", cfg_scale: float = 1.0,
                  progress: Progress | None = None) -> Array:
    """The layout ODE from noise z (B, L, 5) (model space); returns the conditional rows (B, L, 5)."""
    b = z.shape[0]
    x = sampling.sample_ode(velocity, _doubled(z, cfg_scale), steps, method=sampler, progress=progress)
    return x[:b]


def sample_texture(velocity, z: Array, rng, steps: int, sampler: str = "sde", cfg_scale: float = 1.0,
                   progress: Progress | None = None, move_noise: Callable[[Array], Array] | None = None) -> Array:
    """The texture (or one-stage) sampler from noise z (B, L, C); the SDE draws its per-step noise from
    ``rng`` for 2B rows (protocol 3). Returns the conditional rows (B, L, C) in model space.

    ``move_noise``: draw the SDE's noise for all steps at once and move it with this function (a device
    upload) instead of step by step; the numbers are the same."""
    b = z.shape[0]
    x = _doubled(z, cfg_scale)
    if sampler == "sde":
        if move_noise is None:
            draw = sampling.pcg64_draw(rng, rows=2 * b)
        else:
            draw = sampling.pcg64_predrawn(rng, 2 * b, steps - 1, move_noise)
        x = sampling.sample_sde(velocity, x, draw, steps=steps, progress=progress)
    else:
        x = sampling.sample_ode(velocity, x, steps, method=sampler, progress=progress)
    return x[:b]


def denormalize(x: Array, mean: Sequence[float] | None, std: Sequence[float] | None) -> Array:
    """Token space from model space: x * std + mean per channel (None: 1 / 0, as SiT's buffers)."""
    ops = sampling.ops_for(x)
    c = x.shape[-1]
    std = ops.constant([1.0] * c if std is None else list(std), x)
    mean = ops.constant([0.0] * c if mean is None else list(mean), x)
    return x * std + mean


def clamp_gaussians(g: Array) -> Array:
    """The official post-processing: sigma to [1e-5, 0.99999], rho to [-0.99999, 0.99999]; means as they are."""
    ops = sampling.ops_for(g)
    return ops.concat_last([ops.clip(g[..., :2], *SIGMA_RANGE), ops.clip(g[..., 2:3], -RHO_LIMIT, RHO_LIMIT), g[..., 3:]])


def split_tokens(out: Array, cond: Array | None) -> tuple[Array, Array]:
    """(g, f) from the texture output (B, L, 5 + C) in token space: g = g_init_cal + dg (two-stage, cond
    given) or g itself (one-stage), clamped; f the features."""
    g = out[..., :LAYOUT_CHANNELS]
    if cond is not None:
        g = g + cond
    return clamp_gaussians(g), out[..., LAYOUT_CHANNELS:]


def calibrate_batch(g_pred: np.ndarray, tile: int, s_min: int) -> np.ndarray:
    """Alg. 2 (the C++ ``gpstoken_core.partition.calibrate``) on each layout of a (B, L, 5) batch."""
    from .partition import calibrate  # the C++ module loads only when a layout is calibrated

    g = np.asarray(g_pred, dtype=np.float64)
    if g.ndim != 3 or g.shape[-1] != LAYOUT_CHANNELS:
        raise ValueError(f"predicted layouts must be (B, L, 5), got shape {g.shape}")
    if not np.isfinite(g[..., 3:]).all():
        raise ValueError("predicted layout has NaN or Inf means; the layout model diverged")
    return np.stack([calibrate(layout, (tile, tile), s_min)[0] for layout in g]).astype(np.float32)


# ----------------------------------------------------------------------------- safetensors without torch
_SAFETENSORS_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file with numpy only (the runtime has no safetensors package).
    Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, data."""
    import json
    from pathlib import Path

    raw = Path(path).read_bytes()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError:
        raise ValueError(f"{path}: not a safetensors file (bad header)") from None
    meta = header.pop("__metadata__", {}) or {}
    data = memoryview(raw)[8 + n :]
    tensors = {}
    for name, info in header.items():
        kind = _SAFETENSORS_TYPES.get(info.get("dtype"))
        if kind is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, not one of {sorted(_SAFETENSORS_TYPES)}")
        lo, hi = info["data_offsets"]
        shape = tuple(info["shape"])
        if hi > len(data) or hi - lo != int(np.prod(shape)) * np.dtype(kind).itemsize:
            raise ValueError(f"{path}: tensor {name!r} runs past the file or has the wrong size (damaged file)")
        tensors[name] = np.frombuffer(data[lo:hi], dtype=kind).reshape(shape).copy()
    return tensors, meta
