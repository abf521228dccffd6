"""Layouts between the two stages: checks, batched calibration (Alg. 2), the official post-processing, and
a bank of g_init layouts per class (the official ``initg.pickle``, converted to safetensors).

A layout is g_init (B, L, 5) = (sigma_x, sigma_y, rho, mu_x, mu_y) in the official normalized convention
of one 256x256 tile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gpstoken_core.official import MIN_REGION
from gpstoken_core.partition import calibrate
from gpstoken_core.tiling import TILE

from ..checkpoint import CheckpointError, load_tensors, save_tensors

BANK_FORMAT = "gpstoken-layout-bank"


def check_layout(g_init, num_tokens: int | None = None, name: str = "layout") -> torch.Tensor:
    """g_init as a float32 (B, L, 5) tensor; one-line ValueError for a wrong shape, NaN/Inf, sigma <= 0 or
    |rho| >= 1. A single (L, 5) layout gets a batch axis."""
    g = torch.as_tensor(np.asarray(g_init) if not isinstance(g_init, torch.Tensor) else g_init).float()
    if g.ndim == 2:
        g = g[None]
    if g.ndim != 3 or g.shape[-1] != 5:
        raise ValueError(f"{name} must be (B, L, 5) or (L, 5) Gaussians, got shape {tuple(g.shape)}")
    if num_tokens is not None and g.shape[1] != num_tokens:
        raise ValueError(f"{name} has {g.shape[1]} tokens, the generator makes {num_tokens}")
    if not torch.isfinite(g).all():
        raise ValueError(f"{name} contains NaN or Inf")
    if (g[..., :2] <= 0).any():
        raise ValueError(f"{name} has sigma <= 0")
    if (g[..., 2].abs() >= 1).any():
        raise ValueError(f"{name} has |rho| >= 1")
    return g


def calibrate_layouts(g_pred: torch.Tensor, size: tuple[int, int] = (TILE, TILE), s_min: int = MIN_REGION) -> torch.Tensor:
    """Alg. 2 (the C++ ``calibrate``) on each layout of a batch (B, L, 5): means snapped to the s_min grid,
    regions re-partitioned by mean counts, Gaussians re-derived (official sigma = width / 3, rho 0)."""
    g = g_pred.detach().double().cpu().numpy()
    if g.ndim != 3 or g.shape[-1] != 5:
        raise ValueError(f"predicted layouts must be (B, L, 5), got shape {g.shape}")
    if not np.isfinite(g[..., 3:]).all():
        raise ValueError("predicted layout has NaN or Inf means; the layout model diverged")
    out = np.stack([calibrate(layout, size, s_min)[0] for layout in g])
    return torch.from_numpy(out).to(device=g_pred.device, dtype=torch.float32)


class LayoutBank:
    """g_init layouts per class id: ``layouts[c]`` is (N_c, L, 5) float32. Saved as safetensors with one
    tensor ``class_<c>`` per class that has layouts."""

    def __init__(self, layouts: dict[int, torch.Tensor], num_classes: int):
        if not layouts:
            raise ValueError("a layout bank needs at least one class with layouts")
        self.num_classes = int(num_classes)
        self.layouts: dict[int, torch.Tensor] = {}
        tokens = None
        for c, g in sorted(layouts.items()):
            if not 0 <= int(c) < self.num_classes:
                raise ValueError(f"layout bank class {c} is outside [0, {self.num_classes})")
            g = check_layout(g, tokens, name=f"layout bank class {c}")
            tokens = g.shape[1]
            self.layouts[int(c)] = g
        self.num_tokens = tokens

    def __len__(self) -> int:
        return sum(len(g) for g in self.layouts.values())

    def sample(self, labels, rng: np.random.Generator) -> torch.Tensor:
        """(B, L, 5): one stored layout per label, picked uniformly with ``rng`` (with replacement)."""
        out = []
        for y in np.asarray(labels).tolist():
            if y not in self.layouts:
                raise ValueError(f"the layout bank has no layouts for class {y}")
            g = self.layouts[y]
            out.append(g[int(rng.integers(len(g)))])
        return torch.stack(out)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {f"class_{c}": g for c, g in self.layouts.items()}
        meta = {"format": BANK_FORMAT, "num_classes": str(self.num_classes), "num_tokens": str(self.num_tokens)}
        save_tensors(path, tensors, metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LayoutBank:
        tensors, meta = load_tensors(path)
        if meta.get("format") != BANK_FORMAT:
            raise CheckpointError(f"{path}: not a gpstoken layout bank (format {meta.get('format')!r})")
        try:
            layouts = {int(k.removeprefix("class_")): v for k, v in tensors.items()}
            return cls(layouts, int(meta["num_classes"]))
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: bad layout bank ({err})") from None
