"""The decoder's up-sampling (nearest x2, then a 3x3 convolution) exported in sub-pixel form.

Every pixel of the nearest-up-sampled map repeats a low-resolution pixel, so each output pixel of the
3x3 convolution sees only a 2x2 window of the low-resolution map, and which window and which summed
weights depend only on its phase (row and column parity). The export therefore runs four 2x2
convolutions on the low-resolution map (16 multiply-adds per low-resolution pixel and channel pair
instead of 36: 2.25x fewer FLOPs) and interleaves their outputs. Same function, summed in a different
order: outputs differ by float rounding only.

Row phase 0 (output row 2i) covers up-sampled rows 2i-1, 2i, 2i+1 = low-resolution rows i-1, i, i: the
kernel's row 0 lands on row i-1, rows 1 + 2 on row i. Row phase 1 (2i+1) covers i, i, i+1: rows 0 + 1 on
row i, row 2 on row i+1. Columns likewise. Zero padding of the up-sampled map at its borders is zero
padding of the low-resolution map on the side each phase reaches past (phase 0: before, phase 1: after).
"""

from __future__ import annotations

from contextlib import contextmanager

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpstoken.layers import Upsample

# PHASE_TAPS[p][k, t]: 1 where tap t (0..2) of the 3x3 kernel lands on low-resolution offset k (0..1) for phase p.
PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) -> (2, 2, O, I, 2, 2): the 2x2 kernel of each (row phase, column phase)."""
    taps = PHASE_TAPS.to(weight)
    return torch.einsum("aky,oiyx,blx->aboikl", taps, weight, taps)


def phase_padding(row_phase: int, col_phase: int) -> tuple[int, int, int, int]:
    """F.pad's (left, right, top, bottom) for one phase's 2x2 convolution, so its output keeps the input's size."""
    return (1 - col_phase, col_phase, 1 - row_phase, row_phase)


class SubpixelUpsample(nn.Module):
    """Same output as ``Upsample`` (nearest x2 then conv3x3) from four 2x2 convolutions at low resolution."""

    def __init__(self, upsample: Upsample):
        super().__init__()
        conv = upsample.conv
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError(f"sub-pixel form needs a plain 3x3 convolution with padding 1, got {conv}")
        self.register_buffer("kernels", phase_kernels(conv.weight.detach()))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        rows = []
        for a in (0, 1):
            phases = [F.conv2d(F.pad(x, phase_padding(a, b)), self.kernels[a, b], self.bias) for b in (0, 1)]
            # Concatenating along new last axes keeps every copy a contiguous run (a DepthToSpace-style
            # transpose instead was slower than the convolutions it saves on ONNX Runtime).
            rows.append(torch.stack(phases, dim=-1).reshape(n, -1, h, 2 * w))  # columns 2j + b
        return torch.stack(rows, dim=3).reshape(n, -1, 2 * h, 2 * w)  # rows 2i + a


@contextmanager
def subpixel_upsampling(model: nn.Module):
    """Within the block, every ``Upsample`` of ``model`` is replaced by its ``SubpixelUpsample``
    (for tracing the export); the originals are put back afterwards, also on error."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Upsample):
                swapped.append((parent, name, child))
                setattr(parent, name, SubpixelUpsample(child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def fold_pads_into_convs(model: onnx.ModelProto) -> int:
    """Make each zero ``Pad`` of the spatial axes whose only consumer is a ``Conv`` part of that Conv's
    ``pads``, in place; returns how many were folded. The exporter writes each phase's one-sided padding as
    a Pad whose amounts come from a chain of constant nodes: folded, the phases are plain Convs with
    asymmetric constant pads (no copy of the input per phase, and nothing for TensorRT's parser to
    evaluate)."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {out.name for out in graph.output}

    feeding: list[onnx.NodeProto] = []  # the constant chains of the folded Pads, removed once unused

    def constant(name: str):
        """The value of ``name`` if only constants feed it, else None."""
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        chain, stack = [], [name]
        while stack:
            node = producers.get(stack.pop())
            if node is None:
                return None
            if node in chain:
                continue
            chain.append(node)
            for source in node.input:
                if source and source not in initializers:
                    stack.append(source)
        used = [initializers[i] for node in chain for i in node.input if i in initializers]
        sub = helper.make_graph(list(reversed(chain)), "constant", [], [helper.make_tensor_value_info(name, 0, None)], used)
        value = ReferenceEvaluator(helper.make_model(sub, opset_imports=model.opset_import)).run(None, {})[0]
        feeding.extend(chain)
        return value

    folded = 0
    for pad in [node for node in graph.node if node.op_type == "Pad"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        users = consumers.get(pad.output[0], [])
        if attrs.get("mode", b"constant") not in (b"constant", "constant") or len(users) != 1 or pad.output[0] in graph_outputs:
            continue
        conv = users[0]
        if conv.op_type != "Conv" or conv.input[0] != pad.output[0] or len(pad.input) > 3 and pad.input[3]:
            continue  # an explicit axes input: not the exporter's form
        amounts = constant(pad.input[1])
        fill = constant(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0
        if amounts is None or fill is None or float(fill) != 0.0 or amounts.shape != (8,):
            continue
        amounts = [int(v) for v in amounts]
        if any(v < 0 for v in amounts) or amounts[0] or amounts[1] or amounts[4] or amounts[5]:
            continue  # cropping, or padding of batch/channels
        conv_attrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in conv_attrs and helper.get_attribute_value(conv_attrs["auto_pad"]) not in (b"NOTSET", "NOTSET"):
            continue
        old = list(helper.get_attribute_value(conv_attrs["pads"])) if "pads" in conv_attrs else [0, 0, 0, 0]
        new = [old[0] + amounts[2], old[1] + amounts[3], old[2] + amounts[6], old[3] + amounts[7]]
        if "pads" in conv_attrs:
            conv.attribute.remove(conv_attrs["pads"])
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
        folded += 1
    while True:  # drop the chains' nodes nothing uses any more
        used = {name for node in graph.node for name in node.input} | graph_outputs
        dead = [node for node in feeding if node in graph.node and not any(out in used for out in node.output)]
        if not dead:
            return folded
        for node in dead:
            graph.node.remove(node)
