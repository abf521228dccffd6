"""Winograd F(4x4, 3x3) rewrite of ONNX convolutions (gpstoken_core.winograd) against the direct convolution."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from gpstoken_core.winograd import (
    input_transform,
    output_transform,
    rewrite_convolutions,
    transformed_filters,
    wide_convolutions,
    winograd_matrices,
)


def conv_model(c_in: int, c_out: int, bias: bool = True, dynamic: bool = True, size=(12, 12), seed: int = 0, **attrs):
    """x -> Conv (3x3 unless attrs say otherwise) -> Relu, weights as initializers."""
    rng = np.random.default_rng(seed)
    kernel = attrs.pop("kernel", 3)
    groups = attrs.get("group", 1)
    weight = (rng.standard_normal((c_out, c_in // groups, kernel, kernel)) / np.sqrt(9 * c_in)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"))
        inputs.append("b")
    attrs.setdefault("pads", [kernel // 2] * 4)
    h, w = (["h", "w"] if dynamic else list(size))
    graph = helper.make_graph(
        [helper.make_node("Conv", inputs, ["c"], name="conv", **attrs), helper.make_node("Relu", ["c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c_in, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c_out, "h2", "w2"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def direct(model, x):
    """The model's Conv + Relu in float64 torch."""
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).astype(np.float64)) for i in model.graph.initializer}
    return torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x).double(), inits["w"], inits.get("b"), padding=1)).numpy()


def test_transforms_are_winograds():
    """A^T [(G g G^T) * (B^T d B)] A is the 4x4 correlation of a 6x6 tile with a 3x3 kernel (float64), and
    the helpers lay the transforms out as the rewrite uses them."""
    bt, g, at = winograd_matrices()
    rng = np.random.default_rng(1)
    d, f = rng.standard_normal((6, 6)), rng.standard_normal((3, 3))
    correlation = np.array([[(d[i:i + 3, j:j + 3] * f).sum() for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(at @ ((g @ f @ g.T) * (bt @ d @ bt.T)) @ at.T, correlation, rtol=0, atol=1e-12)
    weight = rng.standard_normal((5, 4, 3, 3))
    filters = transformed_filters(weight)  # (36, out, in)
    assert filters.shape == (36, 5, 4)
    np.testing.assert_allclose(filters[:, 2, 3].reshape(6, 6), g @ weight[2, 3] @ g.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(input_transform()[:, 0].reshape(36, 36), np.kron(bt, bt), rtol=0, atol=0)
    np.testing.assert_allclose(output_transform(), np.kron(at, at), rtol=0, atol=0)


@pytest.mark.parametrize("batch,c_in,c_out,h,w,bias,dynamic", [
    (1, 8, 8, 16, 16, True, False),     # static map, a multiple of the tile: no crop
    (2, 8, 12, 13, 10, True, True),     # dynamic, cropped
    (1, 16, 8, 1, 1, False, True),      # a single pixel
    (3, 8, 8, 7, 33, True, True),
])
def test_rewritten_convolution_equals_the_direct_one(batch, c_in, c_out, h, w, bias, dynamic):
    model = conv_model(c_in, c_out, bias, dynamic, (h, w))
    original = conv_model(c_in, c_out, bias, dynamic, (h, w))
    assert len(wide_convolutions(model, 8)) == 1
    assert rewrite_convolutions(model, 8) == 1
    onnx.checker.check_model(model)
    assert "Conv" in {n.op_type for n in model.graph.node}  # the input transform
    assert not wide_convolutions(model, 1)  # no 3x3 convolution left
    assert "w" in {i.name for i in model.graph.initializer}  # filters are transformed from the weights in the graph
    x = np.random.default_rng(2).standard_normal((batch, c_in, h, w)).astype(np.float32)
    out, ref = run(model, x), direct(original, x)
    assert out.shape == ref.shape
    # float32 transforms (coefficients up to 8): ~1e-5 of the output's scale, the direct convolution ~3e-7
    assert np.abs(out - ref).max() <= 5e-5 * np.abs(ref).max()
    if dynamic:  # the same graph at another size
        x = np.random.default_rng(3).standard_normal((1, c_in, h + 5, w + 2)).astype(np.float32)
        ref = direct(original, x)
        assert np.abs(run(model, x) - ref).max() <= 5e-5 * np.abs(ref).max()


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2]}, {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, {"group": 2}, {"kernel": 1},
    {"pads": [0, 0, 0, 0]}, {"channels": 4},
])
def test_other_convolutions_are_left_alone(attrs):
    channels = attrs.pop("channels", 8)
    model = conv_model(channels, channels, **attrs)
    before = model.SerializeToString()
    assert wide_convolutions(model, 8) == [] and rewrite_convolutions(model, 8) == 0
    assert model.SerializeToString() == before


def test_weights_shared_with_another_node_stay():
    model = conv_model(8, 8)
    model.graph.node.append(helper.make_node("Identity", ["w"], ["w_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("w_copy", TensorProto.FLOAT, [8, 8, 3, 3]))
    assert rewrite_convolutions(model, 8) == 1
    x = np.random.default_rng(4).standard_normal((1, 8, 9, 9)).astype(np.float32)
    ref = direct(conv_model(8, 8), x)
    assert np.abs(run(model, x) - ref).max() <= 5e-5 * np.abs(ref).max()


def test_filters_handed_over_in_memory():
    """With ``filters_out`` the transformed filters stay out of the model (placeholders naming external data
    at IN_MEMORY, no weights left in the graph) and the dict holds them in float32 (float64 G g G^T to float32
    rounding); ONNX Runtime given them as external initializers computes the convolution, and so does the
    runtime's CPU backend, which also hands over the file's other large weights that way."""
    from gpstoken_core.winograd import IN_MEMORY
    from gpstoken_runtime.backends.onnxruntime import _serialize_with_weights_in_memory

    model, original = conv_model(16, 24, size=(10, 13)), conv_model(16, 24, size=(10, 13))
    filters = {}
    assert rewrite_convolutions(model, 8, filters) == 1
    (name, array), = filters.items()
    weight = numpy_helper.to_array(next(i for i in original.graph.initializer if i.name == "w"))
    assert array.dtype == np.float32 and array.shape == (36, 24, 16)
    np.testing.assert_allclose(array, transformed_filters(weight), rtol=0, atol=2e-6 * np.abs(array).max())
    inits = {i.name: i for i in model.graph.initializer}
    assert "w" not in inits and "Gemm" not in {n.op_type for n in model.graph.node}
    placeholder = inits[name]
    assert placeholder.data_location == TensorProto.EXTERNAL and not placeholder.raw_data
    assert {e.key: e.value for e in placeholder.external_data} == {"location": IN_MEMORY, "offset": "0", "length": str(array.nbytes)}
    x = np.random.default_rng(5).standard_normal((2, 16, 10, 13)).astype(np.float32)
    ref = direct(original, x)
    options = ort.SessionOptions()
    options.add_external_initializers([name], [ort.OrtValue.ortvalue_from_numpy(array)])
    out = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(out - ref).max() <= 5e-5 * np.abs(ref).max()
    # the backend's hand-over: every float32 initializer from 64 bytes here (the filters, the bias, the
    # input and output transforms)
    model, filters, options = conv_model(16, 24, size=(10, 13)), {}, ort.SessionOptions()
    rewrite_convolutions(model, 8, filters)
    serialized, values = _serialize_with_weights_in_memory(model, filters, options, min_bytes=64)
    assert len(values) == 4 and b"gpstoken-in-memory" in serialized and len(serialized) < array.nbytes
    out = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(out - ref).max() <= 5e-5 * np.abs(ref).max()


def test_old_opsets_are_refused():
    model = conv_model(8, 8)
    model.opset_import[0].version = 13
    with pytest.raises(ValueError, match="opset >= 18"):
        rewrite_convolutions(model, 8)
