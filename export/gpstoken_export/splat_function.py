"""The ``GaussianSplat`` ONNX node and the model-local function that lets plain ONNX Runtime run it.

The exported graph holds one node per splat, ``gpstoken::GaussianSplat(gaussians, features)`` with the
attributes ``height``, ``width`` (INT) and ``support`` (FLOAT): the node the TensorRT plugin and the ONNX
Runtime custom-op library implement. The model also carries a FunctionProto of the same domain and
name whose body computes the splat densely with standard ops (ORT inlines model-local functions), so
the file runs in ORT with no extra library. TensorRT's parser looks up local functions before plugins,
so the engine builder removes the function first (``drop_splat_function``).
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

DOMAIN = "gpstoken"
OP_TYPE = "GaussianSplat"
DOMAIN_VERSION = 1
ONNX_OPSET = 18  # the exported models' ai.onnx opset; the function body must use the same
SPLAT_ATTRIBUTES = ("height", "width", "support")  # what the TensorRT plugin's fields and the ORT op read


def _ref(name: str, value_attr: str, attr_type, ref: str) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(helper.make_attribute_ref(value_attr, attr_type, ref_attr_name=ref))
    return node


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_v", TensorProto.FLOAT, [], [value]))


def splat_function() -> onnx.FunctionProto:
    """Dense GaussianSplat: R[b, c, y, x] = sum_l G_l(x, y) f_l[c], G cut to |d| <= support * sigma.

    Works for float32 and float16 inputs: like the plugin's kernel it computes and accumulates in float32
    and returns the features' dtype. Memory is O(B L H W).
    """
    n = helper.make_node
    nodes = [
        n("Cast", ["gaussians_in"], ["gaussians"], to=TensorProto.FLOAT),
        n("Cast", ["features_in"], ["features"], to=TensorProto.FLOAT),
        _ref("H", "value_int", AttributeProto.INT, "height"),
        _ref("W", "value_int", AttributeProto.INT, "width"),
        _ref("s_f32", "value_float", AttributeProto.FLOAT, "support"),
        _const("zero_f32", 0.0), _const("one_f32", 1.0), _const("two_f32", 2.0),
        n("Constant", [], ["zero_i"], value=helper.make_tensor("zi", TensorProto.INT64, [], [0])),
        n("Constant", [], ["one_i"], value=helper.make_tensor("oi", TensorProto.INT64, [], [1])),
        n("CastLike", ["s_f32", "gaussians"], ["s"]),
        n("CastLike", ["zero_f32", "gaussians"], ["zero"]),
        n("CastLike", ["one_f32", "gaussians"], ["one"]),
        n("CastLike", ["two_f32", "gaussians"], ["two"]),
        # pixel centres: i -> 2 i / (n - 1) - 1
        n("Range", ["zero_i", "W", "one_i"], ["xi"]),
        n("Range", ["zero_i", "H", "one_i"], ["yi"]),
        n("CastLike", ["xi", "gaussians"], ["xf"]),
        n("CastLike", ["yi", "gaussians"], ["yf"]),
        n("CastLike", ["W", "gaussians"], ["Wf"]),
        n("CastLike", ["H", "gaussians"], ["Hf"]),
        n("Sub", ["Wf", "one"], ["Wm1"]),
        n("Sub", ["Hf", "one"], ["Hm1"]),
        n("Mul", ["xf", "two"], ["x2"]), n("Div", ["x2", "Wm1"], ["x3"]), n("Sub", ["x3", "one"], ["xs"]),
        n("Mul", ["yf", "two"], ["y2"]), n("Div", ["y2", "Hm1"], ["y3"]), n("Sub", ["y3", "one"], ["ys"]),
        n("Constant", [], ["shape_x"], value=helper.make_tensor("sx", TensorProto.INT64, [4], [1, 1, 1, -1])),
        n("Constant", [], ["shape_y"], value=helper.make_tensor("sy", TensorProto.INT64, [4], [1, 1, -1, 1])),
        n("Reshape", ["xs", "shape_x"], ["gx"]),
        n("Reshape", ["ys", "shape_y"], ["gy"]),
        # parameters as (B, L, 1, 1)
        n("Constant", [], ["axis3"], value=helper.make_tensor("a3", TensorProto.INT64, [1], [3])),
        n("Unsqueeze", ["gaussians", "axis3"], ["g4"]),
        n("Split", ["g4"], ["sigma_x_in", "sigma_y_in", "rho_in", "mu_x", "mu_y"], axis=2, num_outputs=5),
        # float16 inputs: |rho| rounds to 1 above 0.99976 and sigma can be 0 (q = 0: inf / NaN); clamp to
        # the nearest finite float16 values as the plugin does (splat_math.h clamp_loaded_half_gaussian).
        # The input type is told apart by whether 1 + 2^-12 survives a round trip through it.
        _const("probe", 1.000244140625),
        n("CastLike", ["probe", "gaussians_in"], ["probe_in"]),
        n("Cast", ["probe_in"], ["probe_back"], to=TensorProto.FLOAT),
        n("Equal", ["probe_back", "probe"], ["wide_input"]),
        _const("rho_lim_wide", 0.99999994), _const("rho_lim_half", 0.99951171875),
        _const("sigma_min_wide", -3.0e38), _const("sigma_min_half", 5.9604644775390625e-08),
        n("Where", ["wide_input", "rho_lim_wide", "rho_lim_half"], ["rho_lim"]),
        n("Neg", ["rho_lim"], ["rho_lo"]),
        n("Where", ["wide_input", "sigma_min_wide", "sigma_min_half"], ["sigma_min"]),
        n("Clip", ["rho_in", "rho_lo", "rho_lim"], ["rho"]),
        n("Max", ["sigma_x_in", "sigma_min"], ["sigma_x"]),
        n("Max", ["sigma_y_in", "sigma_min"], ["sigma_y"]),
        n("Sub", ["gx", "mu_x"], ["dx"]),  # (B, L, 1, W)
        n("Sub", ["gy", "mu_y"], ["dy"]),  # (B, L, H, 1)
        n("Div", ["dx", "sigma_x"], ["a"]),
        n("Div", ["dy", "sigma_y"], ["b"]),
        n("Sub", ["one", "rho"], ["omr"]), n("Add", ["one", "rho"], ["opr"]), n("Mul", ["omr", "opr"], ["q"]),
        # z = b^2/2 + d^2/(2q), d = a - rho b as (a - b) + (1 - rho) b (rho >= 0) or (a + b) - (1 + rho) b:
        # no cancellation as |rho| -> 1 (the header's form). Both as (a - sb) + (1 - |rho|) sb with
        # sb = sign(rho) b: the same floats, and the sign is applied on the (B, L, H, 1) factor, so only two
        # operations run at (B, L, H, W) instead of four and a Where.
        n("Abs", ["rho"], ["arho"]), n("Sub", ["one", "arho"], ["omar"]),
        n("GreaterOrEqual", ["rho", "zero"], ["rho_pos"]),
        n("Neg", ["one"], ["minus_one"]),
        n("Where", ["rho_pos", "one", "minus_one"], ["sign"]),  # (B, L, 1, 1); +1 at rho = 0
        n("Mul", ["sign", "b"], ["sb"]), n("Mul", ["omar", "sb"], ["omar_sb"]),  # (B, L, H, 1)
        n("Sub", ["a", "sb"], ["amsb"]), n("Add", ["amsb", "omar_sb"], ["d"]),
        n("Mul", ["b", "b"], ["bb"]), n("Mul", ["d", "d"], ["dd"]), n("Div", ["dd", "q"], ["ddq"]),
        n("Add", ["bb", "ddq"], ["t2"]),
        n("Neg", ["two"], ["minus_two"]),
        n("Div", ["t2", "minus_two"], ["nz"]),  # -z, rounded as -(t2 / 2)
        n("Exp", ["nz"], ["e"]),
        n("Abs", ["dx"], ["adx"]), n("Abs", ["dy"], ["ady"]),
        n("Mul", ["s", "sigma_x"], ["bx"]), n("Mul", ["s", "sigma_y"], ["by"]),
        n("LessOrEqual", ["adx", "bx"], ["inx"]), n("LessOrEqual", ["ady", "by"], ["iny"]),
        n("And", ["inx", "iny"], ["inside"]),
        n("Where", ["inside", "e", "zero"], ["weight"]),  # (B, L, H, W)
        # sum over l as one batched GEMM, (B, C, L) x (B, L, H W): ONNX Runtime's Einsum took 25x longer
        n("Constant", [], ["flat_maps"], value=helper.make_tensor("fm", TensorProto.INT64, [3], [0, 0, -1])),
        n("Reshape", ["weight", "flat_maps"], ["weight_flat"]),
        n("Transpose", ["features"], ["features_t"], perm=[0, 2, 1]),
        n("MatMul", ["features_t", "weight_flat"], ["rendered_flat"]),  # (B, C, H W)
        n("Shape", ["rendered_flat"], ["bc"], end=2),
        n("Shape", ["weight"], ["hw"], start=2),
        n("Concat", ["bc", "hw"], ["rendered_shape"], axis=0),
        n("Reshape", ["rendered_flat", "rendered_shape"], ["rendered_f32"]),
        n("CastLike", ["rendered_f32", "features_in"], ["rendered"]),
    ]
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=["gaussians_in", "features_in"],
        outputs=["rendered"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        attributes=list(SPLAT_ATTRIBUTES),
    )


def add_splat_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Attach the function (once) so ONNX Runtime can run the GaussianSplat nodes; returns the model."""
    drop_splat_function(model)
    model.functions.append(splat_function())
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model


def drop_splat_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the local function (the node stays): what the TensorRT builder parses, so that the node
    reaches the plugin. Run shape inference before, so outputs keep their static shapes."""
    keep = [f for f in model.functions if (f.domain, f.name) != (DOMAIN, OP_TYPE)]
    del model.functions[:]
    model.functions.extend(keep)
    return model


def splat_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if (node.domain, node.op_type) == (DOMAIN, OP_TYPE)]
