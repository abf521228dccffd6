"""The TensorRT path, as far as it runs without TensorRT or a GPU: the plugin's rules (C++, built with
CMake), CMake skipping the plugin cleanly, the ONNX the builder parses, optimization profiles, the
polygraphy plugin reference runner vs torch, float16 export, and the errors when TensorRT is absent.

The plugin library itself needs TensorRT's headers: with TRT_INCLUDE_DIR set (the include/ of
NVIDIA/TensorRT) and nvcc present, test_plugin_library_host_checks builds it and runs the host test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from gpstoken_export import build_engine, trt_parity
from gpstoken_export.export import export_model
from gpstoken_core.manifest import tensorrt_section, write_manifest
from gpstoken_export.splat_function import splat_nodes
from onnx import helper
from PIL import Image

import gpstoken
from gpstoken_core.imageio import bundled_photo, center_crop_resize

REPO = Path(__file__).resolve().parents[1]
SHIPPED = Path(gpstoken.__file__).parent / "weights" / "tiny"


def _configure(build: Path, *defines: str) -> str:
    proc = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build), "-DGPSTOKEN_TORCH_EXTENSION=OFF", "-DGPSTOKEN_PARTITION_MODULE=OFF",
         f"-DPython_EXECUTABLE={sys.executable}", *defines],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _build_and_run(build: Path, target: str, *args: str) -> str:
    proc = subprocess.run(["cmake", "--build", str(build), "--target", target], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = subprocess.run([str(build / target), *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_plugin_rules_and_cmake_skip_without_tensorrt(tmp_path):
    """The plugin's field/format/shape/serialization rules (C++) pass their checks, and CMake says why it
    skips the plugin when TensorRT's headers are absent (CI has none)."""
    log = _configure(tmp_path / "build", "-DGPSTOKEN_CUDA=OFF", "-DTRT_INCLUDE_DIR=/nonexistent", "-DTensorRT_ROOT=/nonexistent")
    if "TensorRT headers not found" not in log:  # headers installed system-wide: CUDA is off, so that reason
        assert "the CUDA kernels are not built" in log, log
    assert "building libgpstoken_trt" not in log
    out = _build_and_run(tmp_path / "build", "gpstoken_trt_rules_test")
    assert "all GaussianSplat plugin rule checks passed" in out


@pytest.mark.skipif(not os.environ.get("TRT_INCLUDE_DIR") or not shutil.which("nvcc"),
                    reason="needs TensorRT's headers (TRT_INCLUDE_DIR=/path/to/TensorRT/include) and nvcc")
def test_plugin_library_host_checks(tmp_path):
    """Builds both plugin libraries against TensorRT's headers (warnings are errors), drives the
    getCreators one through TensorRT's interfaces and checks that only the other one self-registers
    (once), without libnvinfer or a GPU."""
    log = _configure(tmp_path / "build", "-DGPSTOKEN_CUDA=ON", f"-DTRT_INCLUDE_DIR={os.environ['TRT_INCLUDE_DIR']}",
                     "-DCMAKE_CUDA_ARCHITECTURES=75;90")  # fmt: skip
    assert "building libgpstoken_trt" in log
    build = tmp_path / "build"
    out = _build_and_run(build, "gpstoken_trt_host_test", str(build / "libgpstoken_trt.so"), str(build / "libgpstoken_trt_selfregister.so"))
    assert "all GaussianSplat plugin host checks passed" in out
    # the CUDA runtime is linked statically, so the plugin loads next to pip TensorRT wheels
    for library in ("libgpstoken_trt.so", "libgpstoken_trt_selfregister.so"):
        needed = subprocess.run(["readelf", "-d", str(build / library)], capture_output=True, text=True, check=True).stdout
        assert "libcudart" not in needed, needed


# ---- the exported ONNX as the builder sees it --------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return gpstoken.GPSTokenizer.from_pretrained(SHIPPED).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    return export_model(model, tmp_path_factory.mktemp("trt") / "tiny")


@pytest.fixture(scope="module")
def photos():
    return np.stack([center_crop_resize(bundled_photo(n), 256) for n in ("astronaut", "coffee")])


def test_onnx_for_tensorrt_has_the_bare_plugin_node(exported):
    model = build_engine.onnx_for_tensorrt(exported / "decoder.onnx")
    assert not model.functions
    (node,) = splat_nodes(model)
    non_standard = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert non_standard == [node] and node.op_type == "GaussianSplat"
    attrs = {a.name: a for a in node.attribute}
    # TensorRT's parser maps INT -> kINT32 and FLOAT -> kFLOAT32, the types the plugin's creator advertises
    assert attrs["height"].type == onnx.AttributeProto.INT and attrs["width"].type == onnx.AttributeProto.INT
    assert attrs["support"].type == onnx.AttributeProto.FLOAT
    assert (attrs["height"].i, attrs["width"].i) == (64, 64)  # the tiny decoder's map for 256x256 (x4 upsampling)
    assert attrs["support"].f == pytest.approx(gpstoken.GPSTokenizer.from_pretrained(SHIPPED).config.support)
    # the graph the engine is built from is otherwise untouched and valid
    onnx.checker.check_model(model)
    assert len(model.graph.node) == len(onnx.load(str(exported / "decoder.onnx")).graph.node)
    # the folder's own decoder.onnx keeps its function (ONNX Runtime still runs it)
    assert onnx.load(str(exported / "decoder.onnx")).functions


def test_optimization_profiles(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    profiles = build_engine.optimization_profiles(manifest, max_batch=8, opt_batch=2)
    assert profiles["decoder"]["g"] == ((1, 1, 5), (2, 128, 5), (8, 256, 5))
    assert profiles["decoder"]["f"] == ((1, 1, 16), (2, 128, 16), (8, 256, 16))
    assert profiles["encoder"]["image"] == ((1, 3, 16, 16), (2, 3, 256, 256), (8, 3, 256, 256))  # tiles of 16..256
    assert profiles["encoder"]["boxes"] == ((1, 1, 4), (2, 128, 4), (8, 256, 4))
    # 512x512 merged decoding: 4 tiles -> the encoder sees 4x the batch, the decoder 4x the tokens
    merged = json.loads(json.dumps(manifest))
    merged["sizes"] = [[512, 512]]
    merged["files"]["decoder_512x512_grid2x2"] = {**merged["files"]["decoder"], "image_size": [512, 512], "grid": [2, 2]}
    p = build_engine.optimization_profiles(merged, max_batch=2, max_tokens=128)
    assert p["encoder"]["g_init"] == ((1, 1, 5), (4, 128, 5), (8, 128, 5))
    assert p["decoder_512x512_grid2x2"]["g"] == ((1, 1, 5), (1, 512, 5), (2, 512, 5))
    assert p["decoder"]["g"] == ((1, 1, 5), (1, 128, 5), (2, 128, 5))  # the single-tile decoder of the same export
    with pytest.raises(ValueError, match="max_tokens"):
        build_engine.optimization_profiles(manifest, max_tokens=64)
    with pytest.raises(ValueError, match="opt_batch"):
        build_engine.optimization_profiles(manifest, max_batch=2, opt_batch=4)


# ---- polygraphy's plugin reference runner vs torch ----------------------------------------------------
def test_numpy_reference_equals_the_splat_op():
    """The NumPy GaussianSplat registered with polygraphy is independent of the C++ op; they agree on
    random tokens with tiny sigmas, |rho| near 1 and centres off the image."""
    gen = torch.Generator().manual_seed(3)
    g = torch.rand(2, 40, 5, generator=gen, dtype=torch.float64)
    g[..., :2] = g[..., :2] * 0.3 + 1e-4
    g[..., 2] = (g[..., 2] * 2 - 1) * 0.999999
    g[..., 3:] = g[..., 3:] * 3 - 1.5
    f = torch.randn(2, 40, 6, generator=gen, dtype=torch.float64)
    ours = trt_parity.splat_numpy(g.numpy(), f.numpy(), 20, 28, 3.0)
    op = gpstoken.splat(g, f, (20, 28), 3.0).numpy()
    np.testing.assert_allclose(ours, op, rtol=1e-10, atol=1e-12)
    assert np.isfinite(ours).all()


def test_pluginref_runner_matches_torch_and_can_fail(exported, model, photos, tmp_path):
    attrs = trt_parity.write_parity_data(exported, model, tmp_path, photos)
    assert attrs["height"] == 64
    for name in ("splat.onnx", "splat_inputs.json", "splat_outputs.json", "decoder.trt.onnx", "decoder_inputs.json",
                 "decoder_outputs.json"):  # fmt: skip
        assert (tmp_path / name).exists(), name
    assert not onnx.load(str(tmp_path / "decoder.trt.onnx")).functions
    assert trt_parity.check_with_pluginref(tmp_path)
    # polygraphy accepts the GPU recipe's command lines (it writes their Python script instead of running TensorRT)
    recipe = tmp_path / "run_on_gpu.sh"
    shim = 'polygraphy() { command polygraphy "$@" --gen-script "$(mktemp)"; }; export -f polygraphy; bash "$0" "$1"'
    proc = subprocess.run(["bash", "-c", shim, str(recipe), str(tmp_path / "libgpstoken_trt_selfregister.so")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert recipe.read_text().count("--trt --plugins") == 2 and "g:[2,128,5]" in recipe.read_text()
    # a wrong support factor in the node must be caught
    splat = onnx.load(str(tmp_path / "splat.onnx"))
    for a in splat.graph.node[0].attribute:
        if a.name == "support":
            a.f = 2.0
    onnx.save(splat, str(tmp_path / "splat.onnx"))
    assert not trt_parity.check_with_pluginref(tmp_path)


# ---- float16 export ---------------------------------------------------------------------------------
def test_float16_export_runs_and_stays_close(model, photos, tmp_path):
    out = export_model(model, tmp_path / "fp16", dtype="float16")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "float16"
    for graph in ("encoder", "decoder"):
        io = manifest["files"][graph]
        assert {v["dtype"] for v in io["inputs"].values()} == {"float16"}
        assert {v["dtype"] for v in io["outputs"].values()} == {"float16"}
    decoder = onnx.load(str(out / "decoder.onnx"))
    (node,) = splat_nodes(decoder)
    types = {v.name: v.type.tensor_type.elem_type for v in list(decoder.graph.value_info) + list(decoder.graph.input)}
    assert all(types[name] == onnx.TensorProto.FLOAT16 for name in node.input)  # the plugin gets fp16 tensors
    float32_weights = [i.name for i in decoder.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 16]
    assert not float32_weights
    from gpstoken_runtime import Tokenizer

    got = Tokenizer.load(out).reconstruct(photos).astype(int)
    with torch.inference_mode():
        ref = gpstoken.to_uint8(model.reconstruct(photos)).astype(int)
    diff = np.abs(got - ref)
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())


def test_float16_splat_function_accumulates_in_float32():
    """The model-local function on float16 inputs equals the float64 reference rounded once to float16."""
    import onnxruntime as ort

    from gpstoken_export.splat_function import add_splat_function

    node = helper.make_node("GaussianSplat", ["g", "f"], ["out"], domain="gpstoken", height=16, width=16, support=3.0)
    graph = helper.make_graph([node], "s", [helper.make_tensor_value_info("g", onnx.TensorProto.FLOAT16, [2, 30, 5]),
                              helper.make_tensor_value_info("f", onnx.TensorProto.FLOAT16, [2, 30, 8])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT16, None)])  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("gpstoken", 1)])
    add_splat_function(m)
    rng = np.random.default_rng(0)
    g = np.concatenate([rng.uniform(0.05, 0.4, (2, 30, 2)), rng.uniform(-0.9, 0.9, (2, 30, 1)),
                        rng.uniform(-1, 1, (2, 30, 2))], -1).astype(np.float16)  # fmt: skip
    f = rng.normal(size=(2, 30, 8)).astype(np.float16)
    out = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"g": g, "f": f})[0]
    assert out.dtype == np.float16
    ref = trt_parity.splat_numpy(g.astype(np.float64), f.astype(np.float64), 16, 16, 3.0)
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=2e-3, atol=2e-3)


# ---- without TensorRT: clear errors --------------------------------------------------------------------
def test_tensorrt_backend_errors_name_what_is_missing(exported, tmp_path, capsys):
    from gpstoken_runtime import ExportError, Tokenizer
    from gpstoken_runtime.backends.tensorrt import (
        EngineMismatch,
        TensorRTUnavailable,
        check_engine_compatibility,
        find_plugin_library,
    )

    with pytest.raises(ExportError, match="no 'tensorrt' section.*gpstoken export --tensorrt"):
        Tokenizer.load(exported, backend="tensorrt")
    with pytest.raises(TensorRTUnavailable, match="does not exist.*--target gpstoken_trt"):
        find_plugin_library(tmp_path / "missing.so")

    section = {"version": "11.1.0.106", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    check_engine_compatibility(section, "11.1.0.106", "NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(EngineMismatch, match="tensorrt.version.*TensorRT 11.1.0.106, this is 11.4.0"):
        check_engine_compatibility(section, "11.4.0.1", "NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(EngineMismatch, match="built on NVIDIA H100.*this GPU is NVIDIA A100"):
        check_engine_compatibility(section, "11.1.0.106", "NVIDIA A100-SXM4-40GB", (8, 0))
    with pytest.raises(EngineMismatch, match="no 'tensorrt' section"):
        check_engine_compatibility(None, "11.1.0", "x", (9, 0))

    # Feeds are checked against the engine's profile and dtypes before anything reaches TensorRT.
    from gpstoken_runtime.backends.tensorrt import TensorRTBackend

    backend = object.__new__(TensorRTBackend)  # the checks need only the engine's recorded profile and dtypes
    backend.dtypes = {"g": np.float16}
    backend.profile = {"g": ((1, 1, 5), (1, 128, 5), (8, 256, 5))}
    backend._check_feed("g", np.zeros((8, 256, 5), np.float16))  # the largest shape of the profile passes
    with pytest.raises(ValueError, match=r"shape \(9, 128, 5\) is outside .*min \(1, 1, 5\), max \(8, 256, 5\).*--max-batch"):
        backend._check_feed("g", np.zeros((9, 128, 5), np.float16))
    with pytest.raises(ValueError, match="outside"):
        backend._check_feed("g", np.zeros((1, 128), np.float16))
    with pytest.raises(ValueError, match="dtype float32, the engine takes float16"):
        backend._check_feed("g", np.zeros((1, 128, 5), np.float32))

    # A folder with engines recorded: damaged engine -> named; TensorRT absent -> what to install.
    folder = tmp_path / "with_engines"
    shutil.copytree(exported, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for graph in ("encoder", "decoder"):
        (folder / f"{graph}.engine").write_bytes(b"not an engine " + graph.encode())
    engines = {g: folder / f"{g}.engine" for g in ("encoder", "decoder")}
    manifest["tensorrt"] = tensorrt_section("11.1.0", "GPU", (9, 0), Path("libgpstoken_trt.so"), {}, engines)
    write_manifest(folder, manifest)
    script = f"""
import sys
sys.modules["tensorrt"] = None
from gpstoken_runtime import Tokenizer
from gpstoken_runtime.backends.tensorrt import TensorRTUnavailable
try:
    Tokenizer.load({str(folder)!r}, backend="tensorrt")
except TensorRTUnavailable as err:
    print("ERR", err)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ERR" in proc.stdout and "pip install tensorrt" in proc.stdout and "backend='onnxruntime'" in proc.stdout
    from gpstoken_runtime.cli import main as runtime_cli

    Image.fromarray(center_crop_resize(bundled_photo("coffee"), 256)).save(tmp_path / "c.png")
    assert runtime_cli(["reconstruct", str(tmp_path / "c.png"), "--model", str(exported), "--backend", "tensorrt"]) == 2
    assert "no 'tensorrt' section" in capsys.readouterr().err
    (folder / "decoder.engine").write_bytes(b"changed")
    with pytest.raises(ExportError, match="decoder.engine: its SHA-256 differs"):
        Tokenizer.load(folder, backend="tensorrt")
    (folder / "decoder.engine").unlink()
    with pytest.raises(ExportError, match="decoder.engine: missing"):
        Tokenizer.load(folder, backend="tensorrt")


def test_export_tensorrt_flag_without_tensorrt_keeps_the_onnx_export(tmp_path):
    script = "import sys; sys.modules['tensorrt'] = None; from gpstoken.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "exp"
    proc = subprocess.run(
        [sys.executable, "-c", script, "export", "--out", str(out), "--tensorrt", "--plugin", str(tmp_path / "nope.so")],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "the ONNX export" in proc.stderr and "is complete" in proc.stderr and "plugin library not found" in proc.stderr
    assert {p.name for p in out.iterdir()} == {"encoder.onnx", "decoder.onnx", "manifest.json"}
    # the standalone builder says the same, with exit code 2
    proc = subprocess.run([sys.executable, "-m", "gpstoken_export.build_engine", str(out), "--plugin", str(tmp_path / "nope.so")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "plugin library not found" in proc.stderr


def test_tensorrt_backend_data_path_with_stand_in_tensorrt(exported, photos, tmp_path, monkeypatch):
    """The TensorRT backend's own logic (engine I/O discovery, pinned and device buffers, copies, shapes,
    profile checks, CUDA-graph capture and replay) on stand-ins for tensorrt and cuda.bindings whose
    "engines" run the exported ONNX with ONNX Runtime from the addresses the backend sets: the
    reconstructions equal the ONNX Runtime backend's. (TensorRT itself is not exercised.)"""
    import fake_tensorrt
    from gpstoken_runtime import Tokenizer
    from gpstoken_runtime.backends.tensorrt import EngineMismatch, TensorRTBackend

    state = fake_tensorrt.install(monkeypatch)
    folder = tmp_path / "engines"
    shutil.copytree(exported, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    profiles = build_engine.optimization_profiles(manifest, max_batch=2)
    engines = {}
    for graph in ("encoder", "decoder"):
        engines[graph] = folder / f"{graph}.engine"
        engines[graph].write_bytes(fake_tensorrt.engine_bytes(folder / f"{graph}.onnx", profiles[graph]))
    plugin = tmp_path / "libgpstoken_trt.so"
    plugin.write_bytes(b"\x7fELF")
    manifest["tensorrt"] = tensorrt_section(fake_tensorrt.VERSION, *fake_tensorrt.GPU, plugin, profiles, engines)
    write_manifest(folder, manifest)

    reference = Tokenizer.load(folder).reconstruct(photos).astype(int)  # ONNX Runtime backend
    plain = Tokenizer.load(folder, backend="tensorrt", plugin_library=plugin)
    assert np.abs(plain.reconstruct(photos).astype(int) - reference).max() <= 1
    assert state.graph_launches == 0 and state.executions == 2  # one encoder tile batch, one decoder run

    calls = len(state.device_calls)
    plain.reconstruct(photos)
    assert len(state.device_calls) >= calls + 2  # the device is set on every run (threads, several GPUs)

    state.executions = 0
    contexts = state.contexts
    graphs = Tokenizer.load(folder, backend="tensorrt", plugin_library=plugin, cuda_graph=True)
    for batch in (photos, photos, photos[:1], photos, photos[:1]):
        assert np.abs(graphs.reconstruct(batch).astype(int) - reference[: len(batch)]).max() <= 1
    # Per graph (encoder, decoder) and shape: the first call runs plainly, the second captures and replays,
    # later ones replay; every call runs the network once. One execution context per shape and graph.
    assert state.executions == 5 * 2
    assert state.captures == 2 * 2 and state.graph_launches == 3 * 2
    assert state.contexts - contexts == 2 * 2
    assert state.graphs_destroyed == 4  # captured graphs are freed once instantiated
    streams = len(state.streams)
    del graphs
    import gc

    gc.collect()
    assert state.execs_destroyed == 4 and len(state.streams) == streams - 2  # 2 shapes x 2 graphs; 2 streams

    # A failing capture leaves the stream out of capture mode and says so.
    backend = TensorRTBackend(folder / "decoder.engine", plugin_library=plugin, cuda_graph=True)
    feeds = {name: np.zeros(backend.profile[name][1], dtype=backend.dtypes[name]) for name in backend.input_names}
    backend.run(feeds)  # plain first run
    monkeypatch.setattr(fake_tensorrt.FakeContext, "execute_async_v3", lambda self, stream: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        backend.run(feeds)
    assert all(s.capturing is None for s in state.streams.values())

    with pytest.raises(ValueError, match="outside the engine's optimization profile.*--max-batch"):
        plain.reconstruct(np.concatenate([photos, photos[:1]]))  # batch 3 > the profile's 2

    manifest["tensorrt"]["gpu"] = "Another GPU"
    write_manifest(folder, manifest)
    with pytest.raises(EngineMismatch, match="built on Another GPU.*this GPU is Fake GPU"):
        Tokenizer.load(folder, backend="tensorrt", plugin_library=plugin)
