"""The CUDA kernels through the torch op, against the CPU op and the float64 dense reference.

Marked ``cuda``: they need an NVIDIA GPU and a CUDA build of the extension, and skip with that reason
elsewhere. ``benchmarks/gpu_check.py`` runs them (``pytest -m cuda``) when a GPU is lent.
"""

from __future__ import annotations

import pytest
import torch
from test_splat import EDGE_CASES, SHAPES, random_tokens

import gpstoken
from gpstoken import splat, splat_reference

pytestmark = pytest.mark.cuda


def _cuda_op_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        splat(torch.ones(1, 1, 5, device="cuda") * 0.5, torch.ones(1, 1, 1, device="cuda"), (2, 2))
    except (RuntimeError, NotImplementedError):
        return False
    return True


CUDA = _cuda_op_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU and the extension built with its CUDA kernels")


def _forward_backward(g, f, size, support, device):
    g = g.to(device).requires_grad_()
    f = f.to(device).requires_grad_()
    out = splat(g, f, size, support)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach().cpu(), g.grad.cpu(), f.grad.cpu()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cuda_op_matches_the_cpu_op_and_the_reference(shape, dtype):
    b, n, c, h, w = shape
    g, f = random_tokens(b, n, c, dtype=dtype, seed=11)
    cpu = _forward_backward(g, f, (h, w), 3.0, "cpu")
    gpu = _forward_backward(g, f, (h, w), 3.0, "cuda")
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, a, r in zip(("output", "d gaussians", "d features"), gpu, cpu):
        scale = r.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, r / scale, rtol=tol, atol=tol, msg=f"{shape} {dtype} {name}")
    ref = splat_reference(g.double(), f.double(), (h, w))
    torch.testing.assert_close(gpu[0].double(), ref, rtol=tol, atol=tol)


@requires_cuda
@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
def test_cuda_op_at_numeric_edges(case):
    g = torch.tensor([[EDGE_CASES[case], [0.2, 0.2, 0.0, 0.0, 0.0]]], dtype=torch.float32)
    f = torch.tensor([[[1.0, -2.0], [0.5, 0.25]]])
    gpu = _forward_backward(g, f, (16, 16), 3.0, "cuda")
    cpu = _forward_backward(g, f, (16, 16), 3.0, "cpu")
    for name, a, r in zip(("output", "d gaussians", "d features"), gpu, cpu):
        assert torch.isfinite(a).all(), f"{case}: {name} not finite on CUDA"
        scale = r.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, r / scale, rtol=1e-5, atol=1e-5, msg=f"{case} {name}")


@requires_cuda
def test_cuda_half_inputs_clamp_rho_and_sigma_and_compute_in_float32():
    g, f = random_tokens(2, 64, 8, dtype=torch.float32, seed=12)
    g[0, :4, 2] = torch.tensor([0.99999, -0.99999, 1.0, -1.0])  # all round to +-1 in float16
    g[0, 4, 0] = 1e-9  # underflows to 0 in float16
    out = splat(g.half().cuda(), f.half().cuda(), (32, 32)).float().cpu()
    assert torch.isfinite(out).all()
    clamped = g.half().float()
    clamped[..., 2] = clamped[..., 2].clamp(-0.99951171875, 0.99951171875)
    clamped[..., 0] = clamped[..., 0].clamp_min(2.0**-24)
    ref = splat_reference(clamped.double(), f.half().double(), (32, 32)).float()
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())


@requires_cuda
def test_cuda_op_under_torch_compile():
    g, f = random_tokens(2, 32, 4, dtype=torch.float32, seed=13)
    g, f = g.cuda(), f.cuda()
    compiled = torch.compile(lambda g_, f_: splat(g_, f_, (24, 24)) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(g, f), splat(g, f, (24, 24)) * 2)


@requires_cuda
def test_tokenizer_on_cuda_matches_cpu():
    from pathlib import Path

    from gpstoken_core.imageio import bundled_photo, center_crop_resize

    shipped = Path(gpstoken.__file__).parent / "weights" / "tiny"
    image = center_crop_resize(bundled_photo("astronaut"), 256)
    cpu_model = gpstoken.GPSTokenizer.from_pretrained(shipped)
    gpu_model = gpstoken.GPSTokenizer.from_pretrained(shipped, "cuda")
    with torch.inference_mode():
        cpu_tokens = cpu_model.encode(image)
        gpu_tokens = gpu_model.encode(image)
        cpu_image = gpstoken.to_uint8(cpu_model.decode(cpu_tokens))
        gpu_image = gpstoken.to_uint8(gpu_model.decode(gpu_tokens))
    torch.testing.assert_close(gpu_tokens.g.cpu(), cpu_tokens.g, rtol=1e-3, atol=1e-4)
    assert abs(gpu_image.astype(int) - cpu_image.astype(int)).max() <= 2


def test_cuda_tests_skip_only_for_a_missing_gpu():
    """The skip above is for a real absence: on a machine with a usable CUDA build the tests run."""
    assert CUDA == (torch.cuda.is_available() and _cuda_op_available())
