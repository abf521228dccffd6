"""The compiled GaussianSplat op against the dense plain-torch reference, finite differences and
closed forms. Tolerances: fp64 comparisons differ only by summation order (~1e-15 relative), so
1e-10 leaves a wide margin while catching any formula error; fp32 uses 1e-5."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

import gpstoken
from gpstoken import splat, splat_reference


def random_tokens(batch, tokens, channels, *, dtype=torch.float64, seed=0, sigma=(0.03, 0.5), mu=1.2):
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=dtype)

    g = torch.stack(
        [
            uniform(*sigma, batch, tokens),
            uniform(*sigma, batch, tokens),
            uniform(-0.9, 0.9, batch, tokens),
            uniform(-mu, mu, batch, tokens),
            uniform(-mu, mu, batch, tokens),
        ],
        dim=-1,
    )
    f = torch.randn(batch, tokens, channels, generator=gen, dtype=dtype)
    return g, f


SHAPES = [  # (B, L, C, H, W)
    (1, 1, 1, 2, 2),
    (1, 7, 3, 16, 16),
    (2, 33, 5, 17, 31),  # odd sizes: partial tiles on both axes
    (3, 64, 16, 64, 64),
    (2, 20, 9, 40, 70),
]


@pytest.mark.parametrize("support", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}L{}C{}H{}W{}".format(*s))
def test_splat_cpu_matches_dense_torch(shape, support):
    b, l, c, h, w = shape
    g, f = random_tokens(b, l, c, seed=hash(shape) % 1000)
    out = splat(g, f, (h, w), support)
    ref = splat_reference(g, f, (h, w), support)
    assert out.shape == (b, c, h, w)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=f"shape {shape} support {support}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}L{}C{}H{}W{}".format(*s))
def test_splat_cpu_grad_matches_dense_torch(shape):
    b, l, c, h, w = shape
    g, f = random_tokens(b, l, c, seed=1 + hash(shape) % 1000)
    grad_out = torch.randn(b, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def grads(fn):
        gg, ff = g.clone().requires_grad_(), f.clone().requires_grad_()
        (fn(gg, ff, (h, w), 3.0) * grad_out).sum().backward()
        return gg.grad, ff.grad

    dg, df = grads(splat)
    dg_ref, df_ref = grads(splat_reference)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-9, atol=1e-11, msg=f"d gaussians, shape {shape}")
    torch.testing.assert_close(df, df_ref, rtol=1e-9, atol=1e-11, msg=f"d features, shape {shape}")


def test_splat_batch_items_are_independent():
    g, f = random_tokens(4, 25, 6, seed=3)
    together = splat(g, f, (32, 24))
    for i in range(4):
        alone = splat(g[i : i + 1], f[i : i + 1], (32, 24))
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=0, msg=f"item {i}")


def test_splat_accepts_non_contiguous_inputs():
    g, f = random_tokens(3, 40, 8, seed=4)
    # Features as a transposed view and Gaussians as a strided slice of a wider tensor.
    f_nc = f.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(3, 40, 10, dtype=torch.float64)
    wide[..., ::2] = g
    g_nc = wide[..., ::2]
    assert not f_nc.is_contiguous() and not g_nc.is_contiguous()
    gg, ff = g_nc.clone().requires_grad_(), f_nc.requires_grad_()
    out = splat(g_nc, f_nc, (20, 30))
    torch.testing.assert_close(out, splat_reference(g, f, (20, 30)), rtol=1e-10, atol=1e-12)
    grad_out = torch.randn(3, 8, 30, 20, dtype=torch.float64).transpose(2, 3)  # non-contiguous grad
    (splat(gg, ff, (20, 30)) * grad_out).sum().backward()
    g2, f2 = g.clone().requires_grad_(), f.clone().requires_grad_()
    (splat_reference(g2, f2, (20, 30)) * grad_out).sum().backward()
    torch.testing.assert_close(gg.grad, g2.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ff.grad, f2.grad, rtol=1e-9, atol=1e-11)


def test_splat_float32_matches_float64_reference():
    g, f = random_tokens(2, 128, 16, seed=5)
    out = splat(g.float(), f.float(), (64, 64))
    ref = splat_reference(g, f, (64, 64))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_splat_half_inputs_are_computed_in_float32():
    g, f = random_tokens(1, 16, 4, seed=6, dtype=torch.float32)
    out = splat(g.half(), f.half(), (16, 16))
    assert out.dtype == torch.float16
    ref = splat_reference(g.half().float(), f.half().float(), (16, 16))
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)


def test_splat_grad_matches_finite_differences():
    g, f = random_tokens(2, 5, 3, seed=8, sigma=(0.2, 0.6), mu=0.8)
    g.requires_grad_()
    f.requires_grad_()
    assert torch.autograd.gradcheck(lambda g_, f_: splat(g_, f_, (9, 11), 3.0), (g, f), eps=1e-6, atol=1e-6)


def test_splat_single_gaussian_matches_closed_form():
    # One axis-aligned Gaussian with its mean on a pixel centre: the value at that pixel is f,
    # and one pixel to the right it is f * exp(-(2/(W-1))^2 / (2 sigma_x^2)).
    h, w = 5, 9
    sx, sy = 0.3, 0.4
    g = torch.tensor([[[sx, sy, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    f = torch.tensor([[[2.0]]], dtype=torch.float64)
    out = splat(g, f, (h, w))
    assert out[0, 0, 2, 4].item() == pytest.approx(2.0, rel=1e-15)
    step = 2 / (w - 1)
    assert out[0, 0, 2, 5].item() == pytest.approx(2.0 * math.exp(-(step**2) / (2 * sx**2)), rel=1e-14)
    # Support cut with s = 1 (box half-width 0.3): the pixel at dx = 0.25 stays, dx = 0.5 is zero.
    out_cut = splat(g, f, (h, w), support=1.0)
    assert out_cut[0, 0, 2, 5].item() > 0
    assert out_cut[0, 0, 2, 6].item() == 0.0


# ---- numeric edge cases -------------------------------------------------------------------------


def _splat_and_grads(g, f, size, support=3.0):
    g = g.clone().requires_grad_()
    f = f.clone().requires_grad_()
    out = splat(g, f, size, support)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * grad_out).sum().backward()
    return out, g.grad, f.grad, grad_out


EDGE_CASES = {
    "sigma_to_zero": [1e-6, 1e-6, 0.0, 0.0, 0.0],
    "sigma_to_zero_on_pixel_centre": [1e-6, 1e-6, 0.5, -1.0, 1.0],
    "rho_to_plus_one": [0.2, 0.2, 0.999999, 0.1, -0.1],
    "rho_to_minus_one": [0.2, 0.3, -0.999999, 0.0, 0.0],
    "far_off_image": [0.1, 0.1, 0.0, 50.0, -80.0],
    "huge_off_image": [1e3, 1e3, 0.0, 1e6, 1e6],
    "huge_sigma": [1e6, 1e6, 0.3, 0.0, 0.0],
    "support_misses_every_pixel_centre": [1e-3, 1e-3, 0.0, 0.0, 0.0],  # centres of 16 px: odd k/15
    "thin_and_correlated": [1e-6, 0.5, 0.999999, 0.0, 0.0],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
def test_splat_finite_at_numeric_edges(case, dtype):
    g = torch.tensor([[EDGE_CASES[case], [0.2, 0.2, 0.0, 0.0, 0.0]]], dtype=dtype)
    f = torch.tensor([[[1.0, -2.0], [0.5, 0.25]]], dtype=dtype)
    out, dg, df, grad_out = _splat_and_grads(g, f, (16, 16))
    for name, t in (("output", out), ("d gaussians", dg), ("d features", df)):
        assert torch.isfinite(t).all(), f"{case} {dtype}: {name} not finite"
    # Where the reference (same dtype: these cases are ill-conditioned across dtypes) is finite,
    # the op must agree with it.
    g_ref = g.clone().requires_grad_()
    f_ref = f.clone().requires_grad_()
    ref = splat_reference(g_ref, f_ref, (16, 16))
    (ref * grad_out).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol, msg=f"{case} output")
    torch.testing.assert_close(df, f_ref.grad, rtol=tol, atol=tol, msg=f"{case} d features")
    if torch.isfinite(g_ref.grad).all():
        scale = g_ref.grad.abs().max().clamp_min(1.0)  # gradients reach 1e12 as sigma -> 0
        torch.testing.assert_close(dg / scale, g_ref.grad / scale, rtol=tol, atol=tol, msg=f"{case} d gaussians")


def test_splat_support_missing_every_pixel_gives_zero():
    g = torch.tensor([[EDGE_CASES["support_misses_every_pixel_centre"]]], dtype=torch.float64)
    out, dg, df, _ = _splat_and_grads(g, torch.ones(1, 1, 3, dtype=torch.float64), (16, 16))
    assert out.abs().max() == 0 and dg.abs().max() == 0 and df.abs().max() == 0


# ---- shapes and bad input -----------------------------------------------------------------------


def test_splat_zero_tokens_gives_zeros():
    g = torch.zeros(2, 0, 5)
    f = torch.zeros(2, 0, 4)
    out = splat(g, f, (8, 6))
    assert out.shape == (2, 4, 8, 6) and out.abs().max() == 0


def test_splat_zero_channels_gives_empty_map():
    g, _ = random_tokens(2, 3, 1, dtype=torch.float32)
    out = splat(g, torch.zeros(2, 3, 0), (8, 6))
    assert out.shape == (2, 0, 8, 6)


def _valid():
    return random_tokens(1, 4, 2, dtype=torch.float32)


def _with(index, value):
    g, f = _valid()
    g[(0, 1) + index] = value
    return g, f


BAD_INPUTS = {
    "gaussians_last_dim_4": (lambda: (torch.rand(2, 3, 4), torch.rand(2, 3, 2)), (8, 8), "gaussians must be (B, L, 5)"),
    "gaussians_2d": (lambda: (torch.rand(3, 5), torch.rand(3, 2)), (8, 8), "gaussians must be (B, L, 5)"),
    "features_wrong_tokens": (lambda: (_valid()[0], torch.rand(1, 5, 2)), (8, 8), "features must be (B, L, C)"),
    "integer_dtype": (lambda: (torch.ones(1, 4, 5, dtype=torch.int64), torch.ones(1, 4, 2, dtype=torch.int64)), (8, 8), "float32 or float64"),
    "mixed_dtypes": (lambda: (_valid()[0], _valid()[1].double()), (8, 8), "dtype of gaussians"),
    "nan_in_gaussians": (lambda: _with((3,), float("nan")), (8, 8), "gaussians has a NaN or Inf"),
    "inf_in_features": (lambda: (_valid()[0], torch.full((1, 4, 2), float("inf"))), (8, 8), "features has a NaN or Inf"),
    "sigma_zero": (lambda: _with((0,), 0.0), (8, 8), "sigma_x must be > 0"),
    "sigma_negative": (lambda: _with((1,), -0.1), (8, 8), "sigma_y must be > 0"),
    "rho_one": (lambda: _with((2,), 1.0), (8, 8), "|rho| < 1"),
    "rho_below_minus_one": (lambda: _with((2,), -1.5), (8, 8), "|rho| < 1"),
    "height_one": (_valid, (1, 8), "H, W >= 2"),
    "size_not_pair": (_valid, (8,), "size must be (H, W)"),
    "not_a_tensor": (lambda: ([[0.1] * 5], torch.rand(1, 1, 2)), (8, 8), "must be torch.Tensors"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_splat_bad_input_raises_naming_the_problem(case):
    make, size, message = BAD_INPUTS[case]
    g, f = make()
    error = TypeError if case == "not_a_tensor" else ValueError
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        splat(g, f, size)


@pytest.mark.parametrize("support", [0.0, -1.0, float("inf"), float("nan")])
def test_splat_rejects_bad_support(support):
    g, f = _valid()
    with pytest.raises(ValueError, match="support must be a finite number > 0"):
        splat(g, f, (8, 8), support)


def test_compiled_op_checks_shapes_itself():
    # Callers of torch.ops.gpstoken.gaussian_splat bypass the Python checks: the C++ op names the problem.
    with pytest.raises(ValueError, match=r"gaussians must be \(B, L, 5\)"):
        torch.ops.gpstoken.gaussian_splat(torch.rand(1, 2, 4), torch.rand(1, 2, 3), 8, 8, 3.0)
    with pytest.raises(ValueError, match="size must be"):
        torch.ops.gpstoken.gaussian_splat(torch.rand(1, 2, 5), torch.rand(1, 2, 3), 1, 8, 3.0)


# ---- determinism, torch.library integration ----------------------------------------------------


def test_splat_result_does_not_depend_on_thread_count():
    g, f = random_tokens(4, 200, 8, dtype=torch.float32, seed=9)
    grad_out = torch.randn(4, 8, 48, 48)
    threads = torch.get_num_threads()

    def run():
        gg, ff = g.clone().requires_grad_(), f.clone().requires_grad_()
        out = splat(gg, ff, (48, 48))
        (out * grad_out).sum().backward()
        return out, gg.grad, ff.grad

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_splat_op_passes_torch_library_opcheck():
    g, f = random_tokens(2, 9, 3, seed=10)
    g.requires_grad_()
    f.requires_grad_()
    torch.library.opcheck(torch.ops.gpstoken.gaussian_splat.default, (g, f, 12, 10, 3.0))


def test_splat_traces_as_one_op_under_torch_compile():
    g, f = random_tokens(2, 9, 3, seed=11)
    compiled = torch.compile(lambda g_, f_: splat(g_, f_, (12, 10)), fullgraph=True, backend="aot_eager")
    gg, ff = g.clone().requires_grad_(), f.clone().requires_grad_()
    out = compiled(gg, ff)
    out.square().sum().backward()
    g2, f2 = g.clone().requires_grad_(), f.clone().requires_grad_()
    ref = splat_reference(g2, f2, (12, 10))
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gg.grad, g2.grad, rtol=1e-9, atol=1e-11)


def test_extension_is_built_for_the_running_torch():
    from gpstoken import _build_info

    assert _build_info.TORCH_MAJOR_MINOR == ".".join(torch.__version__.split(".")[:2])
    assert hasattr(torch.ops.gpstoken, "gaussian_splat")
    assert (pathlib.Path(gpstoken.__file__).parent / "_build_info.py").exists()


@pytest.mark.parametrize("rho", [0.999999, -0.999999, 0.9999, -0.9999, 0.99])
def test_splat_float32_keeps_its_digits_as_rho_goes_to_one(rho):
    """Float32 weights vs the closed form in float64 along the ridge and across it, near and far from
    the centre: relative error <= 1e-5 wherever the weight is above 1e-4 (the expanded quadratic form
    lost most of its digits here: ~4e-2 at rho = 0.999999)."""
    sigma, size, support = 0.5, 129, 40.0  # a wide support: every pixel of the map is tested
    g64 = torch.tensor([[[sigma, sigma, rho, 0.0, 0.0]]], dtype=torch.float64)
    f = torch.ones(1, 1, 1)
    out = splat(g64.float(), f, (size, size), support)[0, 0].double()
    xs = torch.linspace(-1, 1, size, dtype=torch.float64)
    a, b = xs[None, :] / sigma, xs[:, None] / sigma  # (x along columns, y along rows)
    r = torch.tensor(float(torch.tensor(rho, dtype=torch.float32)), dtype=torch.float64)  # the float32 rho
    ref = torch.exp(-(a * a - 2 * r * a * b + b * b) / (2 * (1 - r) * (1 + r)))
    mask = ref > 1e-4
    assert mask.sum() >= size  # at least the ridge a = sign(rho) b, from the centre to the corners
    rel = ((out - ref).abs() / ref)[mask]
    assert rel.max() <= 1e-5, f"rho {rho}: max relative weight error {rel.max():.3g}"
    # the float32 gradient w.r.t. rho stays finite and matches float64 autograd of the closed form
    g32 = g64.float().requires_grad_(True)
    splat(g32, f, (size, size), support).sum().backward()
    g_ref = g64.clone().requires_grad_(True)
    a2 = (xs[None, :] - g_ref[0, 0, 3]) / g_ref[0, 0, 0]
    b2 = (xs[:, None] - g_ref[0, 0, 4]) / g_ref[0, 0, 1]
    q = (1 - g_ref[0, 0, 2]) * (1 + g_ref[0, 0, 2])
    torch.exp(-(a2 * a2 - 2 * g_ref[0, 0, 2] * a2 * b2 + b2 * b2) / (2 * q)).sum().backward()
    assert torch.isfinite(g32.grad).all()
    torch.testing.assert_close(g32.grad.double(), g_ref.grad, rtol=2e-3, atol=1e-3 * g_ref.grad.abs().max().item())


def test_cuda_backward_box_walk_visits_each_pixel_once(tmp_path):
    """The CUDA backward kernel splits a Gaussian's support box over a block with gpstoken::BoxWalk (no
    division per pixel). The header's code, compiled for the host: every pixel once, in row-major order
    per walker, empty boxes skipped (tests/cpp/box_walk_test.cpp)."""
    import shutil
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    compiler = shutil.which("c++") or shutil.which("g++")
    assert compiler, "a C++ compiler is needed (the package builds its extension with one)"
    exe = tmp_path / "box_walk_test"
    subprocess.run([compiler, "-std=c++17", "-O1", f"-I{root / 'plugins' / 'include'}", str(root / "tests" / "cpp" / "box_walk_test.cpp"),
                    "-o", str(exe)], check=True, capture_output=True, timeout=300)  # fmt: skip
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stdout
