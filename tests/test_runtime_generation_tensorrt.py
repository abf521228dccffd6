"""The runtime generator's TensorRT path on the CPU stand-ins of tests/fake_tensorrt.py: "engines" that run the
exported ONNX with ONNX Runtime from the addresses the backend sets, "device" memory that is host memory,
NVRTC kernels whose effect the stand-in applies. What is checked is the backend's and the sampler's own logic:
the tokens equal the ONNX Runtime generator's, the sampler state stays on the device (host copies per
generation do not grow with the step count), each step shape is captured once and replayed, and every
velocity call runs its network once. TensorRT and the GPU themselves run in benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from generation_helpers import tiny_two_stage_generator
from gpstoken_export import build_engine
from gpstoken_export.generator_export import export_generator

from gpstoken_core.manifest import read_generator_manifest, read_manifest, tensorrt_section, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_generator(tiny_two_stage_generator(), tmp_path_factory.mktemp("gen") / "export")


def with_fake_engines(fake_tensorrt, folder: Path, plugin: Path, max_batch: int = 4) -> None:
    """Engines for the velocity graphs and the tokenizer export, recorded as build_engine would."""
    manifest, tok_folder = read_generator_manifest(folder)
    for where, m, profiles in (
        (folder, manifest, build_engine.generator_profiles(manifest, max_batch)),
        (tok_folder, read_manifest(tok_folder), None),
    ):
        profiles = profiles or build_engine.optimization_profiles(m, max_batch=max_batch)
        engines = {}
        for graph, entry in m["files"].items():
            engines[graph] = where / f"{graph}.engine"
            engines[graph].write_bytes(fake_tensorrt.engine_bytes(where / entry["path"], profiles[graph]))
        m["tensorrt"] = tensorrt_section(fake_tensorrt.VERSION, *fake_tensorrt.GPU, plugin, profiles, engines)
        write_manifest(where, m)


def test_generator_profiles_double_the_batch_for_guidance(exported):
    manifest, _ = read_generator_manifest(exported)
    profiles = build_engine.generator_profiles(manifest, max_batch=4, opt_batch=2)
    assert set(profiles) == {"texture", "layout"}
    assert profiles["texture"]["x"] == ((1, 128, 21), (4, 128, 21), (8, 128, 21))
    assert profiles["texture"]["cond"] == ((1, 128, 5), (4, 128, 5), (8, 128, 5))
    assert profiles["layout"]["y"] == ((1,), (4,), (8,))
    with pytest.raises(ValueError, match="opt_batch"):
        build_engine.generator_profiles(manifest, max_batch=2, opt_batch=3)


CASES = [("sde", 5, 1.5), ("heun", 3, 1.0)]


def test_tensorrt_generator_keeps_the_state_on_the_device_and_replays_graphs(exported, tmp_path, monkeypatch):
    import fake_tensorrt
    from gpstoken_runtime import Generator

    folder = tmp_path / "export"
    shutil.copytree(exported, folder)
    plugin = tmp_path / "libgpstoken_trt.so"
    plugin.write_bytes(b"\x7fELF")
    reference = Generator.load(folder, winograd=False)  # ONNX Runtime, host sampling, the files' graphs as the engines hold them
    expected = {case: reference.sample_tokens([1, 4, 7], seed=3, sampler=case[0], steps=case[1], cfg_scale=case[2],
                                              layout_steps=2) for case in CASES}
    images = reference.sample([1, 4, 7], seed=3, steps=5, layout_steps=2)

    state = fake_tensorrt.install(monkeypatch)
    with_fake_engines(fake_tensorrt, folder, plugin)
    gen = Generator.load(folder, backend="tensorrt", plugin_library=plugin)
    assert gen.device_context() is not None
    for case in CASES:
        tokens = gen.sample_tokens([1, 4, 7], seed=3, sampler=case[0], steps=case[1], cfg_scale=case[2], layout_steps=2)
        # The same ONNX graphs, and the step kernels do numpy's float32 operations one by one (x / (1 - t) a
        # true division): equal to the bit here. On a GPU, FMA contraction may change the last bits.
        np.testing.assert_array_equal(tokens.g, expected[case].g, err_msg=str(case))
        np.testing.assert_array_equal(tokens.f, expected[case].f, err_msg=str(case))
        np.testing.assert_array_equal(tokens.g_init, expected[case].g_init)  # calibration on the host, same layout
    assert np.abs(gen.sample([1, 4, 7], seed=3, steps=5, layout_steps=2).astype(int) - images.astype(int)).max() == 0

    # Host copies of one generation do not depend on the step count: the state never leaves the device.
    def run(steps: int) -> dict:
        before = dict(state.copies), sum(state.kernels.values()), state.graph_launches, state.executions
        gen.sample_tokens([2, 5], seed=1, sampler="sde", steps=steps, cfg_scale=1.5, layout_steps=3)
        copies = {k: state.copies[k] - before[0].get(k, 0) for k in ("cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost")}
        return {"copies": copies, "kernels": sum(state.kernels.values()) - before[1],
                "replays": state.graph_launches - before[2], "executions": state.executions - before[3]}

    few, many = run(4), run(12)
    assert few["copies"] == many["copies"], (few, many)
    assert many["copies"]["cudaMemcpyDeviceToHost"] == 2  # the layout (to calibrate) and the tokens, once each
    assert many["kernels"] > few["kernels"]  # the step updates are device kernels
    # 4 rows (2 images, CFG) is a new shape: its first call runs plainly, the next is captured, then replays.
    # Layout: Heun, 3 steps = 6 calls; texture: SDE, one call per step. Each call runs its network once.
    assert few["replays"] == (6 - 1) + (4 - 1) and few["executions"] == 6 + 4
    assert many["replays"] == 6 + 12 and many["executions"] == 6 + 12
    rows = sorted(key[0][0] for key in gen.graphs["texture"].graphs)  # x's batch of each captured shape
    assert rows == [3, 4, 6]  # 3 images without CFG, 2 and 3 images with CFG


def test_sampler_kernels_compile_with_nvcc(tmp_path):
    """The NVRTC source is plain CUDA C++: nvcc compiles it for the architectures we ship."""
    from gpstoken_runtime.backends.cuda_arrays import KERNEL_SOURCE, KERNELS

    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        pytest.skip("nvcc is not installed (CI compiles it)")
    src = tmp_path / "arrays.cu"
    src.write_text(KERNEL_SOURCE)
    for arch in ("sm_75", "sm_90"):
        proc = subprocess.run([nvcc, "-ptx", f"-arch={arch}", "-std=c++17", str(src), "-o", str(tmp_path / f"{arch}.ptx")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        ptx = (tmp_path / f"{arch}.ptx").read_text()
        assert all(f".entry {name}(" in ptx for name in KERNELS), arch


def test_noise_drawn_in_one_block_equals_step_by_step_draws():
    from gpstoken_core import sampling

    step_by_step = sampling.pcg64_draw(sampling.pcg64(7), rows=6)
    block = sampling.pcg64_predrawn(sampling.pcg64(7), 6, 5)
    for shape in [(6, 4, 3), (3, 4, 3), (6, 4, 3), (3, 4, 3), (6, 4, 3)]:
        np.testing.assert_array_equal(block(shape), step_by_step(shape))
    with pytest.raises(ValueError, match="used up"):
        block((6, 4, 3))


def test_polygraphy_recipe_for_the_velocity_engines_checks_out_on_onnxruntime(exported, tmp_path):
    from gpstoken_export.generator_parity import check_velocity_recipe, write_velocity_recipe
    from polygraphy.comparator import RunResults

    generator = tiny_two_stage_generator()  # the exported weights (the helper is seeded)
    script = write_velocity_recipe(exported, generator, tmp_path / "parity")
    text = script.read_text()
    assert "polygraphy run texture.onnx --trt" in text and "polygraphy run layout.onnx --trt" in text
    assert "--trt-min-shapes x:[3,128,21] t:[3] y:[3] cond:[3,128,5]" in text and "--plugins" not in text
    assert check_velocity_recipe(tmp_path / "parity")
    # the check can fail: torch outputs that are off by 1% are refused
    path = tmp_path / "parity" / "texture_outputs.json"
    results = RunResults.load(str(path))
    for _, iterations in results.items():
        for it in iterations:
            it["v"] = it["v"] * 1.01 + 0.01
    results.save(str(path))
    assert not check_velocity_recipe(tmp_path / "parity")


def test_export_generator_tensorrt_without_tensorrt_keeps_the_onnx_export(tmp_path):
    import sys

    model = tmp_path / "model"
    tiny_two_stage_generator().save_pretrained(model)
    script = "import sys; sys.modules['tensorrt'] = None; from gpstoken.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-c", script, "export-generator", "--model", str(model), "--out", str(out),
                           "--tensorrt", "--plugin", str(tmp_path / "nope.so")], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "the ONNX export" in proc.stderr and "is complete" in proc.stderr and "plugin library not found" in proc.stderr
    assert (out / "texture.onnx").exists() and (out / "tokenizer" / "manifest.json").exists()
    assert not list(out.rglob("*.engine"))


def test_large_velocity_graphs_keep_their_weights_in_external_data(exported, tmp_path, monkeypatch):
    """SiT-XL/2-gs has 2.7 GB of float32 weights, above protobuf's 2 GiB: those graphs keep the weights in
    NAME.onnx.data, hashed in the manifest. Forced here on the tiny generator with a zero threshold."""
    from gpstoken_export import generator_export
    from gpstoken_runtime import Generator

    from gpstoken_core.manifest import ExportError

    monkeypatch.setattr(generator_export, "EXTERNAL_DATA_BYTES", 0)
    folder = export_generator(tiny_two_stage_generator(), tmp_path / "big")
    manifest, _ = read_generator_manifest(folder)
    for name in ("texture", "layout"):
        data = manifest["files"][name]["external_data"]
        assert data["path"] == f"{name}.onnx.data" and (folder / data["path"]).stat().st_size > 100_000
        assert (folder / f"{name}.onnx").stat().st_size < 100_000  # the graph alone
    ours = Generator.load(folder).sample_tokens([2, 6], seed=4, steps=4)
    inline = Generator.load(exported).sample_tokens([2, 6], seed=4, steps=4)
    np.testing.assert_array_equal(ours.f, inline.f)
    np.testing.assert_array_equal(ours.g, inline.g)
    with open(folder / "texture.onnx.data", "r+b") as fh:  # a damaged weights file is named
        fh.seek(1000)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(ExportError, match=r"texture\.onnx\.data.*files\.texture\.external_data\.sha256"):
        Generator.load(folder)
