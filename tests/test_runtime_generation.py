"""Generation on the slim runtime: `gpstoken export-generator` graphs + gpstoken_runtime.Generator, no torch.

Tiny random-weight generators built here (as tests/test_generation_pipeline.py). References: the torch
GPSGenerator (same seed, same noise protocol), the closed-form velocity of a Gaussian target, and polygraphy's
Comparator on each velocity graph.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from generation_helpers import tiny_two_stage_generator

from gpstoken.cli import main as gpstoken_main
from gpstoken.generation import GPSGenerator
from gpstoken_core import generation as stages
from gpstoken_core import sampling as core
from gpstoken_core.manifest import ExportError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# fp32 ORT vs torch: each velocity call agrees to ~4e-7 (float32 rounding of a different summation order);
# the SDE's early steps (w(t) ~ 1/t near t0 = 1e-3) amplify that, and tokens of magnitude ~4 end up to 3e-5
# apart (7e-6 relative) in the measured cases; the stated bound is rtol 2e-5 + atol 2e-5.
TOKENS_RTOL = TOKENS_ATOL = 2e-5
GREY_LEVELS = 2


@pytest.fixture(scope="module")
def generator() -> GPSGenerator:
    return tiny_two_stage_generator()


@pytest.fixture(scope="module")
def exported(generator, tmp_path_factory) -> Path:
    """The CLI path: a saved generator folder -> `gpstoken export-generator --check` (polygraphy parity)."""
    root = tmp_path_factory.mktemp("gen")
    generator.save_pretrained(root / "model")
    rc = gpstoken_main(["export-generator", "--model", str(root / "model"), "--out", str(root / "export"), "--check"])
    assert rc == 0, "export-generator --check failed"
    return root / "export"


CASES = [  # (sampler, steps, cfg_scale): the SDE and the ODEs, with and without CFG
    ("sde", 6, 1.5),
    ("sde", 4, 1.0),
    ("heun", 3, 1.0),
    ("euler", 4, 2.0),
]


def test_runtime_sampling_with_torch_blocked_equals_the_torch_pipeline(exported, generator, tmp_path):
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
sys.modules["sklearn"] = None
import numpy as np
from gpstoken_runtime import Generator
gen = Generator.load({str(exported)!r})
out = {{}}
for k, (sampler, steps, cfg) in enumerate({CASES!r}):
    r = gen.generate([1, 5, 9], seed=11 + k, sampler=sampler, steps=steps, cfg_scale=cfg)
    out[f"g{{k}}"], out[f"f{{k}}"], out[f"img{{k}}"] = r.tokens.g, r.tokens.f, r.images
np.savez({str(tmp_path / "out.npz")!r}, **out)
loaded = [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
assert "torch" not in loaded and "sklearn" not in loaded and "gpstoken" not in loaded, "the runtime imported torch/sklearn/gpstoken"
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = np.load(tmp_path / "out.npz")
    for k, (sampler, steps, cfg) in enumerate(CASES):
        case = f"{sampler} {steps} steps cfg {cfg} seed {11 + k}"
        ref = generator.generate([1, 5, 9], seed=11 + k, sampler=sampler, texture_steps=steps, cfg_scale=cfg)
        np.testing.assert_allclose(out[f"g{k}"], ref.tokens.g.numpy(), rtol=TOKENS_RTOL, atol=TOKENS_ATOL, err_msg=case)
        np.testing.assert_allclose(out[f"f{k}"], ref.tokens.f.numpy(), rtol=TOKENS_RTOL, atol=TOKENS_ATOL, err_msg=case)
        grey = np.abs(out[f"img{k}"].astype(int) - ref.images.astype(int)).max()
        assert grey <= GREY_LEVELS, f"{case}: images differ by {grey} grey levels"
    # guidance changes the result (so the CFG case is not the unguided one by accident)
    assert np.abs(out["g0"] - generator.sample_tokens([1, 5, 9], seed=11, texture_steps=6, cfg_scale=1.0).g.numpy()).max() > 1e-3


def _gaussian_target_network(mean_c: float, mean_u: float, s: float, null_class: int):
    """network(x, t, y, cond): the exact Linear-path velocity for x1 ~ N(m, s^2) per channel, x0 ~ N(0, 1),
    with m = mean_c on class rows and mean_u on null rows:
    E[x1 - x0 | x_t] = m + (t s^2 + t - 1) (x_t - t m) / (t^2 s^2 + (1 - t)^2)."""

    def network(x, t, y, cond):
        rows = np.where(np.asarray(y) == null_class, mean_u, mean_c).reshape(-1, 1, 1)
        m = core.ops_for(x).from_float32(rows, x)  # (B, 1, 1) in x's namespace and dtype
        tt = t.reshape(-1, 1, 1)
        var = tt * tt * (s * s) + (1 - tt) * (1 - tt)
        return m + (tt * (s * s) + tt - 1) * (x - tt * m) / var

    return network


@pytest.mark.parametrize("sampler,steps,cfg", [("sde", 40, 1.0), ("sde", 40, 1.7), ("heun", 20, 1.0), ("euler", 30, 1.4)])
def test_shared_sampler_code_gives_identical_numbers_under_torch_and_numpy(sampler, steps, cfg):
    s, null = 0.5, 4
    network = _gaussian_target_network(2.0, -1.0, s, null)
    results = {}
    for kind in ("numpy", "torch"):
        rng = core.pcg64(5)
        like = np.zeros((), np.float64) if kind == "numpy" else torch.zeros((), dtype=torch.float64)
        y = np.array([0, 1, 2] * 200, np.int64)
        y = y if kind == "numpy" else torch.from_numpy(y)
        z = stages.start_noise(rng, len(y), 2, 3, like)
        velocity = stages.guided_velocity(network, y, None, cfg, (0.2, 1.0), null)
        x = stages.sample_texture(velocity, z, rng, steps, sampler, cfg)
        results[kind] = np.asarray(x)
    # one source, two namespaces: the same float64 operations in the same order
    np.testing.assert_array_equal(results["numpy"], results["torch"], err_msg=f"{sampler} cfg {cfg}")
    # and the numbers are right: unguided, the samples follow the analytic target N(2, 0.5^2)
    if cfg == 1.0:
        x = results["numpy"]
        assert abs(x.mean() - 2.0) < 0.05 and abs(x.std() - s) < 0.05, f"{sampler}: mean {x.mean():.3f} std {x.std():.3f}"
    else:  # guided: the mean moves beyond the class mean, away from the null mean (u + s (c - u))
        assert results["numpy"].mean() > 2.05, f"{sampler} cfg {cfg}: mean {results['numpy'].mean():.3f}"


def test_velocity_graphs_match_torch_at_batch_1_and_3_and_fp16_stays_within_its_bound(exported, generator, tmp_path, capsys):
    import onnxruntime as ort
    from gpstoken_export.generator_export import export_generator, velocity_feeds
    from gpstoken_export.generator_parity import FP16_SCALE_ATOL, check_generator_export

    fp16 = export_generator(generator, tmp_path / "fp16", dtype="float16")
    worst = {}
    for name, model, with_cond in (("texture", generator.texture, True), ("layout", generator.layout, False)):
        s32 = ort.InferenceSession(str(exported / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        s16 = ort.InferenceSession(str(fp16 / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        for batch in (1, 3):
            feeds = velocity_feeds(model, batch, with_cond, seed=40 + batch)
            with torch.no_grad():
                ref = model(*(torch.from_numpy(feeds[k]) for k in ("x", "t", "y")), torch.from_numpy(feeds["cond"]) if with_cond else None).numpy()
            got32 = s32.run(None, feeds)[0]
            scale = float(np.abs(ref).max())
            np.testing.assert_allclose(got32, ref, rtol=1e-4, atol=1e-4 * scale, err_msg=f"{name} fp32 batch {batch}")
            got16 = s16.run(None, {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in feeds.items()})[0]
            dev = float(np.abs(got16.astype(np.float32) - ref).max()) / scale
            worst[name] = max(worst.get(name, 0.0), dev)
            assert dev <= FP16_SCALE_ATOL, f"{name} fp16 batch {batch}: deviation {dev:.3g} x scale"
    print(f"fp16 velocity deviation (max abs / output scale): {worst}")
    # the Comparator check passes on fp16 within its bound, and fails when the torch side differs
    assert check_generator_export(fp16, generator)
    with torch.no_grad():
        generator.texture.final_layer.linear.bias.add_(0.05)
    try:
        assert not check_generator_export(exported, generator), "the parity check must fail for another model"
    finally:
        with torch.no_grad():
            generator.texture.final_layer.linear.bias.sub_(0.05)
    assert "FAIL" in capsys.readouterr().out


def _edit(folder: Path, file: str, change) -> None:
    path = folder / file
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_generator_manifest_validates_and_rejects_mismatches(exported, tmp_path):
    from gpstoken_runtime import Generator, Tokenizer
    from gpstoken_core.manifest import read_generator_manifest

    manifest, tok = read_generator_manifest(exported)
    section = manifest["generator"]
    assert (section["kind"], section["num_classes"], section["null_class"], section["num_tokens"]) == ("two-stage", 10, 10, 128)
    assert section["channels"] == {"texture": 21, "layout": 5} and section["sampler_defaults"]["sampler"] == "sde"
    assert tok == exported / "tokenizer" and sorted(manifest["files"]) == ["layout", "texture"]

    def broken(name, change=None, file="manifest.json"):
        folder = tmp_path / name
        shutil.copytree(exported, folder)
        if change is not None:
            _edit(folder, file, change)
        return folder

    cases = {
        "tokens": (broken("tokens", lambda m: m.update(tokens_per_tile=64), "tokenizer/manifest.json"), ["generator.num_tokens", "tokens_per_tile 64"]),
        "channels": (broken("channels", lambda m: m.update(feature_channels=8), "tokenizer/manifest.json"), ["generator.feature_channels", "tokenizer"]),
        "texture channels": (broken("tch", lambda m: m["generator"]["channels"].update(texture=20)), ["generator.channels.texture", "21"]),
        "version": (broken("version", lambda m: m.update(version=3)), ["'version'", "3"]),
        "null": (broken("null", lambda m: m["generator"].update(null_class=3)), ["generator.null_class"]),
        "missing": (broken("missing", lambda m: m["generator"].pop("stats")), ["generator.stats"]),
    }
    damaged = broken("damaged")
    with open(damaged / "texture.onnx", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    cases["damaged"] = (damaged, ["texture.onnx", "SHA-256", "files.texture"])
    for case, (folder, words) in cases.items():
        with pytest.raises(ExportError) as err:
            Generator.load(folder)
        message = str(err.value)
        assert "\n" not in message and all(w in message for w in words), f"{case}: {message}"
        assert "manifest.json" in message or "texture.onnx" in message, f"{case}: the error names no file: {message}"
    with pytest.raises(ExportError, match="generator export"):
        Tokenizer.load(exported)
    with pytest.raises(ExportError, match="'generator' is missing"):
        Generator.load(exported / "tokenizer")
    gen = Generator.load(exported)
    # the tokenizer's options go to the tokenizer only (the velocity graphs' backend would refuse them)
    plain = Generator.load(exported, max_batch=2, winograd=False)
    assert plain.tokenizer.max_batch == 2 and all(g.winograd_convolutions == 0 for g in plain.tokenizer.graphs.values())
    assert gen.tokenizer.max_batch == 1
    with pytest.raises(ValueError, match=r"unknown class id\(s\) \[10\]"):
        gen.sample([1, 10], steps=2)
    with pytest.raises(ValueError, match="unknown sampler"):
        gen.sample([1], sampler="ddim")


def test_runtime_generate_cli_writes_images_and_names_bad_input(exported, tmp_path):
    from gpstoken_runtime.cli import main

    assert main(["generate", "--model", str(exported), "--class", "3", "--num", "2", "--seed", "4", "--steps", "3",
                 "--sampler", "euler", "--out", str(tmp_path / "out")]) == 0
    from PIL import Image

    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["class3_seed4_0.png", "class3_seed4_1.png"]
    from gpstoken_runtime import Generator

    expected = Generator.load(exported).sample([3, 3], seed=4, steps=3, sampler="euler")
    assert (np.asarray(Image.open(files[1])) == expected[1]).all()
    proc = subprocess.run([sys.executable, "-m", "gpstoken_runtime.cli", "generate", "--model", str(exported), "--class", "12"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown class id" in proc.stderr, proc.stderr
    assert gpstoken_main(["export-generator", "--model", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
