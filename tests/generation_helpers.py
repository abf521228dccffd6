"""Tiny random-weight generators for the generation tests (torch and runtime), written once."""

from __future__ import annotations

import torch

from gpstoken import GPSTokenizer
from gpstoken.generation import GPSGenerator, SiT, preset


def randomized(model: SiT, seed: int) -> SiT:
    """A fresh SiT is adaLN-Zero: it predicts zero velocity. Give its zero tensors random values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    return model.eval()


def tiny_two_stage_parts(num_classes: int = 10) -> tuple[GPSTokenizer, SiT, SiT]:
    """(tokenizer, layout, texture): the tiny presets with random weights, deterministic."""
    torch.manual_seed(0)
    tokenizer = GPSTokenizer("tiny").eval()
    layout_stats = {"mean": (0.2, 0.2, 0.0, 0.0, 0.0), "std": (0.1, 0.1, 0.01, 0.6, 0.6)}
    layout = randomized(SiT(preset("tiny/layout", num_classes=num_classes, **layout_stats)), 1)
    texture = randomized(SiT(preset("tiny/texture", num_classes=num_classes)), 2)
    return tokenizer, layout, texture


def tiny_two_stage_generator(num_classes: int = 10) -> GPSGenerator:
    tokenizer, layout, texture = tiny_two_stage_parts(num_classes)
    return GPSGenerator(texture, tokenizer, layout)
