"""Adversarial part of the tokenizer loss: taming's PatchGAN discriminator with hinge loss and the
adaptive generator weight (ratio of gradient norms at the decoder's last layer)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """3 -> 64 -> 128 -> 256 -> 512 -> 1, 4x4 convs with strides 2, 2, 2, 1, 1; BatchNorm, LeakyReLU(0.2)."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        mods.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def adaptive_weight(rec_loss, gen_loss, last_layer, max_weight: float = 1e4, average=None) -> torch.Tensor:
    """||d rec / d W|| / (||d gen / d W|| + 1e-4), clamped to [0, max_weight], no gradient.

    ``average``: averages a tensor over processes (DDP), so every rank uses the weight of the global batch.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(gen_loss, last_layer, retain_graph=True)[0]
    if average is not None:
        rec_grad, gen_grad = average(rec_grad), average(gen_grad)
    return (rec_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
