"""Exponential moving average of a model's weights, with the schedule of ema_pytorch (the official run).

The decay used at update ``k`` (the caller counts updates, so a resumed run needs no EMA state beyond
the weights) is::

    0                                              k <= update_after_step  (the EMA copies the model)
    min(decay, 1 - (1 + k - update_after_step) ** -power)   otherwise, or ``decay`` when power is None

and the update is skipped unless ``k % update_every == 0``. The tokenizer uses power 2/3, every step,
after step 0; SiT's constant 0.9999 is ``EMA(model, 0.9999, power=None, update_after_step=-1)``.
"""

from __future__ import annotations

import copy

import torch


class EMA:
    """A frozen copy of ``model`` (``.model``) that follows it; parameters are averaged, buffers copied."""

    def __init__(
        self,
        model: torch.nn.Module,
        decay: float = 0.9999,
        power: float | None = 2 / 3,
        update_every: int = 1,
        update_after_step: int = 0,
    ):
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.ceiling, self.power = decay, power
        self.update_every, self.update_after_step = update_every, update_after_step

    def decay(self, k: int) -> float:
        """The decay at update ``k`` (0-based)."""
        if k <= self.update_after_step:
            return 0.0
        if self.power is None:
            return self.ceiling
        return min(self.ceiling, 1 - (1 + k - self.update_after_step) ** (-self.power))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, k: int) -> None:
        """Move the average towards ``model`` (the bare module, not a DDP wrapper) as update ``k``."""
        if k % self.update_every:
            return
        d = self.decay(k)
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - d)  # lerp at weight 1 is an exact copy, so decay 0 needs no branch
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
