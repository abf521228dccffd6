"""ONNX export: the GaussianSplat node + model-local function, encoder and decoder graphs in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from gpstoken_export.onnx_export import export_decoder, export_encoder
from gpstoken_export.splat_function import DOMAIN, ONNX_OPSET, OP_TYPE, add_splat_function, drop_splat_function, splat_nodes
from onnx import TensorProto, helper

import gpstoken
from gpstoken_core.imageio import bundled_photo, center_crop_resize


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _one_node_model(height, width, support, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    node = helper.make_node(OP_TYPE, ["g", "f"], ["y"], domain=DOMAIN, height=height, width=width, support=support)
    graph = helper.make_graph(
        [node], "splat",
        [helper.make_tensor_value_info("g", dtype, ["B", "L", 5]), helper.make_tensor_value_info("f", dtype, ["B", "L", "C"])],
        [helper.make_tensor_value_info("y", dtype, ["B", "C", height, width])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, 1)])
    return add_splat_function(model)


def _random_tokens(b, n, c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(b, n, 5, generator=gen, dtype=torch.float64)
    g[..., :2] = g[..., :2] * 0.3 + 0.01
    g[..., 2] = g[..., 2] * 1.9 - 0.95
    g[..., 3:] = g[..., 3:] * 2.6 - 1.3  # some centres off the image
    return g, torch.randn(b, n, c, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(1, 1, 3, 8, 8, 3.0), (2, 17, 4, 24, 40, 3.0), (3, 40, 16, 32, 32, 5.0)])
def test_function_body_equals_the_reference_splat(shape):
    b, n, c, h, w, s = shape
    model = _one_node_model(h, w, s)
    onnx.checker.check_model(model, full_check=True)
    g, f = _random_tokens(b, n, c)
    out = _session(model).run(None, {"g": g.float().numpy(), "f": f.float().numpy()})[0]
    ref = gpstoken.splat_reference(g, f, (h, w), s).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_dropping_the_function_leaves_the_bare_node():
    model = onnx.shape_inference.infer_shapes(_one_node_model(16, 24, 3.0))
    drop_splat_function(model)
    assert not model.functions
    onnx.checker.check_model(model, full_check=True)
    (node,) = splat_nodes(model)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"height": 16, "width": 24, "support": pytest.approx(3.0)}
    standard = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert standard == [node]
    with pytest.raises(Exception, match="GaussianSplat"):
        _session(model)  # ORT needs the function (or the custom-op library)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = gpstoken.GPSTokenizer("tiny").eval()
    with torch.no_grad():
        m.encoder.to_delta.weight.normal_(0, 0.02)
    return m


@pytest.fixture(scope="module")
def photos():
    return np.stack([center_crop_resize(bundled_photo(n), 256) for n in ("coffee", "chelsea", "rocket")])


@pytest.mark.parametrize("batch", [1, 3])
def test_decoder_onnx_matches_torch(model, photos, tmp_path_factory, batch):
    path = tmp_path_factory.getbasetemp() / "decoder.onnx"
    if not path.exists():
        exported = export_decoder(model, path)
        (node,) = splat_nodes(exported)
        assert {a.name for a in node.attribute} == {"height", "width", "support"}
    with torch.inference_mode():
        tokens = model.encode(photos[:batch], 100)  # another token count than at export: L is dynamic
        ref = model.decode(tokens).numpy()
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"g": tokens.g.numpy(), "f": tokens.f.numpy()})[0]
    assert out.shape == (batch, 3, 256, 256)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("batch", [1, 3])
def test_encoder_onnx_matches_torch(model, photos, tmp_path_factory, batch):
    path = tmp_path_factory.getbasetemp() / "encoder.onnx"
    if not path.exists():
        exported = export_encoder(model, path)
        assert "RoiAlign" in {n.op_type for n in exported.graph.node}
    x, rgb = model.prepare(photos[:batch])
    parts = model.partition(rgb, 100)
    g0 = np.stack([p.g_init for p in parts])
    boxes = np.stack([p.boxes for p in parts]).astype(np.float32)
    with torch.inference_mode():
        g, f = model.encoder(x, torch.from_numpy(g0), torch.from_numpy(boxes))
    og, of = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy(), "g_init": g0, "boxes": boxes}
    )
    np.testing.assert_allclose(og, g.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(of, f.numpy(), rtol=1e-4, atol=1e-4 * np.abs(f.numpy()).max())


def test_export_command_writes_a_complete_folder(tmp_path, photos):
    import json
    import subprocess
    import sys

    from gpstoken_core.files import sha256_file as sha256

    result = subprocess.run(
        [sys.executable, "-m", "gpstoken.cli", "export", "--out", str(tmp_path / "exp")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert manifest["custom_op"]["domain"] == "gpstoken" and manifest["decode_mode"] == "tiles"  # the shipped model's
    for entry in manifest["files"].values():
        assert sha256(tmp_path / "exp" / entry["path"]) == entry["sha256"]
    assert manifest["files"]["decoder"]["outputs"]["image"]["shape"][1] == 3
    # the exported shipped model reconstructs like the torch model
    model = gpstoken.GPSTokenizer.from_pretrained(Path(gpstoken.__file__).parent / "weights" / "tiny")
    with torch.inference_mode():
        tokens = model.encode(photos[:1])
        ref = model.decode(tokens).numpy()
    dec = ort.InferenceSession(str(tmp_path / "exp" / "decoder.onnx"), providers=["CPUExecutionProvider"])
    out = dec.run(None, {"g": tokens.g.numpy(), "f": tokens.f.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # a second export into the same folder is refused, and leaves it untouched
    again = subprocess.run(
        [sys.executable, "-m", "gpstoken.cli", "export", "--out", str(tmp_path / "exp")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 2 and "not empty" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_merged_high_resolution_decoder(model, tmp_path):
    from gpstoken_export.onnx_export import export_decoder

    image = center_crop_resize(bundled_photo("astronaut"), 512)
    with torch.inference_mode():
        tokens = model.encode(image)
        ref = model.decode(tokens, "merged").numpy()
    export_decoder(model, tmp_path / "d512.onnx", (512, 512), 512, grid=(2, 2))
    out = ort.InferenceSession(str(tmp_path / "d512.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"g": tokens.image_g().numpy(), "f": tokens.f.numpy()}
    )[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _splat_graph(dtype, tokens: int, size: int, support: float = 40.0) -> ort.InferenceSession:
    from onnx import TensorProto, helper

    from gpstoken_export.splat_function import DOMAIN, DOMAIN_VERSION, ONNX_OPSET, OP_TYPE, add_splat_function

    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    node = helper.make_node(OP_TYPE, ["g", "f"], ["out"], domain=DOMAIN, height=size, width=size, support=support)
    graph = helper.make_graph([node], "splat", [helper.make_tensor_value_info("g", elem, [1, tokens, 5]),
                              helper.make_tensor_value_info("f", elem, [1, tokens, 1])],
                              [helper.make_tensor_value_info("out", elem, None)])  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    add_splat_function(m)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def test_splat_function_is_cancellation_free_and_clamps_float16():
    """The ONNX function computes the header's cancellation-free exponent (float32 at rho = +-0.999999 within
    1e-5 of float64 where the weight is > 1e-4) and, for float16 inputs only, clamps |rho| = 1 and sigma = 0
    (what float16 rounding makes of 0.99999 and 1e-8) to the nearest finite float16 values."""
    size = 65
    xs = np.linspace(-1, 1, size)
    a, b = xs[None, :] / 0.5, xs[:, None] / 0.5

    def closed_form(rho):
        return np.exp(-(a * a - 2 * rho * a * b + b * b) / (2 * (1 - rho) * (1 + rho)))

    for rho32 in (float(np.float32(0.999999)), float(np.float32(-0.999999))):  # both branches of d = a - rho b
        out = _splat_graph(np.float32, 1, size).run(None, {"g": np.array([[[0.5, 0.5, rho32, 0, 0]]], np.float32),
                                                            "f": np.ones((1, 1, 1), np.float32)})[0][0, 0]  # fmt: skip
        ref = closed_form(rho32)
        mask = ref > 1e-4
        assert np.max(np.abs(out - ref)[mask] / ref[mask]) <= 1e-5, rho32
    # float16: rho 0.99999 is stored as exactly 1.0 -> without the clamp the weights are NaN / 0
    g16 = np.array([[[0.5, 0.5, 0.99999, 0, 0], [1e-8, 0.3, -0.99999, 0.5, 0.5]]], np.float16)
    assert g16[0, 0, 2] == 1.0 and g16[0, 1, 2] == -1.0 and g16[0, 1, 0] == 0.0
    out16 = _splat_graph(np.float16, 2, size).run(None, {"g": g16, "f": np.ones((1, 2, 1), np.float16)})[0]
    assert np.isfinite(out16).all()
    first = _splat_graph(np.float16, 1, size).run(None, {"g": g16[:, :1], "f": np.ones((1, 1, 1), np.float16)})[0][0, 0]
    ref16 = closed_form(0.99951171875)
    np.testing.assert_allclose(first.astype(np.float64), ref16, atol=2e-3)  # float16 output rounding
    assert first.max() == np.float16(1.0)  # the ridge keeps its peak (a zeroed weight would be 0)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 1), (1, 8, 6, 2)])
def test_subpixel_upsampling_equals_nearest_resize_then_conv(shape):
    from gpstoken_export.subpixel import SubpixelUpsample

    from gpstoken.layers import Upsample

    torch.manual_seed(0)
    up = Upsample(shape[1]).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        ref = torch.nn.functional.conv2d(torch.repeat_interleave(torch.repeat_interleave(x, 2, 2), 2, 3), up.conv.weight, up.conv.bias, padding=1)
        out = SubpixelUpsample(up)(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)  # float64: the phase kernels are the same sums


def test_subpixel_upsampling_refuses_other_convolutions_and_restores_the_model(model):
    from gpstoken_export.subpixel import SubpixelUpsample, subpixel_upsampling

    from gpstoken.layers import Upsample

    up = Upsample(4)
    up.conv = torch.nn.Conv2d(4, 4, 3, padding=1, stride=2)
    with pytest.raises(ValueError, match="3x3 convolution with padding 1"):
        SubpixelUpsample(up)
    before = [m for m in model.modules() if isinstance(m, Upsample)]
    assert before
    with pytest.raises(RuntimeError, match="inside"), subpixel_upsampling(model):
        assert not any(isinstance(m, Upsample) for m in model.modules())
        assert sum(isinstance(m, SubpixelUpsample) for m in model.modules()) == len(before)
        raise RuntimeError("inside")
    assert [m for m in model.modules() if isinstance(m, Upsample)] == before


def test_decoder_export_runs_upsampling_in_subpixel_form(model, photos, tmp_path):
    """The default export has no resize in front of a convolution; its convolutions do 16/36 of the
    up-sampling's multiply-adds; both forms give the torch model's output."""
    sub = export_decoder(model, tmp_path / "sub.onnx")
    plain = export_decoder(model, tmp_path / "plain.onnx", subpixel=False)

    def kernel_sizes(proto):  # weights (= multiply-adds per pixel the convolution runs on) of each up-sampling convolution
        weights = {i.name: i.dims for i in proto.graph.initializer}
        return [int(np.prod(weights[n.input[1]])) for n in proto.graph.node if n.op_type == "Conv" and "upsample" in n.name]

    ups = [m for m in model.modules() if isinstance(m, gpstoken.layers.Upsample)]
    assert "Resize" in {n.op_type for n in plain.graph.node} and "Resize" not in {n.op_type for n in sub.graph.node}
    assert "Pad" not in {n.op_type for n in sub.graph.node}  # folded into the phases' convolutions
    phase_pads = [tuple(helper.get_attribute_value(a)) for n in sub.graph.node if n.op_type == "Conv" and "upsample" in n.name
                  for a in n.attribute if a.name == "pads"]
    assert phase_pads == [(1, 1, 0, 0), (1, 0, 0, 1), (0, 1, 1, 0), (0, 0, 1, 1)] * len(ups)  # (top, left, bottom, right)
    assert len(kernel_sizes(plain)) == len(ups) and len(kernel_sizes(sub)) == 4 * len(ups)
    # per low-resolution pixel: 4 phases x 2x2 taps, against 3x3 taps at each of 4 up-sampled pixels
    assert sum(kernel_sizes(sub)) * 36 == sum(kernel_sizes(plain)) * 4 * 16
    with torch.inference_mode():
        tokens = model.encode(photos[:2])
        ref = model.decode(tokens).numpy()
    for path in ("sub.onnx", "plain.onnx"):
        out = ort.InferenceSession(str(tmp_path / path), providers=["CPUExecutionProvider"]).run(None, {"g": tokens.g.numpy(), "f": tokens.f.numpy()})[0]
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _pad_conv_model(pad_value: float = 0.0, mode: str = "constant", second_user: bool = False) -> onnx.ModelProto:
    """x -> Pad (amounts from a Constant -> Cast chain, as the exporter writes them) -> Conv."""
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Constant", [], ["amounts64"], value=numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 2], np.int32))),
        helper.make_node("Cast", ["amounts64"], ["amounts"], to=TensorProto.INT64),
        helper.make_node("Constant", [], ["fill"], value=numpy_helper.from_array(np.array(pad_value, np.float32))),
        helper.make_node("Pad", ["x", "amounts", "fill"], ["padded"], mode=mode),
        helper.make_node("Conv", ["padded", "w"], ["y"], pads=[1, 0, 0, 1]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if second_user:
        nodes.append(helper.make_node("Relu", ["padded"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 6])], outputs,
                              [numpy_helper.from_array(rng.standard_normal((4, 3, 2, 2)).astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])


def test_zero_pads_fold_into_the_following_convolution():
    from gpstoken_export.subpixel import fold_pads_into_convs

    x = np.random.default_rng(1).standard_normal((1, 3, 5, 6)).astype(np.float32)
    model = _pad_conv_model()
    ref = _session(model).run(None, {"x": x})[0]
    assert fold_pads_into_convs(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Conv"]  # the constant chain went with the Pad
    (pads,) = [helper.get_attribute_value(a) for a in model.graph.node[0].attribute if a.name == "pads"]
    assert list(pads) == [2, 0, 0, 3]  # conv's own (1, 0, 0, 1) + the Pad's top 1 and right 2
    np.testing.assert_allclose(_session(model).run(None, {"x": x})[0], ref, rtol=1e-6, atol=1e-6)
    # left alone: a non-zero fill, another mode, a second consumer of the padded tensor
    for kwargs in ({"pad_value": 1.0}, {"mode": "reflect"}, {"second_user": True}):
        model = _pad_conv_model(**kwargs)
        assert fold_pads_into_convs(model) == 0 and "Pad" in {n.op_type for n in model.graph.node}, kwargs


def test_winograd_export_matches_torch_and_is_refused_where_it_does_not_belong(model, photos, tmp_path):
    from gpstoken_export.export import export_model
    from gpstoken_export.quantize import quantize_export
    from gpstoken_core.winograd import MIN_CHANNELS, wide_convolutions

    wide = wide_convolutions(export_decoder(model, tmp_path / "d.onnx"), MIN_CHANNELS)
    assert wide  # the tiny decoder's 128-channel stages
    proto = export_decoder(model, tmp_path / "w.onnx", winograd_min_channels=MIN_CHANNELS)
    assert not wide_convolutions(proto, MIN_CHANNELS)  # none left direct
    weights = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    conv_shapes = [weights.get(n.input[1]) for n in proto.graph.node if n.op_type == "Conv"]
    assert conv_shapes.count((36, 1, 6, 6)) == len(wide)  # one input transform each
    with torch.inference_mode():
        tokens = model.encode(photos[:2])
        ref = model.decode(tokens).numpy()
    out = ort.InferenceSession(str(tmp_path / "w.onnx"), providers=["CPUExecutionProvider"]).run(None, {"g": tokens.g.numpy(), "f": tokens.f.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    with pytest.raises(ValueError, match="float32 only"):
        export_model(model, tmp_path / "half", dtype="float16", winograd=True)
    assert not (tmp_path / "half").exists()
    folder = export_model(model, tmp_path / "exp", decode_modes=("merged",), winograd=True)
    with pytest.raises(ValueError, match="without --winograd"):
        quantize_export(folder)
    from gpstoken_export.build_engine import build_engines

    with pytest.raises(ValueError, match="--winograd"):
        build_engines(folder)
