"""Samplers and CFG against closed forms: per-channel Gaussian data, whose Linear-path velocity is known,
an SiT-style reference SDE loop written here, and the CFG formula evaluated row by row."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gpstoken.generation import SiT, preset, sample_ode, sample_sde
from gpstoken_core import sampling as core

MEAN = np.array([1.0, -0.5, 2.0])
STD = np.array([0.5, 1.5, 0.8])


def gaussian_velocity(mean, std):
    """E[x1 - x0 | x_t = x] for x1 ~ N(mean, std^2) per channel, x0 ~ N(0, 1), x_t = t x1 + (1 - t) x0.

    Works on numpy and torch; t is a scalar (0-d) or, for the reference loop, one value per row.
    """

    def velocity(x, t):
        if getattr(t, "ndim", 0) == 1:
            t = t.reshape(-1, *([1] * (x.ndim - 1)))
        var = t * t * std * std + (1 - t) * (1 - t)
        return mean + (t * std * std - (1 - t)) * (x - t * mean) / var

    return velocity


def test_ode_maps_standard_normal_to_target_mean_and_std():
    # The exact flow of this path is x1 = mean + std * x0; both solvers must land there.
    x0 = np.random.default_rng(0).standard_normal((4000, 1, 3))
    for method, steps, tol in (("euler", 200, 0.02), ("heun", 20, 0.01)):
        x1 = core.sample_ode(gaussian_velocity(MEAN, STD), x0, steps, method)
        np.testing.assert_allclose(x1.reshape(-1, 3).mean(0), MEAN + STD * x0.reshape(-1, 3).mean(0), atol=tol, err_msg=method)
        np.testing.assert_allclose(x1.reshape(-1, 3).std(0), STD * x0.reshape(-1, 3).std(0), rtol=tol, err_msg=method)


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2)])
def test_ode_error_falls_with_the_method_order(method, order):
    x0 = np.random.default_rng(1).standard_normal((64, 2, 3))
    exact = MEAN + STD * x0
    errors = [np.abs(core.sample_ode(gaussian_velocity(MEAN, STD), x0, n, method) - exact).max() for n in (8, 16, 32, 64)]
    ratios = [a / b for a, b in zip(errors[:-1], errors[1:])]
    # measured: euler 1.93, 1.96, 1.98; heun 3.87, 3.62, 3.82
    assert all(abs(np.log2(r) - order) < 0.3 for r in ratios), f"{method}: errors {errors}, ratios {ratios}"


@pytest.mark.parametrize("diffusion", ["sbdm", "sigma"])
def test_sde_official_settings_match_target_moments(diffusion):
    rng = core.pcg64(1)
    x = core.normal_float32(rng, (20000, 1, 3)).astype(np.float64)
    out = core.sample_sde(gaussian_velocity(MEAN, STD), x, core.pcg64_draw(rng), diffusion=diffusion).reshape(-1, 3)
    # 20000 samples: standard errors 0.004..0.011 on the means; measured mean error <= 0.011, std error <= 1.4%
    np.testing.assert_allclose(out.mean(0), MEAN, atol=0.03, err_msg=diffusion)
    np.testing.assert_allclose(out.std(0), STD, rtol=0.03, err_msg=diffusion)


def test_sde_reproduces_sit_reference_loop_with_the_same_draws():
    """A SiT-style loop (float32 torch.linspace grid, per-row t, drift and score from separate velocity
    calls, global CPU RNG) against ours with generator=None after the same manual_seed."""
    mean, std = torch.tensor(MEAN, dtype=torch.float32), torch.tensor(STD, dtype=torch.float32)
    velocity = gaussian_velocity(mean, std)
    x0 = torch.randn(8, 5, 3, generator=torch.Generator().manual_seed(3))

    def reference(x, n=250, t0=1e-3, t1=0.96):
        ts = torch.linspace(t0, t1, n)
        dt = ts[1] - ts[0]
        for ti in ts[:-1]:
            w_cur = torch.randn(x.size())
            t = torch.ones(x.size(0)) * ti
            tb = t.reshape(-1, 1, 1)
            diffusion = (1 - tb) ** 2 / tb + (1 - tb)
            score = (tb * velocity(x, t) - x) / (1 - tb)
            mean_x = x + (velocity(x, t) + diffusion * score) * dt
            x = mean_x + torch.sqrt(2 * diffusion) * (w_cur * torch.sqrt(dt))
        t = torch.ones(x.size(0)) * ts[-1]
        tb = t.reshape(-1, 1, 1)
        diffusion = (1 - tb) ** 2 / tb + (1 - tb)
        drift = velocity(x, t) + diffusion * (tb * velocity(x, t) - x) / (1 - tb)
        return x + drift * (1 - t1)

    torch.manual_seed(11)
    expected = reference(x0.clone())
    torch.manual_seed(11)
    got = sample_sde(velocity, x0.clone())
    # float32 grid (reference) vs float64 grid (ours): measured max difference 1.1e-6 (values up to 3.7)
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-5)


def test_sampler_code_gives_identical_numbers_in_torch_and_numpy():
    mean32, std32 = MEAN.astype(np.float32), STD.astype(np.float32)
    for run in ("sde", "euler", "heun"):
        results = []
        for ns in ("numpy", "torch"):
            rng = core.pcg64(5)
            x = core.normal_float32(rng, (16, 4, 3))
            m, s = (mean32, std32) if ns == "numpy" else (torch.from_numpy(mean32), torch.from_numpy(std32))
            if ns == "torch":
                x = torch.from_numpy(x)
            v = gaussian_velocity(m, s)
            if run == "sde":
                out = core.sample_sde(v, x, core.pcg64_draw(rng), steps=40)
            else:
                out = core.sample_ode(v, x, 7, run)
            results.append(np.asarray(out))
        assert results[0].dtype == results[1].dtype == np.float32, run
        np.testing.assert_array_equal(results[0], results[1], err_msg=run)


def test_noise_protocol_draws_one_float32_normal_per_step_before_each_call():
    calls, draws = [], []

    def velocity(x, t):
        calls.append(float(t))
        return x * 0

    def draw(shape):
        draws.append((shape, len(calls)))
        return np.zeros(shape, np.float32)

    core.sample_sde(velocity, np.zeros((2, 3, 4), np.float32), draw, steps=6)
    assert len(calls) == 6 and len(draws) == 5  # 5 noisy steps + the noise-free last step
    assert all(shape == (2, 3, 4) for shape, _ in draws)
    assert [k for _, k in draws] == [0, 1, 2, 3, 4]  # each draw precedes its step's velocity call
    np.testing.assert_allclose(calls, np.linspace(1e-3, 0.96, 6))


def test_pcg64_draw_gives_conditional_rows_the_same_noise_with_or_without_doubling():
    a = core.pcg64_draw(core.pcg64(7), rows=4)
    b = core.pcg64_draw(core.pcg64(7), rows=4)
    for _ in range(3):
        np.testing.assert_array_equal(a((2, 5)), b((4, 5))[:2])


# ----------------------------------------------------------------------------- CFG
def _random_model(**overrides) -> SiT:
    torch.manual_seed(0)
    model = SiT(preset("tiny/texture", num_tokens=8, num_classes=5, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():  # adaLN-Zero leaves a fresh model's output at zero; give it a real one
                p.normal_(0, 0.05)
    return model.eval()


def test_cfg_scale_one_equals_conditional_velocity():
    model = _random_model()
    x = torch.randn(3, 8, 21)
    cond = torch.rand(3, 8, 5) * 0.5 + 0.05
    y = torch.tensor([0, 1, 4])
    y2 = torch.cat([y, torch.full_like(y, 5)])
    with torch.no_grad():
        conditional = model(x, torch.full((3,), 0.5), y, cond)
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.full((6,), 0.5), y2, torch.cat([cond, cond]), cfg_scale=1.0)
    torch.testing.assert_close(guided[:3], conditional, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(guided[3:], conditional, atol=1e-6, rtol=1e-5)


def test_cfg_inside_interval_guides_both_halves_and_outside_each_row_is_plain():
    model = _random_model()
    xc, xu = torch.randn(2, 8, 21), torch.randn(2, 8, 21)
    cond = torch.rand(2, 8, 5) * 0.5 + 0.05
    y = torch.tensor([2, 3])
    null = torch.full_like(y, 5)
    x2, y2, cond2 = torch.cat([xc, xu]), torch.cat([y, null]), torch.cat([cond, cond])
    with torch.no_grad():
        for t in (0.2, 0.7, 1.0):  # inside [0.2, 1.0], bounds inclusive
            tt = torch.full((4,), t)
            c = model(xc, tt[:2], y, cond)
            u = model(xc, tt[:2], null, cond)  # the unconditional branch keeps the layout
            out = model.forward_with_cfg(x2, tt, y2, cond2, cfg_scale=1.5, guidance_low=0.2, guidance_high=1.0)
            torch.testing.assert_close(out[:2], u + 1.5 * (c - u), atol=1e-5, rtol=1e-5, msg=f"t={t}")
            torch.testing.assert_close(out[2:], out[:2], msg=f"t={t}")
        for t in (0.0, 0.1999):
            tt = torch.full((4,), t)
            out = model.forward_with_cfg(x2, tt, y2, cond2, cfg_scale=1.5, guidance_low=0.2, guidance_high=1.0)
            torch.testing.assert_close(out[:2], model(xc, tt[:2], y, cond), atol=1e-5, rtol=1e-5, msg=f"t={t}")
            torch.testing.assert_close(out[2:], model(xu, tt[2:], null, cond), atol=1e-5, rtol=1e-5, msg=f"t={t}")


def test_core_cfg_rule_on_numpy():
    x = np.arange(8, dtype=np.float32).reshape(4, 2)

    def forward(rows):  # conditional rows velocity 1, unconditional rows 3, by position
        return np.concatenate([np.ones((2, 2), np.float32), 3 * np.ones((2, 2), np.float32)]) + 0 * rows

    np.testing.assert_array_equal(core.cfg_velocity(forward, x, 0.5, 2.0, 0.2, 1.0), np.full((4, 2), 3 + 2 * (1 - 3)))
    np.testing.assert_array_equal(core.cfg_velocity(forward, x, 0.1, 2.0, 0.2, 1.0), forward(x))


# ----------------------------------------------------------------------------- bad input, isolation
def test_sampler_bad_input_messages():
    v = gaussian_velocity(MEAN, STD)
    x = np.zeros((2, 1, 3))
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        sample_ode(v, torch.zeros(2, 1, 3), 0)
    with pytest.raises(ValueError, match="unknown ODE method"):
        core.sample_ode(v, x, 4, "rk45")
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        core.sample_sde(v, x, core.pcg64_draw(core.pcg64(0)), steps=1)
    with pytest.raises(ValueError, match="unknown diffusion"):
        core.sample_sde(v, x, core.pcg64_draw(core.pcg64(0)), diffusion="vp")
    with pytest.raises(ValueError, match="t_start"):
        core.sample_sde(v, x, core.pcg64_draw(core.pcg64(0)), t_start=0.0)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number >= 0"):
        core.check_guidance(-1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="seed"):
        core.pcg64(-1)


def test_core_sampling_imports_and_runs_without_torch():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        from gpstoken_core import sampling as core
        rng = core.pcg64(0)
        x = core.normal_float32(rng, (2, 3, 4))
        out = core.sample_sde(lambda x, t: -x, x, core.pcg64_draw(rng), steps=5)
        assert out.shape == (2, 3, 4) and out.dtype == np.float32
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_generation_cli_registers_without_importing_torch():
    code = textwrap.dedent(
        """
        import argparse, sys
        from gpstoken.generation.cli import register
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers(dest="command"))
        parser.parse_args(["generate", "--model", "folder", "--class", "1", "--out", "o"])
        print("torch loaded" if "torch" in sys.modules else "ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
