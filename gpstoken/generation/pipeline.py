"""``GPSGenerator``: layout SiT -> Alg. 2 calibration -> texture SiT -> tokenizer decoder.

Folder layout (``save_pretrained`` / ``from_pretrained``):
  tokenizer/                 a GPSTokenizer folder
  texture/                   a SiT folder, role "texture" (two-stage) or "onestage"
  layout/                    optional SiT folder, role "layout"
  layout_bank.safetensors    optional g_init bank per class (e.g. the converted official initg.pickle)

Seeded noise (one protocol, the same on CPU, GPU and the torch-free runtime), from numpy's PCG64(seed):
  1. layout: float32 normal (B, L, 5) as the layout ODE's start, or the bank's picks (rng.integers);
  2. texture start: float32 normal (B, L, C), duplicated for the unconditional rows;
  3. each SDE step: float32 normal (2B, L, C), rows [:B] for the conditional state (all 2B with CFG).
So a seed gives the same conditional noise with and without CFG. The official code draws its initial
noise from a device generator, so its images depend on the device.

The torch-free sequencing (checks, noise protocol, CFG doubling, sampling loops, de-normalization,
post-processing) is ``gpstoken_core.generation``, which ``gpstoken_runtime.Generator`` runs as well; this
module adds the torch networks, the layout bank and the decoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpstoken_core import generation as stages
from gpstoken_core import sampling as core
from gpstoken_core.files import JSONFileError, atomic_folder, read_json

from ..checkpoint import CheckpointError
from ..tokenizer import GPSTokenizer, to_uint8
from ..tokens import Tokens
from .layouts import LayoutBank, calibrate_layouts, check_layout
from .models import SiT
from .samplers import model_velocity

SAMPLERS = stages.SAMPLERS
BANK_FILE = "layout_bank.safetensors"


class GPSGenerator:
    """Class-conditional image generation with GPSToken (two-stage, or the one-stage baseline).

    Layout sources, in this order: a ``g_init`` given to ``sample`` (edited, or a real image's
    partition: structure-controlled generation), the layout model, the layout bank.
    """

    def __init__(
        self,
        texture: SiT,
        tokenizer: GPSTokenizer,
        layout: SiT | None = None,
        layout_bank: LayoutBank | None = None,
        s_min: int | None = None,
        sampler_defaults: dict | None = None,
    ):
        """``sampler_defaults``: the sampler settings of calls that do not give them (keys of
        ``gpstoken_core.generation.OFFICIAL_SAMPLER_DEFAULTS``; the rest stay official). Saved as the
        folder's sampler.json and carried into exports."""
        tc, kc = texture.config, tokenizer.config
        problems = []
        if tc.role not in ("texture", "onestage"):
            problems.append(f"the texture model has role {tc.role!r}, expected 'texture' or 'onestage'")
        if tc.num_tokens != kc.tokens_per_tile:
            problems.append(f"the texture model makes {tc.num_tokens} tokens, the {kc.name} tokenizer decodes {kc.tokens_per_tile}")
        if tc.feature_channels != kc.feature_channels:
            problems.append(
                f"the texture model makes {tc.feature_channels} feature channels, the {kc.name} tokenizer expects {kc.feature_channels}"
            )
        if layout is not None:
            lc = layout.config
            if lc.role != "layout":
                problems.append(f"the layout model has role {lc.role!r}, expected 'layout'")
            if lc.num_tokens != tc.num_tokens or lc.num_classes != tc.num_classes:
                problems.append(
                    f"layout model ({lc.num_tokens} tokens, {lc.num_classes} classes) does not fit the texture model "
                    f"({tc.num_tokens} tokens, {tc.num_classes} classes)"
                )
        if layout_bank is not None and layout_bank.num_tokens != tc.num_tokens:
            problems.append(f"the layout bank holds {layout_bank.num_tokens}-token layouts, the texture model makes {tc.num_tokens}")
        if tc.role == "onestage" and (layout is not None or layout_bank is not None):
            problems.append("a one-stage model takes no layout model or layout bank")
        if problems:
            raise ValueError("generator parts do not fit: " + "; ".join(problems))
        self.texture = texture.eval()
        self.tokenizer = tokenizer.eval()
        self.layout = None if layout is None else layout.eval()
        self.layout_bank = layout_bank
        self.s_min = int(s_min if s_min is not None else kc.min_region)  # Alg. 2 as the tokenizer's Alg. 1
        self.sampler_defaults = stages.sampler_defaults(sampler_defaults)

    @property
    def two_stage(self) -> bool:
        return self.texture.config.role == "texture"

    @property
    def device(self) -> torch.device:
        return self.texture.pos_embed.device

    @property
    def num_classes(self) -> int:
        return self.texture.config.num_classes

    # ----------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> GPSGenerator:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such generator folder")
        for part in ("tokenizer", "texture"):
            if not (folder / part).is_dir():
                raise CheckpointError(f"{folder}: no {part}/ folder (a generator folder holds tokenizer/, texture/, optional layout/)")
        layout = SiT.from_pretrained(folder / "layout", device) if (folder / "layout").is_dir() else None
        bank = LayoutBank.load(folder / BANK_FILE) if (folder / BANK_FILE).exists() else None
        defaults = None
        if (folder / stages.SAMPLER_FILE).exists():
            try:
                defaults = read_json(folder / stages.SAMPLER_FILE)
            except JSONFileError as err:
                raise CheckpointError(str(err)) from None
            if not isinstance(defaults, dict):
                raise CheckpointError(f"{folder / stages.SAMPLER_FILE}: expected a JSON object of sampler settings")
            try:
                defaults = stages.sampler_defaults(defaults, where=str(folder / stages.SAMPLER_FILE))
            except ValueError as err:
                raise CheckpointError(str(err)) from None
        try:
            return cls(
                SiT.from_pretrained(folder / "texture", device),
                GPSTokenizer.from_pretrained(folder / "tokenizer", device),
                layout,
                bank,
                sampler_defaults=defaults,
            )
        except ValueError as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"{folder}: {err}") from None

    def save_pretrained(self, folder: str | Path, replace: bool = False) -> Path:
        """Write the generator folder; it appears complete or not at all."""
        with atomic_folder(folder, replace=replace) as tmp:
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            self.texture.save_pretrained(tmp / "texture")
            if self.layout is not None:
                self.layout.save_pretrained(tmp / "layout")
            if self.layout_bank is not None:
                self.layout_bank.save(tmp / BANK_FILE)
            if self.sampler_defaults != stages.sampler_defaults():
                (tmp / stages.SAMPLER_FILE).write_text(json.dumps(self.sampler_defaults, indent=1) + "\n")
        return Path(folder)

    def to(self, device) -> GPSGenerator:
        for m in (self.texture, self.tokenizer, self.layout):
            if m is not None:
                m.to(device)
        return self

    # ----------------------------------------------------------------- sampling
    def _labels(self, labels) -> torch.Tensor:
        return torch.as_tensor(stages.check_labels(labels, self.num_classes), device=self.device)

    def sample_layouts(
        self,
        labels,
        rng: np.random.Generator,
        steps: int = 5,
        sampler: str = "heun",
        cfg_scale: float = 1.0,
        calibrate: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """(B, L, 5) g_init from the layout model (ODE, ``steps`` steps), calibrated by Alg. 2; or from the
        layout bank when there is no layout model."""
        return self._layouts(labels, rng, steps, sampler, cfg_scale, calibrate, progress)[1]

    def _layouts(self, labels, rng, steps, sampler, cfg_scale, calibrate, progress) -> tuple[torch.Tensor, torch.Tensor]:
        """(sampled, used) layouts: the layout model's raw output and its calibration (or the bank's pick
        twice)."""
        y = labels if isinstance(labels, torch.Tensor) else self._labels(labels)
        if self.layout is None:
            if self.layout_bank is None:
                raise ValueError("this generator has no layout model and no layout bank: pass g_init=")
            g = self.layout_bank.sample(y.cpu().numpy(), rng).to(self.device)
            return g, g
        if sampler not in stages.LAYOUT_SAMPLERS:
            raise ValueError(f"unknown layout sampler {sampler!r}; choose euler or heun")
        cfg = self.layout.config
        z = stages.start_noise(rng, len(y), cfg.num_tokens, cfg.in_channels, self.layout.pos_embed)
        with torch.no_grad(), _bar(steps, f"layout {sampler}", progress) as bar:
            x = stages.sample_layout(model_velocity(self.layout, y, None, cfg_scale), z, steps, sampler, cfg_scale, bar)
        g = stages.denormalize(x, cfg.mean, cfg.std)
        return g, (calibrate_layouts(g, (self.tokenizer.config.tile,) * 2, self.s_min) if calibrate else g)

    def sample_tokens(
        self,
        labels,
        seed: int = 0,
        cfg_scale: float | None = None,
        guidance: tuple[float, float] | None = None,
        layout_steps: int | None = None,
        texture_steps: int | None = None,
        sampler: str | None = None,
        layout_sampler: str | None = None,
        layout_cfg_scale: float | None = None,
        g_init=None,
        calibrate: bool | None = None,
        progress: bool = False,
        steps: int | None = None,
    ) -> Tokens:
        """Generate tokens for class ids ``labels`` (B,).

        Options left None take the generator's ``sampler_defaults`` (official unless its folder's sampler.json
        says otherwise). cfg_scale / guidance: CFG on the texture stage, active for guidance[0] <= t <= guidance[1]
        (t units; official 1.5 and (0.2, 1.0)). sampler: "sde" (official Euler-Maruyama, ``texture_steps`` points) or
        the fixed-step ODEs "euler" / "heun". g_init: a given layout (B, L, 5) or (L, 5) for every label;
        ``calibrate`` runs Alg. 2 on it (default: only on the layout model's output). progress: a progress
        bar (stderr) over each stage's sampling steps. steps: ``texture_steps`` (the runtime's spelling).
        """
        texture_steps = texture_steps if steps is None else steps
        return self.generate(
            labels, seed, cfg_scale, guidance, layout_steps, texture_steps, sampler, layout_sampler,
            layout_cfg_scale, g_init, calibrate, progress, decode=False,
        ).tokens  # fmt: skip

    def generate(
        self,
        labels,
        seed: int = 0,
        cfg_scale: float | None = None,
        guidance: tuple[float, float] | None = None,
        layout_steps: int | None = None,
        texture_steps: int | None = None,
        sampler: str | None = None,
        layout_sampler: str | None = None,
        layout_cfg_scale: float | None = None,
        g_init=None,
        calibrate: bool | None = None,
        progress: bool = False,
        decode: bool = True,
    ) -> Generation:
        """Every stage of a generation: the sampled and the calibrated layout, the tokens, the images.
        Options as ``sample_tokens``; ``decode=False`` skips the decoder (``images`` is None)."""
        o = stages.resolve_options(
            self.sampler_defaults, cfg_scale=cfg_scale, guidance=guidance, layout_steps=layout_steps, texture_steps=texture_steps,
            sampler=sampler, layout_sampler=layout_sampler, layout_cfg_scale=layout_cfg_scale,
        )  # fmt: skip
        cfg_scale, guidance, layout_steps, texture_steps = o["cfg_scale"], tuple(o["guidance"]), o["layout_steps"], o["texture_steps"]
        sampler, layout_sampler, layout_cfg_scale = o["sampler"], o["layout_sampler"], o["layout_cfg_scale"]
        stages.check_options(sampler, cfg_scale, guidance, layout_cfg_scale, layout_steps, texture_steps, layout_sampler)
        y = self._labels(labels)
        b = len(y)
        rng = core.pcg64(seed)
        tc = self.texture.config
        tile = self.tokenizer.config.tile

        sampled = cond = None
        if self.two_stage:
            if g_init is not None:
                sampled = cond = check_layout(g_init, tc.num_tokens, "g_init").to(self.device)
                if cond.shape[0] == 1 and b > 1:
                    sampled = cond = cond.expand(b, -1, -1)
                if cond.shape[0] != b:
                    raise ValueError(f"g_init holds {cond.shape[0]} layouts for {b} labels")
                if calibrate:
                    cond = calibrate_layouts(cond, (tile, tile), self.s_min)
            else:
                sampled, cond = self._layouts(
                    y, rng, layout_steps, layout_sampler, layout_cfg_scale, calibrate is not False, progress
                )
            cond = check_layout(cond, tc.num_tokens, "layout").to(self.device)
        elif g_init is not None:
            raise ValueError("a one-stage generator takes no g_init")

        with torch.no_grad():
            z = stages.start_noise(rng, b, tc.num_tokens, tc.in_channels, self.texture.pos_embed)
            velocity = model_velocity(self.texture, y, cond, cfg_scale, guidance)
            with _bar(texture_steps, f"texture {sampler}", progress) as bar:
                x = stages.sample_texture(velocity, z, rng, texture_steps, sampler, cfg_scale, bar)
            # g = g_init_cal + dg (two-stage), clamped as the official post-processing
            g, f = stages.split_tokens(stages.denormalize(x, tc.mean, tc.std), cond if self.two_stage else None)
        tokens = Tokens(g=g, f=f, image_size=(tile, tile), g_init=cond)
        images = self.decode(tokens) if decode else None
        return Generation(labels=y.cpu().numpy(), tokens=tokens, layout_sampled=sampled, images=images)

    def decode(self, tokens: Tokens) -> np.ndarray:
        """(B, H, W, 3) uint8 images of tokens."""
        with torch.no_grad():
            return to_uint8(self.tokenizer.decode(tokens))

    def sample(self, labels, seed: int = 0, steps: int | None = None, **kwargs) -> np.ndarray:
        """(B, H, W, 3) uint8 images for class ids ``labels``; options as ``sample_tokens`` (``steps`` is
        ``texture_steps``, the spelling of ``gpstoken_runtime.Generator.sample``)."""
        if steps is not None:
            kwargs["texture_steps"] = steps
        return self.generate(labels, seed=seed, **kwargs).images


@dataclass
class Generation:
    """The stages of one batch: ``layout_sampled`` (B, L, 5) is the layout model's raw g_init (or the bank's
    / the given one; None for one-stage), ``tokens.g_init`` the calibrated layout the texture model saw,
    ``tokens.g`` the refined Gaussians, ``images`` (B, H, W, 3) uint8."""

    labels: np.ndarray
    tokens: Tokens
    layout_sampled: torch.Tensor | None
    images: np.ndarray | None


class _bar:
    """A tqdm bar over ``steps`` sampling steps (stderr) whose instance is the per-step callback; a
    no-op when disabled, so the samplers need no tqdm."""

    def __init__(self, steps: int, desc: str, enabled: bool):
        self.tqdm = None
        if enabled:
            from tqdm import tqdm

            self.tqdm = tqdm(total=int(steps), desc=desc, unit="step", leave=False, dynamic_ncols=True, mininterval=0.5)

    def __enter__(self):
        return self if self.tqdm is not None else None

    def __call__(self) -> None:
        self.tqdm.update(1)

    def __exit__(self, *exc) -> None:
        if self.tqdm is not None:
            self.tqdm.close()

