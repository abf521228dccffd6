"""Sampler math for the flow-matching generators, written once for numpy and torch.

The torch library (``gpstoken.generation``) and the torch-free runtime both call these functions; the
arrays they pass decide the namespace (``ops_for``). Nothing here imports torch at module level: the torch
adapter imports it when a torch tensor first arrives.

Conventions (SiT's Linear path, as the official GPSToken generator):
  x_t = t * x1 + (1 - t) * x0, t = 0 noise, t = 1 data; a model predicts the velocity x1 - x0.
  score from velocity: s = (t v - x) / (1 - t).
  SDE (reverse-time, in SiT time): dx = (v + w(t) s) dt + sqrt(2 w(t)) dW, with
    w = (1 - t)^2 / t + (1 - t)   ("sbdm", the official choice; huge near t = 0, hence t0 >= 1e-3)
    w = 1 - t                      ("sigma").
  Official SDE grid: ``steps`` points linspace(t0, 0.96), steps - 1 Euler-Maruyama steps with one constant
  dt, then the "mean" last step x += drift(0.96) * 0.04 without noise: ``steps`` velocity calls in all.
  CFG: u + s (c - u) on every channel, only while low <= t <= high (official: s 1.5, low 0.2).

Time values reach ``velocity(x, t)`` as a 0-d array of x's dtype (a torch tensor on x's device, or a numpy
scalar), so closed-form velocities broadcast and a model can expand it to (B,). Scalars computed here are
Python floats, which never promote float32 arrays in either namespace.

Noise protocol: each Euler-Maruyama step draws one float32 standard normal array of x's shape from
``draw(shape)`` and casts it to x's dtype, before the velocity call (the official order). ``pcg64_draw``
is the seeded source of the pipeline, so a seed means the same numbers on every device and backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

Array = Any  # numpy.ndarray, torch.Tensor, or an array that names its namespace (gpstoken_ops())
Velocity = Callable[[Array, Array], Array]
Draw = Callable[[tuple], Array]
Progress = Callable[[], None]  # called once after each integration step (e.g. a progress bar's update)

ODE_METHODS = ("euler", "heun")
DIFFUSIONS = ("sbdm", "sigma")
LAST_STEPS = ("mean", "euler", "none")

# Official SDE settings (SiT's defaults with GPSToken's t0 floor).
SDE_STEPS = 250
SDE_T_START = 1e-3
SDE_T_END = 0.96
CFG_SCALE = 1.5
GUIDANCE_LOW = 0.2
GUIDANCE_HIGH = 1.0


# ----------------------------------------------------------------------------- array namespaces
class NumpyOps:
    name = "numpy"

    def __init__(self):
        import numpy as np

        self.np = np

    def concat(self, arrays: Sequence[Array]) -> Array:
        return self.np.concatenate(list(arrays), axis=0)

    def time(self, t: float, like: Array) -> Array:
        return self.np.asarray(t, dtype=like.dtype)[()]

    def from_float32(self, a: Array, like: Array) -> Array:
        a = self.np.asarray(a)
        return a.astype(like.dtype, copy=False)

    def concat_last(self, arrays: Sequence[Array]) -> Array:
        return self.np.concatenate(list(arrays), axis=-1)

    def clip(self, a: Array, low: float, high: float) -> Array:
        return self.np.clip(a, low, high)

    def full_like(self, a: Array, value) -> Array:
        return self.np.full_like(a, value)

    def rows(self, like: Array, value: float) -> Array:
        """(B,) of ``value`` in ``like``'s dtype, B = like's rows (a model's per-row time)."""
        return self.np.full((like.shape[0],), value, dtype=like.dtype)

    def constant(self, values, like: Array) -> Array:
        """A float array of ``values`` in ``like``'s namespace, dtype (and device)."""
        return self.np.asarray(values, dtype=like.dtype)


class TorchOps:
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch

    def concat(self, arrays: Sequence[Array]) -> Array:
        return self.torch.cat(list(arrays), dim=0)

    def time(self, t: float, like: Array) -> Array:
        return self.torch.tensor(t, dtype=like.dtype, device=like.device)

    def from_float32(self, a: Array, like: Array) -> Array:
        if not isinstance(a, self.torch.Tensor):
            a = self.torch.from_numpy(a)
        return a.to(device=like.device, dtype=like.dtype)

    def concat_last(self, arrays: Sequence[Array]) -> Array:
        return self.torch.cat(list(arrays), dim=-1)

    def clip(self, a: Array, low: float, high: float) -> Array:
        return a.clamp(low, high)

    def full_like(self, a: Array, value) -> Array:
        return self.torch.full_like(a, value)

    def rows(self, like: Array, value: float) -> Array:
        return self.torch.full((like.shape[0],), value, dtype=like.dtype, device=like.device)

    def constant(self, values, like: Array) -> Array:
        return self.torch.as_tensor(values, dtype=like.dtype, device=like.device)


_OPS: dict[str, Any] = {}


def ops_for(x: Array):
    """The namespace adapter of ``x``: its own (an array with a ``gpstoken_ops()`` method, e.g. the runtime's
    device arrays), TorchOps for torch tensors, NumpyOps for anything else."""
    own = getattr(x, "gpstoken_ops", None)
    if own is not None:
        return own()
    kind = "torch" if type(x).__module__.split(".")[0] == "torch" else "numpy"
    if kind not in _OPS:
        _OPS[kind] = TorchOps() if kind == "torch" else NumpyOps()
    return _OPS[kind]


# ----------------------------------------------------------------------------- checks and grids
def _check_steps(steps: int, least: int = 1) -> int:
    if isinstance(steps, bool) or int(steps) != steps or steps < least:
        raise ValueError(f"steps must be an integer >= {least}, got {steps}")
    return int(steps)


def _choice(value: str, choices: Sequence[str], what: str) -> str:
    key = str(value).lower()
    if key not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return key


def linspace(start: float, end: float, points: int) -> list[float]:
    """``points`` evenly spaced floats from start to end inclusive (float64, both ends exact)."""
    if points == 1:
        return [float(start)]
    step = (end - start) / (points - 1)
    return [float(start) + i * step for i in range(points - 1)] + [float(end)]


def ode_grid(steps: int, t_start: float = 0.0, t_end: float = 1.0) -> list[float]:
    """The ``steps + 1`` time points of a fixed-step ODE integration."""
    steps = _check_steps(steps)
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got t_start {t_start}, t_end {t_end}")
    return linspace(t_start, t_end, steps + 1)


def sde_grid(steps: int = SDE_STEPS, t_start: float = SDE_T_START, t_end: float = SDE_T_END) -> list[float]:
    """The official SDE grid: ``steps`` points linspace(t_start, t_end) (steps - 1 noisy steps + last step)."""
    steps = _check_steps(steps, least=2)
    if not 0.0 < t_start < t_end < 1.0:
        raise ValueError(f"need 0 < t_start < t_end < 1 for the SDE, got t_start {t_start}, t_end {t_end}")
    return linspace(t_start, t_end, steps)


# ----------------------------------------------------------------------------- path quantities
def diffusion_coefficient(t: float, form: str = "sbdm") -> float:
    """w(t) of the reverse SDE on the Linear path."""
    if form == "sbdm":
        # (alpha'/alpha) sigma^2 - sigma sigma' with alpha = t, sigma = 1 - t
        return (1.0 - t) ** 2 / t + (1.0 - t)
    if form == "sigma":
        return 1.0 - t
    raise ValueError(f"unknown diffusion {form!r}; choose one of {', '.join(DIFFUSIONS)}")


def score_from_velocity(v: Array, x: Array, t: float) -> Array:
    """Score of p_t from the Linear-path velocity: (t v - x) / (1 - t)."""
    return (v * t - x) / (1.0 - t)


def sde_drift(v: Array, x: Array, t: float, form: str = "sbdm") -> Array:
    """v + w(t) * score: the drift of the reverse SDE."""
    return v + score_from_velocity(v, x, t) * diffusion_coefficient(t, form)


# ----------------------------------------------------------------------------- ODE
def euler_step(velocity: Velocity, x: Array, t: float, dt: float) -> Array:
    ops = ops_for(x)
    return x + velocity(x, ops.time(t, x)) * dt


def heun_step(velocity: Velocity, x: Array, t: float, dt: float) -> Array:
    """Explicit trapezoid (Heun's second-order method): two velocity calls."""
    ops = ops_for(x)
    k1 = velocity(x, ops.time(t, x))
    k2 = velocity(x + k1 * dt, ops.time(t + dt, x))
    return x + (k1 + k2) * (0.5 * dt)


def sample_ode(
    velocity: Velocity,
    x: Array,
    steps: int,
    method: str = "euler",
    t_start: float = 0.0,
    t_end: float = 1.0,
    progress: Progress | None = None,
) -> Array:
    """Integrate dx/dt = velocity(x, t) from t_start to t_end with ``steps`` fixed steps; ``progress()``
    after each step."""
    method = _choice(method, ODE_METHODS, "ODE method")
    grid = ode_grid(steps, t_start, t_end)
    step = euler_step if method == "euler" else heun_step
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x = step(velocity, x, t0, t1 - t0)
        if progress is not None:
            progress()
    return x


# ----------------------------------------------------------------------------- SDE
def sample_sde(
    velocity: Velocity,
    x: Array,
    draw: Draw,
    steps: int = SDE_STEPS,
    t_start: float = SDE_T_START,
    t_end: float = SDE_T_END,
    diffusion: str = "sbdm",
    last_step: str = "mean",
    progress: Progress | None = None,
) -> Array:
    """Euler-Maruyama on the official grid, then the last step to t = 1 (see the module docstring).

    ``draw(shape)`` returns a float32 standard normal array (numpy or x's namespace) per step;
    ``progress()`` is called after each of the ``steps`` steps (the last one included).
    """
    diffusion = _choice(diffusion, DIFFUSIONS, "diffusion")
    last_step = _choice(last_step, LAST_STEPS, "last step")
    ops = ops_for(x)
    grid = sde_grid(steps, t_start, t_end)
    dt = grid[1] - grid[0]  # one constant dt, as SiT's sampler
    shape = tuple(x.shape)
    for t in grid[:-1]:
        eps = ops.from_float32(draw(shape), x)
        v = velocity(x, ops.time(t, x))
        w = diffusion_coefficient(t, diffusion)
        mean = x + sde_drift(v, x, t, diffusion) * dt
        x = mean + eps * (math.sqrt(2.0 * w) * math.sqrt(dt))
        if progress is not None:
            progress()
    t = grid[-1]
    h = 1.0 - t
    if last_step == "mean":
        x = x + sde_drift(velocity(x, ops.time(t, x)), x, t, diffusion) * h
    elif last_step == "euler":
        x = x + velocity(x, ops.time(t, x)) * h
    if progress is not None:
        progress()
    return x


# ----------------------------------------------------------------------------- classifier-free guidance
def guidance_active(t: float, low: float = 0.0, high: float = 1.0) -> bool:
    """The official interval rule: guidance applies while low <= t <= high (both inclusive)."""
    return low <= float(t) <= high


def cfg_combine(cond: Array, uncond: Array, scale: float) -> Array:
    """u + scale (c - u); scale 1 returns the conditional velocity itself (bit-exact)."""
    if scale == 1.0:
        return cond
    return uncond + (cond - uncond) * scale


def cfg_velocity(
    forward: Callable[[Array], Array], x: Array, t: float, scale: float, low: float = 0.0, high: float = 1.0
) -> Array:
    """Guided velocity of a doubled state x = [conditional rows; unconditional rows] (2B rows).

    ``forward(rows)`` evaluates the model on 2B rows whose labels are [y; null] (and whose layout
    condition is the same for both halves). Inside the guidance interval the conditional half x[:B] is run
    with both labels and the guided velocity is returned for both halves; outside, every row gets its own
    plain velocity. ``t`` is the time of the first row.
    """
    if x.shape[0] % 2:
        raise ValueError(f"CFG needs an even number of rows (conditional then unconditional), got {x.shape[0]}")
    if not guidance_active(t, low, high):
        return forward(x)
    ops = ops_for(x)
    b = x.shape[0] // 2
    half = x[:b]
    out = forward(ops.concat([half, half]))
    guided = cfg_combine(out[:b], out[b:], scale)
    return ops.concat([guided, guided])


def check_guidance(scale: float, low: float, high: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {scale}")
    if not (0.0 <= low <= high <= 1.0):
        raise ValueError(f"guidance interval must satisfy 0 <= low <= high <= 1 (t units), got ({low}, {high})")


# ----------------------------------------------------------------------------- seeded noise
def pcg64(seed: int):
    """numpy's PCG64 generator for ``seed``: the pipeline's one source of seeded noise."""
    import numpy as np

    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed}")
    return np.random.Generator(np.random.PCG64(int(seed)))


def normal_float32(rng, shape: tuple) -> Array:
    """A float32 standard normal numpy array from a numpy Generator (the protocol's one draw)."""
    import numpy as np

    return rng.standard_normal(tuple(shape), dtype=np.float32)


def pcg64_draw(rng, rows: int | None = None) -> Draw:
    """``draw(shape)`` from a numpy Generator. With ``rows`` set, every draw is made for ``rows`` rows and
    cut to the requested ones, so the first rows get the same numbers whatever the batch doubling (with or
    without CFG)."""

    def draw(shape: tuple) -> Array:
        if rows is None or rows == shape[0]:
            return normal_float32(rng, shape)
        if rows < shape[0]:
            raise ValueError(f"noise protocol drawn for {rows} rows, asked for {shape[0]}")
        return normal_float32(rng, (rows, *shape[1:]))[: shape[0]]

    return draw


def pcg64_predrawn(rng, rows: int, draws: int, move: Callable[[Array], Array] = lambda a: a) -> Draw:
    """``pcg64_draw(rng, rows)`` for exactly ``draws`` calls, drawn as one block at the first call and moved
    once by ``move`` (e.g. to a GPU), so a sampler on a device does not copy noise from the host per step.
    The numbers are the same: the generator fills an array in order, as successive calls would."""
    state = {"block": None, "k": 0}

    def draw(shape: tuple) -> Array:
        if rows < shape[0]:
            raise ValueError(f"noise protocol drawn for {rows} rows, asked for {shape[0]}")
        if state["block"] is None:
            state["block"] = move(normal_float32(rng, (draws, rows, *shape[1:])))
        k = state["k"]
        if k >= draws:
            raise ValueError(f"noise block of {draws} draws is used up")
        state["k"] = k + 1
        return state["block"][k : k + 1].reshape((rows, *shape[1:]))[: shape[0]]

    return draw
