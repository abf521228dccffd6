"""Perceptual networks loaded from local weight files (nothing is downloaded): LPIPS (VGG16) and the
Inception-v3 used by FID, for the training losses and ``gpstoken eval``.

Weight files are ``.safetensors`` or, for the ones their authors publish as PyTorch files, ``.pth``
read with ``torch.load(weights_only=True)`` (tensors only, no code is executed). Accepted layouts:
  - LPIPS: torchvision VGG16 (``features.N.*``) or the lpips package (``net.sliceK.N.*``) for the
    backbone, plus the linear heads ``linK.model.1.weight`` (lpips / taming-transformers files); the
    backbone and the heads may come in two files.
  - Inception: the FID network of pytorch-fid / torch-fidelity (torchvision ``Inception3`` names:
    ``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ... ; ``fc`` is ignored).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, describe_mismatch, load_tensors


def load_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        if not path.exists():
            raise CheckpointError(f"{path}: no such file")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable tensor file ({type(err).__name__}: {err})") from None
        if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
            data = data["state_dict"]
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{path}: expected a flat dict of tensors")
        return dict(data)
    return load_tensors(path)[0]


def _load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = {k: v.shape for k, v in module.state_dict().items()}
    problem = describe_mismatch(expected, tensors, source)
    if problem:
        raise CheckpointError(problem)
    module.load_state_dict(tensors, strict=True)


# ----------------------------------------------------------------------------- LPIPS

VGG16_CONVS = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
               (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]  # fmt: skip
LPIPS_TAPS = (3, 8, 15, 22, 29)  # outputs of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018), VGG16 variant; inputs in [-1, 1], output (B,)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        for item in VGG16_CONVS:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(item[0], item[1], 3, padding=1), nn.ReLU(inplace=False)]
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h)
            if i == LPIPS_TAPS[-1]:
                break
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b)):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total

    @staticmethod
    def normalize_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map torchvision / lpips / taming key layouts to ours."""
        out = {}
        for k, v in tensors.items():
            m = re.fullmatch(r"(?:net\.)?slice\d\.(\d+)\.(weight|bias)", k)
            if m:
                out[f"features.{m[1]}.{m[2]}"] = v
                continue
            m = re.fullmatch(r"lin(\d)\.model\.1\.weight", k) or re.fullmatch(r"lins\.(\d)\.weight", k)
            if m:
                out[f"lins.{m[1]}.weight"] = v
                continue
            m = re.fullmatch(r"(?:net\.)?features\.(\d+)\.(weight|bias)", k)
            if m:
                if int(m[1]) <= LPIPS_TAPS[-1]:
                    out[f"features.{m[1]}.{m[2]}"] = v
                continue
            # classifier layers of a full torchvision VGG16 file are not needed
        return out

    @classmethod
    def from_weights(cls, *paths: str | Path) -> LPIPS:
        """Load from one or more local files (e.g. a VGG16 file and an LPIPS heads file); strict."""
        if len(paths) == 1 and isinstance(paths[0], str) and "," in paths[0]:
            paths = tuple(paths[0].split(","))
        tensors: dict[str, torch.Tensor] = {}
        for p in paths:
            tensors.update(cls.normalize_keys(load_weight_file(p)))
        model = cls()
        _load_strict(model, tensors, "LPIPS weights " + ", ".join(str(p) for p in paths))
        return model


# ----------------------------------------------------------------------------- Inception (FID)


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # FID Inception: average pooling that ignores the padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], 1)  # fmt: skip


class _BlockB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)  # fmt: skip


class _BlockC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _Conv(cin, c7, 1), _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _Conv(cin, c7, 1), _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _Conv(c7, c7, (1, 7), padding=(0, 3)), _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(_avg3(x)),
        ], 1)  # fmt: skip


class _BlockD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = _Conv(cin, 192, 1), _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = _Conv(192, 192, (7, 1), padding=(3, 0)), _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the last block of the FID network pools with max, not average
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _Conv(384, 384, (1, 3), padding=(0, 1)), _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _Conv(384, 384, (1, 3), padding=(0, 1)), _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], 1)  # fmt: skip


class InceptionFeatures(nn.Module):
    """The FID Inception-v3 up to its 2048-d pool features. Input: images in [-1, 1], any size
    (resized to 299x299 bilinearly)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, max_pool=False), _BlockE(2048, max_pool=True)
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))  # (B, 2048)

    @classmethod
    def from_weights(cls, path: str | Path) -> InceptionFeatures:
        tensors = {k: v for k, v in load_weight_file(path).items() if not k.startswith(("fc.", "AuxLogits."))}
        model = cls()
        expected = model.state_dict()
        tensors = {k: v for k, v in tensors.items() if not (k.endswith("num_batches_tracked") and k not in expected)}
        _load_strict(model, tensors, f"Inception weights {path}")
        return model


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """FID between two (N, D) feature sets: |mu_a - mu_b|^2 + Tr(Ca + Cb - 2 (Ca Cb)^(1/2))."""
    import numpy as np
    from scipy import linalg

    a, b = feats_a.double().cpu().numpy(), feats_b.double().cpu().numpy()
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 images per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb)
    if not np.isfinite(covmean).all():  # near-singular: regularize as pytorch-fid does
        offset = np.eye(ca.shape[0]) * 1e-6
        covmean = linalg.sqrtm((ca + offset) @ (cb + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(covmean))
