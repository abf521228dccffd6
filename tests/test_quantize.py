"""The int8 variant of an export (ONNX Runtime static quantization of the decoder's convolutions): what is
quantized and what stays float, its quality against the stated bound on held-out photos, how the runtime
selects it, and refusals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from skimage.metrics import structural_similarity
from gpstoken_export.export import export_model
from gpstoken_export.quantize import QUALITY_BOUND_DB, SSIM_BOUND, held_out_images, quantize_export
from gpstoken_runtime import Tokenizer

import gpstoken
from gpstoken_core.manifest import read_manifest

SHIPPED = Path(gpstoken.__file__).parent / "weights" / "tiny"
QDQ = {"QuantizeLinear", "DequantizeLinear"}
SSIM = dict(data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    folder = export_model(gpstoken.GPSTokenizer.from_pretrained(SHIPPED), tmp_path_factory.mktemp("q") / "tiny")
    quantize_export(folder)
    return folder


def op_counts(path: Path) -> Counter:
    model = onnx.load(str(path))
    counts = Counter(n.op_type for n in model.graph.node)
    for function in model.functions:  # the splat's local function
        counts.update(f"{function.name}/{n.op_type}" for n in function.node)
    return counts


def test_only_the_decoder_convolutions_below_output_resolution_are_int8(exported):
    manifest = read_manifest(exported / "int8")
    assert manifest["precision"] == "int8" and manifest["quantization"]["graphs"] == ["decoder"]
    last = len(manifest["model_config"]["decoder"]["channel_mult"]) - 1
    fp32, int8 = op_counts(exported / "decoder.onnx"), op_counts(exported / "int8" / "decoder.onnx")
    # Every float node is still there (splat function, norms, activations, adds, upsampling) ...
    assert Counter({k: v for k, v in int8.items() if k not in QDQ}) == fp32
    # ... each Conv below the output resolution has its int8 weight and uint8 input, those at the output
    # resolution (last stage, conv_out) stay float; Q/DQ pairs only around quantized Conv nodes.
    model = onnx.load(str(exported / "int8" / "decoder.onnx"))
    producers = {out: n for n in model.graph.node for out in n.output}
    initializers = {i.name: i for i in model.graph.initializer}
    quantized = 0
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        at_output = conv.name.startswith((f"/decoder/stages.{last}/", "/decoder/conv_out/"))
        if at_output:
            assert conv.input[1] in initializers and initializers[conv.input[1]].data_type == onnx.TensorProto.FLOAT
            continue
        x, w = producers[conv.input[0]], producers[conv.input[1]]
        assert x.op_type == "DequantizeLinear" and w.op_type == "DequantizeLinear"
        assert initializers[w.input[0]].data_type == onnx.TensorProto.INT8
        assert initializers[x.input[2]].data_type == onnx.TensorProto.UINT8  # activation zero point
        quantized += 1
    assert quantized >= 10 and sorted(manifest["quantization"]["kept_float"]["decoder"]) == sorted(
        n.name for n in model.graph.node if n.op_type == "Conv" and n.name.startswith((f"/decoder/stages.{last}/", "/decoder/conv_out/")))
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        consumers = [n for n in model.graph.node if q.output[0] in n.input]
        assert all(c.op_type in ("DequantizeLinear", "Shape") for c in consumers)
    # Shape nodes read the quantized tensors, not a DequantizeLinear's output (ONNX Runtime would copy the
    # DequantizeLinear, a full float pass, for each of them)
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    shapes = [n for n in model.graph.node if n.op_type == "Shape"]
    assert not any(n.input[0] in dequantized for n in shapes)
    assert sum(n.input[0] in producers and producers[n.input[0]].op_type == "QuantizeLinear" for n in shapes) >= 8
    # The encoder is copied unchanged.
    assert (exported / "encoder.onnx").read_bytes() == (exported / "int8" / "encoder.onnx").read_bytes()


def test_shape_nodes_read_the_quantized_tensor():
    """x -> Q -> DQ -> {Relu, Shape}: the Shape moves to Q's output, same values; other nodes keep the DQ."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gpstoken_export.quantize import shapes_before_dequantize

    scale, zero = numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(128), "z")
    graph = helper.make_graph([
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("Relu", ["xd"], ["y"]),
        helper.make_node("Shape", ["xd"], ["shape"]),
        helper.make_node("Shape", ["x"], ["shape_of_float"]),
    ], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, "h", "w"]), helper.make_tensor_value_info("shape", TensorProto.INT64, [4]),
         helper.make_tensor_value_info("shape_of_float", TensorProto.INT64, [4])], [scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert shapes_before_dequantize(model) == 1
    onnx.checker.check_model(model)
    assert [list(n.input) for n in model.graph.node if n.op_type == "Shape"] == [["xq"], ["x"]]
    assert [list(n.input) for n in model.graph.node if n.op_type == "Relu"] == [["xd"]]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert list(after[1]) == [2, 3, 5, 7]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def psnr(a, b) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_int8_costs_at_most_the_stated_bounds_on_held_out_photos(exported):
    fp32 = Tokenizer.load(exported)
    int8 = Tokenizer.load(exported, precision="int8")
    assert int8.folder == exported / "int8"
    photos = held_out_images(256)
    assert len(photos) == 2
    for i, photo in enumerate(photos):
        a, b = fp32.reconstruct(photo[None])[0], int8.reconstruct(photo[None])[0]
        change = psnr(photo, b) - psnr(photo, a)
        assert change >= -QUALITY_BOUND_DB, f"held-out photo {i}: int8 costs {-change:.2f} dB (> {QUALITY_BOUND_DB})"
        ssim_change = structural_similarity(photo, b, **SSIM) - structural_similarity(photo, a, **SSIM)
        assert ssim_change >= -SSIM_BOUND, f"held-out photo {i}: int8 costs {-ssim_change:.3f} SSIM (> {SSIM_BOUND})"
        assert 0 < np.abs(a.astype(int) - b.astype(int)).max() < 64  # it is int8 (differs), and not broken
        recorded = read_manifest(exported / "int8")["quantization"]["held_out_quality"][i]["change_db"]
        assert recorded == pytest.approx(change, abs=2e-3)


def test_runtime_selects_variants_and_refuses_what_is_not_there(exported, tmp_path):
    assert Tokenizer.load(exported).folder == exported
    assert Tokenizer.load(exported / "int8", precision="int8").folder == exported / "int8"
    bare = export_model(gpstoken.GPSTokenizer("tiny").eval(), tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="no int8 variant.*gpstoken_export.quantize"):
        Tokenizer.load(bare, precision="int8")
    with pytest.raises(ValueError, match="unknown precision"):
        Tokenizer.load(exported, precision="int4")
    with pytest.raises(ValueError, match="already an int8 export"):
        quantize_export(exported / "int8", tmp_path / "again")
    with pytest.raises(FileExistsError):
        quantize_export(exported)  # the variant exists; replace=True overwrites it
