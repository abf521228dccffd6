"""GaussianSplat (paper Eq. 2-3): render Gaussian tokens into a feature map.

``splat`` calls the compiled operator ``torch.ops.gpstoken.gaussian_splat`` (CPU, or CUDA when built
with it); ``splat_reference`` is the same function written densely in plain torch, slow but easy to
read, and is what the tests compare the kernels with. Conventions are in
``plugins/include/gpstoken/splat_math.h``: coordinates in [-1, 1], pixel centre i at 2i/(n-1) - 1,
unnormalized Gaussians cut to the box |dx| <= s*sigma_x, |dy| <= s*sigma_y.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gpstoken_core.official import SUPPORT

from ._ext import load_extension

load_extension()  # registers torch.ops.gpstoken.* (schemas in plugins/torch/ops.cpp)

# The qualified names of the compiled operators, for torch.library and the ONNX exporter.
SPLAT_OP = "gpstoken::gaussian_splat"
SPLAT_BACKWARD_OP = "gpstoken::gaussian_splat_backward"

_KERNEL_DTYPES = (torch.float32, torch.float64)
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)


def splat(
    gaussians: torch.Tensor,
    features: torch.Tensor,
    size: Sequence[int],
    support: float = SUPPORT,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Render tokens into a feature map, differentiably.

    Args:
        gaussians: (B, L, 5) ``(sigma_x, sigma_y, rho, mu_x, mu_y)``, sigma > 0, |rho| < 1.
        features: (B, L, C) texture features, same dtype and device.
        size: (H, W) of the map, each >= 2.
        support: s, the Gaussian is cut to |dx| <= s sigma_x, |dy| <= s sigma_y.
        check: validate values too (finite, sigma > 0, |rho| < 1). Costs a device sync on GPU;
            shapes are always checked. Skipped while ``torch.compile`` traces.

    Returns:
        (B, C, H, W): ``R[b, k, y, x] = sum_i G_i(x, y) f_i[k]``. L = 0 gives zeros.
    """
    height, width = _check_size(size)
    support = _check_support(support)
    _check_shapes(gaussians, features)
    if check and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
        _check_values(gaussians, features)
    if gaussians.dtype in _UPCAST_DTYPES:
        out = torch.ops.gpstoken.gaussian_splat(gaussians.float(), features.float(), height, width, support)
        return out.to(gaussians.dtype)
    return torch.ops.gpstoken.gaussian_splat(gaussians, features, height, width, support)


def splat_reference(
    gaussians: torch.Tensor,
    features: torch.Tensor,
    size: Sequence[int],
    support: float = SUPPORT,
) -> torch.Tensor:
    """Dense plain-torch GaussianSplat: every Gaussian at every pixel. Same contract as ``splat``.

    Memory is O(B L H W); use it for tests and as a readable definition, not for training.
    """
    height, width = _check_size(size)
    _check_shapes(gaussians, features)
    dtype, device = gaussians.dtype, gaussians.device
    xs = torch.arange(width, dtype=dtype, device=device) * 2 / (width - 1) - 1  # (W,)
    ys = torch.arange(height, dtype=dtype, device=device) * 2 / (height - 1) - 1  # (H,)
    sigma_x, sigma_y, rho, mu_x, mu_y = (p[..., None, None] for p in gaussians.unbind(-1))  # (B, L, 1, 1)
    dx = xs.view(1, 1, 1, width) - mu_x  # (B, L, 1, W)
    dy = ys.view(1, 1, height, 1) - mu_y  # (B, L, H, 1)
    a, b = dx / sigma_x, dy / sigma_y
    q = (1 - rho) * (1 + rho)
    z = (a * a - 2 * rho * a * b + b * b) / (2 * q)  # (B, L, H, W)
    inside = (dx.abs() <= support * sigma_x) & (dy.abs() <= support * sigma_y)
    weight = torch.where(inside, torch.exp(-z), torch.zeros((), dtype=dtype, device=device))
    return torch.einsum("blhw,blc->bchw", weight, features)


# ---- argument checks -----------------------------------------------------------------------------


def _shape_str(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (H, W), two integers, got {size!r}") from None
    if height < 2 or width < 2:
        raise ValueError(f"size must be (H, W) with H, W >= 2 (pixel centres 2i/(n-1)-1), got {(height, width)}")
    return height, width


def _check_support(support: float) -> float:
    support = float(support)
    if not (math.isfinite(support) and support > 0):
        raise ValueError(f"support must be a finite number > 0, got {support}")
    return support


def _check_shapes(gaussians: torch.Tensor, features: torch.Tensor) -> None:
    if not isinstance(gaussians, torch.Tensor) or not isinstance(features, torch.Tensor):
        raise TypeError(
            f"gaussians and features must be torch.Tensors, got {type(gaussians).__name__} and "
            f"{type(features).__name__}"
        )
    if gaussians.dim() != 3 or gaussians.shape[-1] != 5:
        raise ValueError(
            f"gaussians must be (B, L, 5) (sigma_x, sigma_y, rho, mu_x, mu_y), got {_shape_str(gaussians)}"
        )
    if features.dim() != 3 or features.shape[:2] != gaussians.shape[:2]:
        raise ValueError(
            f"features must be (B, L, C) with (B, L) = {tuple(gaussians.shape[:2])} as in gaussians, "
            f"got {_shape_str(features)}"
        )
    if gaussians.dtype not in _KERNEL_DTYPES + _UPCAST_DTYPES:
        raise ValueError(f"gaussians must be float32 or float64 (or half, computed in float32), got {_shape_str(gaussians)}")
    if features.dtype != gaussians.dtype:
        raise ValueError(
            f"features must have the dtype of gaussians ({gaussians.dtype}), got {_shape_str(features)}"
        )
    if features.device != gaussians.device:
        raise ValueError(
            f"features must be on the device of gaussians ({gaussians.device}), got {_shape_str(features)}"
        )


def _first_bad(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def _check_values(gaussians: torch.Tensor, features: torch.Tensor) -> None:
    with torch.no_grad():
        g = gaussians.detach()
        # One fused test (one device sync) on the happy path; the slow search below names the problem.
        ok = (g[..., :2] > 0).all() & (g[..., 2].abs() < 1).all() & torch.isfinite(g[..., 3:]).all()
        if features.numel():
            ok &= torch.isfinite(features.detach()).all()
        if bool(ok):
            return
        bad = ~torch.isfinite(g)
        if bad.any():
            raise ValueError(f"gaussians has a NaN or Inf value at index {_first_bad(bad)}")
        bad = ~torch.isfinite(features.detach())
        if bad.any():
            raise ValueError(f"features has a NaN or Inf value at index {_first_bad(bad)}")
        bad = g[..., :2] <= 0
        if bad.any():
            b, i, k = _first_bad(bad)
            name = ("sigma_x", "sigma_y")[k]
            raise ValueError(f"gaussians[{b}, {i}]: {name} must be > 0, got {g[b, i, k].item()}")
        bad = g[..., 2].abs() >= 1
        if bad.any():
            b, i = _first_bad(bad)
            raise ValueError(f"gaussians[{b}, {i}]: rho must satisfy |rho| < 1, got {g[b, i, 2].item()}")


# ---- autograd and fake (meta) kernels for the compiled op --------------------------------------


@torch.library.register_fake(SPLAT_OP)
def _splat_fake(gaussians, features, height, width, support):
    return gaussians.new_empty((gaussians.shape[0], features.shape[2], height, width))


@torch.library.register_fake(SPLAT_BACKWARD_OP)
def _splat_backward_fake(grad_out, gaussians, features, height, width, support):
    return torch.empty_like(gaussians), torch.empty_like(features)


def _splat_setup_context(ctx, inputs, output):
    gaussians, features, height, width, support = inputs
    ctx.save_for_backward(gaussians, features)
    ctx.size_and_support = (height, width, support)


def _splat_backward(ctx, grad_out):
    gaussians, features = ctx.saved_tensors
    height, width, support = ctx.size_and_support
    grad_gaussians, grad_features = torch.ops.gpstoken.gaussian_splat_backward(
        grad_out.contiguous(), gaussians, features, height, width, support
    )
    return grad_gaussians, grad_features, None, None, None


torch.library.register_autograd(SPLAT_OP, _splat_backward, setup_context=_splat_setup_context)
