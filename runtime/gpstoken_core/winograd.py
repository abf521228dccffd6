"""Wide 3x3 convolutions of an ONNX graph rewritten as Winograd F(4x4, 3x3) in standard ops (CPUs).

Winograd's minimal filtering (Lavin & Gray 2016, points 0, +-1, +-2, inf) computes each 4x4 output tile
of a 3x3 convolution from the 6x6 input tile around it as A^T [(G g G^T) * (B^T d B)] A: 36 multiplies
per tile and channel pair instead of 144. As ONNX ops: the input transform is a 6x6 stride-4 convolution
of every channel alone with the 36 fixed B^T x B^T kernels, the multiplies are 36 batched matrix products
over the channels (MLAS's GEMM on ONNX Runtime), the output transform one matrix product with A^T x A^T,
and the 4x4 tiles are interleaved back into the map by concatenation (a 6-D Transpose measured slower on
ONNX Runtime, and so did a transposed output product or an input transform split into rows and columns).
The transforms move ~36/16 of the map through memory, so the gain grows with the channel count
(``benchmarks/winograd.py``: ~1.3x at 128 channels, 2x at 512 against ONNX Runtime's own convolution on
this project's 2-core AVX2 VM).

The rewrite works on any graph with the convolution's weights as initializers, with static or dynamic map
sizes (the tile grid is computed from the input's shape; fixed pads of 1 before and 4 after cover every
size), so it serves both ``gpstoken export --winograd`` and the slim runtime, which applies it when it
loads a float32 export on ONNX Runtime's CPU provider. Float32 error: ~1e-5 relative per convolution
against float64 (direct: ~3e-7), from the transforms' coefficients (up to 8 in A^T, 5 in B^T). Not for
TensorRT (which chooses its own convolution algorithms), float16 or int8 graphs.
"""

from __future__ import annotations

import numpy as np

# Below, the transforms cost about what they save (32 channels: slower; 128 at 64x64: even; 128 at 256x256
# and wider: faster; benchmarks/winograd.py and the README's runtime notes)
MIN_CHANNELS = 128
TILE = 4  # output tile side
WINDOW = 6  # input tile side (TILE + 3 - 1)
# the external-data location of initializers whose arrays a runtime is handed in memory (never a file)
IN_MEMORY = "gpstoken-in-memory"

# F(4x4, 3x3): data transform B^T (6x6), filter transform G (6x3), output transform A^T (4x6).
_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


def winograd_matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) in float64."""
    return tuple(np.array(m, dtype=np.float64) for m in (_BT, _G, _AT))


def transformed_filters(weight: np.ndarray, dtype=np.float64) -> np.ndarray:
    """(out, in, 3, 3) -> (36, out, in): G g G^T for each channel pair, one matrix per tile position,
    computed in ``dtype``."""
    _, g, _ = winograd_matrices()
    out, inp = weight.shape[:2]
    kernels = weight.astype(dtype, copy=False).reshape(out * inp, 9)
    return (np.kron(g, g).astype(dtype) @ kernels.T).reshape(WINDOW * WINDOW, out, inp)


def input_transform() -> np.ndarray:
    """(36, 1, 6, 6): B^T d B as 36 convolution kernels applied to every channel alone."""
    bt, _, _ = winograd_matrices()
    return np.einsum("ur,vs->uvrs", bt, bt).reshape(WINDOW * WINDOW, 1, WINDOW, WINDOW)


def output_transform() -> np.ndarray:
    """(16, 36): A^T M A flattened."""
    _, _, at = winograd_matrices()
    return np.einsum("iu,jv->ijuv", at, at).reshape(TILE * TILE, WINDOW * WINDOW)


def _attribute(node, name: str, default):
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _eligible(node, initializers: dict, min_channels: int) -> bool:
    """A plain 3x3 convolution (stride 1, padding 1, no dilation or groups) whose weights are an
    initializer (and its bias too, if any) with at least ``min_channels`` channels in and out."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    weight = initializers.get(node.input[1])
    if weight is None or len(weight.dims) != 4 or tuple(weight.dims[2:]) != (3, 3) or weight.data_type != 1:  # float32
        return False
    if len(node.input) > 2 and node.input[2] and node.input[2] not in initializers:
        return False
    if (list(_attribute(node, "strides", [1, 1])) != [1, 1] or list(_attribute(node, "dilations", [1, 1])) != [1, 1]
            or _attribute(node, "group", 1) != 1 or list(_attribute(node, "pads", [0, 0, 0, 0])) != [1, 1, 1, 1]
            or _attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return False
    return min(weight.dims[0], weight.dims[1]) >= min_channels


def wide_convolutions(model, min_channels: int = MIN_CHANNELS) -> list:
    """The Conv nodes of ``model``'s main graph that ``rewrite_convolutions`` would rewrite."""
    initializers = {init.name: init for init in model.graph.initializer}
    return [node for node in model.graph.node if _eligible(node, initializers, min_channels)]


def rewrite_convolutions(model, min_channels: int = MIN_CHANNELS, filters_out: dict | None = None) -> int:
    """Rewrite, in place, every plain 3x3 convolution of ``model``'s main graph with at least
    ``min_channels`` channels in and out as Winograd F(4x4, 3x3) in standard ONNX ops (opset >= 18); returns
    how many were rewritten. Weights no other node uses are dropped; the same function of the input
    otherwise, to float rounding.

    The transformed filters G g G^T are computed in the graph from the 3x3 weights (a file keeps its size;
    ONNX Runtime folds them when it loads the graph: ~1.4 s for M128's decoder), or, with a dict as
    ``filters_out``, here: the model then names each as an initializer with external data at
    ``IN_MEMORY`` and the dict maps that name to its float32 array, for a runtime that takes initializers
    from memory (ONNX Runtime's ``add_external_initializers``; ``gpstoken_runtime``'s CPU backend)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    targets = [index for index, node in enumerate(graph.node) if _eligible(node, initializers, min_channels)]
    if not targets:
        return 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 18:
        raise ValueError(f"the Winograd rewrite needs ONNX opset >= 18 (Split with num_outputs), the model has {opset}")
    names = {name for node in graph.node for name in (*node.input, *node.output)} | set(initializers)
    new_inits = []

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.add(name)
        return name

    def const(base: str, value: np.ndarray) -> str:
        name = fresh(base)
        new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    shared = {
        "input": const("winograd/input_transform", input_transform().astype(np.float32)),
        "output": const("winograd/output_transform", output_transform().astype(np.float32)),
        "neg_one_one": const("winograd/shape_-1_1", np.array([-1, 1], np.int64)),
        "three": const("winograd/three", np.array([3], np.int64)),
        "four": const("winograd/four", np.array([TILE], np.int64)),
        "zero": const("winograd/zero", np.array([0], np.int64)),
        "one": const("winograd/one", np.array([1], np.int64)),
        "two": const("winograd/two", np.array([2], np.int64)),
        "four_axis": const("winograd/four_axis", np.array([4], np.int64)),
        "axes_hw": const("winograd/axes_hw", np.array([2, 3], np.int64)),
        "zeros_hw": const("winograd/zeros_hw", np.array([0, 0], np.int64)),
        "flat36": const("winograd/shape_0_36_-1", np.array([0, WINDOW * WINDOW, -1], np.int64)),
        "row": const("winograd/shape_0_0_0_1_-1", np.array([0, 0, 0, 1, -1], np.int64)),
        "kernels": const("winograd/shape_-1_9", np.array([-1, 9], np.int64)),
        "gg": const("winograd/GxG", np.kron(winograd_matrices()[1], winograd_matrices()[1]).astype(np.float32)),
    }
    shapes = {}  # the map sizes the graph states (an export's shape inference), to skip needless crops
    for value in [*graph.input, *graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
            shapes[value.name] = (dims[2].dim_value, dims[3].dim_value)
    replaced: dict[int, list] = {}
    for index in targets:
        node = graph.node[index]
        p = fresh(f"{node.name or node.output[0]}/winograd")
        x, y = node.input[0], node.output[0]
        static_side = shapes.get(x)
        out_ch, in_ch = initializers[node.input[1]].dims[:2]
        nodes = []

        def op(op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
            out = out or fresh(f"{p}/{op_type}")
            nodes.append(helper.make_node(op_type, inputs, [out], name=fresh(f"{p}/{op_type}_node"), **attrs))
            return out

        # G g G^T from the file's 3x3 weights, as constant nodes ONNX Runtime folds when it loads the graph
        # (kept out of the file: the transformed filters are 4x the weights)
        # (one product with G (x) G, the weights transposed inside the GEMM: thousands of 6x3 products, or
        # a Transpose node, took seconds to fold for M128's decoder)
        if filters_out is None:
            kernels = op("Reshape", [node.input[1], shared["kernels"]])  # (out*in, 9)
            transformed = op("Gemm", [shared["gg"], kernels], transB=1)  # (36, out*in)
            transformed = op("Reshape", [transformed, const(f"{p}/shape_36_o_i", np.array([WINDOW * WINDOW, out_ch, in_ch], np.int64))])
        else:
            transformed = fresh(f"{p}/filters")
            filters_out[transformed] = transformed_filters(numpy_helper.to_array(initializers[node.input[1]]), np.float32)
            new_inits.append(in_memory_placeholder(transformed, filters_out[transformed]))
        shape = op("Shape", [x])
        batch = op("Slice", [shape, shared["zero"], shared["one"]])
        hw = op("Slice", [shape, shared["two"], shared["four_axis"]])
        grid = op("Div", [op("Add", [hw, shared["three"]]), shared["four"]])  # (rows, cols) = ceil(hw / 4)
        # every channel alone through the input transform: (N*C, 36, rows, cols); pads 1 before and 4
        # after give exactly ceil(side / 4) windows for every side length
        planes = op("Reshape", [x, op("Concat", [shared["neg_one_one"], hw], axis=0)])
        tiles = op("Conv", [planes, shared["input"]], kernel_shape=[WINDOW, WINDOW], strides=[TILE, TILE], pads=[1, 1, 4, 4])
        tiles = op("Reshape", [tiles, op("Concat", [batch, const(f"{p}/shape_c_36_-1", np.array([in_ch, WINDOW * WINDOW, -1], np.int64))], axis=0)])
        tiles = op("Transpose", [tiles], perm=[0, 2, 1, 3])  # (N, 36, C, tiles)
        products = op("MatMul", [transformed, tiles])  # (N, 36, out, tiles)
        outputs = op("MatMul", [shared["output"], op("Reshape", [products, shared["flat36"]])])  # (N, 16, out*tiles)
        per_tile = const(f"{p}/shape_0_16_o", np.array([0, TILE * TILE, out_ch], np.int64))
        outputs = op("Reshape", [outputs, op("Concat", [per_tile, grid], axis=0)])  # (N, 16, out, rows, cols)
        pieces = [fresh(f"{p}/piece{k}") for k in range(TILE * TILE)]
        nodes.append(helper.make_node("Split", [outputs], pieces, name=fresh(f"{p}/Split_node"), axis=1, num_outputs=TILE * TILE))
        # tile position (i, j) of every tile: j interleaved along a new last axis, then i along a new axis 3
        out_ch_name = const(f"{p}/out_ch", np.array([out_ch], np.int64))
        column_shape = op("Concat", [shared["zero"], out_ch_name, grid, shared["one"]], axis=0)  # (N, out, rows, cols, 1)
        lines = []
        for i in range(TILE):
            columns = [op("Reshape", [pieces[TILE * i + j], column_shape]) for j in range(TILE)]
            lines.append(op("Reshape", [op("Concat", columns, axis=4), shared["row"]]))  # (N, out, rows, 1, 4 cols)
        full = op("Concat", lines, axis=3)  # (N, out, rows, 4, 4 cols)
        full = op("Reshape", [full, op("Concat", [shared["zero"], out_ch_name, op("Mul", [grid, shared["four"]])], axis=0)])
        if static_side is not None and static_side[0] % TILE == 0 and static_side[1] % TILE == 0:
            cropped = full  # the tile grid covers the map exactly
        else:
            cropped = op("Slice", [full, shared["zeros_hw"], hw, shared["axes_hw"]])  # (N, out, H, W)
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(initializers[node.input[2]]).reshape(out_ch, 1, 1)
            op("Add", [cropped, const(f"{p}/bias", bias)], y)
        else:
            op("Identity", [cropped], y)
        replaced[index] = nodes

    kept = []
    for index, node in enumerate(graph.node):
        kept.extend(replaced.get(index, [node]))
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for index in reversed(range(len(graph.initializer))):  # in place: copying M128's weights took 1.4 s
        if graph.initializer[index].name not in used:
            del graph.initializer[index]
    graph.initializer.extend(init for init in new_inits if init.name in used)
    return len(targets)


def in_memory_placeholder(name: str, array: np.ndarray):
    """An initializer that stands for ``array`` without its bytes: external data at ``IN_MEMORY``."""
    from onnx import TensorProto, helper

    init = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", IN_MEMORY), ("offset", "0"), ("length", str(array.nbytes))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    return init
