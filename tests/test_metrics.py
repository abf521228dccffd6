"""Metrics and perceptual networks: PSNR/SSIM against independent formulas and scikit-image, LPIPS and
Inception loaders on weight files made here, the Frechet distance against a closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gpstoken.checkpoint import CheckpointError
from gpstoken_core.metrics import psnr, ssim
from gpstoken.perceptual import LPIPS, InceptionFeatures, frechet_distance


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_psnr_matches_the_definition_and_skimage(pair):
    from skimage.metrics import peak_signal_noise_ratio

    a, b = pair
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-9)
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)
    assert psnr(a, a) == float("inf")


def test_ssim_matches_a_direct_computation(pair):
    from scipy.ndimage import gaussian_filter

    a, b = pair
    # Wang et al. 2004 with a Gaussian window (sigma 1.5, truncated at 3.5 sigma), per channel, mean
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(3):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        f = lambda z: gaussian_filter(z, 1.5, truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        pad = 5  # skimage crops (win_size - 1) // 2 = 5 pixels at the border before averaging
        values.append(s[pad:-pad, pad:-pad].mean())
    assert ssim(a, b) == pytest.approx(np.mean(values), abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)


def test_metric_input_errors(pair):
    a, _ = pair
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[:10])
    with pytest.raises(ValueError, match="uint8"):
        ssim(a, a.astype(np.float32))


# ----------------------------------------------------------------------------- LPIPS


def _lpips_reference(model: LPIPS, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS written out: VGG16 layers one by one, unit-normalized channels, weighted squared diff."""
    taps_at = {3, 8, 15, 22, 29}

    def feats(x):
        h = (x - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        out = []
        for i in range(30):
            h = model.features[i](h)
            if i in taps_at:
                out.append(h)
        return out

    total = torch.zeros(a.shape[0])
    for k, (fa, fb) in enumerate(zip(feats(a), feats(b))):
        na = fa / (torch.linalg.vector_norm(fa, dim=1, keepdim=True) + 1e-10)
        nb = fb / (torch.linalg.vector_norm(fb, dim=1, keepdim=True) + 1e-10)
        w = model.lins[k].weight.view(1, -1, 1, 1)
        total += ((na - nb) ** 2 * w).sum(1).mean(dim=(1, 2))
    return total


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """A torchvision-layout VGG16 file (with classifier) and an lpips-package heads file, made here."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    ref = LPIPS()
    with torch.no_grad():
        for lin in ref.lins:
            lin.weight.uniform_(0, 0.2)
    vgg = {f"features.{k.split('.', 1)[1]}": v for k, v in ref.state_dict().items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # a full torchvision file has a classifier: ignored
    torch.save(vgg, folder / "vgg16.pth")
    heads = {f"lin{k}.model.1.weight": lin.weight.detach().clone() for k, lin in enumerate(ref.lins)}
    save_file(heads, str(folder / "lpips_heads.safetensors"))
    return ref, folder / "vgg16.pth", folder / "lpips_heads.safetensors"


def test_lpips_loads_two_files_and_matches_the_reference(lpips_files):
    ref, vgg, heads = lpips_files
    model = LPIPS.from_weights(f"{vgg},{heads}")
    a, b = torch.rand(2, 3, 40, 48) * 2 - 1, torch.rand(2, 3, 40, 48) * 2 - 1
    torch.testing.assert_close(model(a, b), _lpips_reference(ref, a, b), rtol=1e-5, atol=1e-6)
    assert torch.all(model(a, a) == 0)
    assert torch.all(model(a, b) > 0)


def test_lpips_missing_heads_are_reported(lpips_files):
    _, vgg, _ = lpips_files
    with pytest.raises(CheckpointError, match="missing.*lins.0.weight"):
        LPIPS.from_weights(vgg)
    with pytest.raises(CheckpointError, match="no such file"):
        LPIPS.from_weights("/nonexistent/vgg.pth")


# ----------------------------------------------------------------------------- Inception / FID


def test_inception_loads_a_torchvision_layout_file(tmp_path):
    torch.manual_seed(0)
    ref = InceptionFeatures()
    state = dict(ref.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # FID files carry fc
    torch.save(state, tmp_path / "pt_inception.pth")
    model = InceptionFeatures.from_weights(tmp_path / "pt_inception.pth")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    feats = model(x)
    assert feats.shape == (2, 2048)
    torch.testing.assert_close(feats, ref(x))
    # the channel bookkeeping of every block matches the published network: 2048 features, and the
    # parameter count of torchvision's Inception3 without fc / AuxLogits (21,785,568 params + BN stats)
    assert sum(p.numel() for p in model.parameters()) == 21_785_568
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="Mixed_7c.branch_pool.conv.weight"):
        InceptionFeatures.from_weights(tmp_path / "broken.pth")


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(4000, 3)) * [1.0, 2.0, 0.5])
    b = torch.from_numpy(rng.normal(size=(4000, 3)) * [1.5, 1.0, 0.5] + [1.0, 0.0, -2.0])
    # both covariances (estimated) are near diagonal; use the estimated ones in the closed form
    ca, cb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    w, v = np.linalg.eigh(ca)
    sqrt_ca = v @ np.diag(np.sqrt(w)) @ v.T
    mid = sqrt_ca @ cb @ sqrt_ca
    w2, v2 = np.linalg.eigh(mid)
    expected = np.sum((a.numpy().mean(0) - b.numpy().mean(0)) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(w2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
