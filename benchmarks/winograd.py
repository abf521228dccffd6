"""Winograd F(4x4, 3x3) 3x3 convolutions in standard ONNX ops against ONNX Runtime's own Conv (CPU).

    python benchmarks/winograd.py [--shapes 512x64 256x128 128x256 128x64] [--batch 1] [--repeats 5]

A measurement behind the README's runtime notes, not part of the export. Winograd's minimal filtering
(Lavin & Gray 2016, points 0, +-1, +-2, inf) computes each 4x4 output tile of a 3x3 convolution from the
6x6 input tile around it as A^T [(G g G^T) * (B^T d B)] A: 36 multiplies per tile and channel pair instead
of 144. In ONNX: the input transform is a 6x6 stride-4 convolution of every channel with the 36 fixed
B^T x B^T kernels, the multiplies are 36 batched matrix products over the channels (MLAS's GEMM), the
output transform one matrix product with A^T x A^T, and the tiles are interleaved back into the map. The
transforms move ~(36/16) x the map through memory, so the gain depends on the channel count.

Each shape (channels x map side, channels in = out) is exported from torch both ways, run by ONNX
Runtime on all cores; the table gives medians and the max error relative to a float64 convolution.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from gpstoken_export.winograd import WinogradConv3x3


def main() -> None:
    import argparse
    import tempfile
    import warnings
    from pathlib import Path

    import numpy as np
    import onnx
    import onnxruntime as ort
    from gpstoken_export.subpixel import fold_pads_into_convs
    from timing import median_ms

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["512x64", "256x128", "128x256", "128x64"], help="CHANNELSxSIDE")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, CPU, all cores; batch {args.batch}; median of {args.repeats}\n")
    print("| channels | map | direct Conv (ms) | Winograd F(4x4,3x3) (ms) | speed-up | max rel. error direct | max rel. error Winograd |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        channels, side = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        conv = nn.Conv2d(channels, channels, 3, padding=1).eval().requires_grad_(False)
        x = torch.randn(args.batch, channels, side, side)
        with torch.no_grad():
            exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1).numpy()
        row = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, module in (("direct", conv), ("winograd", WinogradConv3x3(conv))):
                path = str(Path(tmp) / f"{name}.onnx")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(module, (x,), path, dynamo=False, opset_version=18, input_names=["x"])
                proto = onnx.load(path)
                fold_pads_into_convs(proto)
                session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
                feeds = {"x": x.numpy()}
                error = float(np.abs(session.run(None, feeds)[0] - exact).max() / np.abs(exact).max())
                row[name] = (median_ms(lambda: session.run(None, feeds), args.repeats), error)
        (t_direct, e_direct), (t_wino, e_wino) = row["direct"], row["winograd"]
        print(f"| {channels} | {side}x{side} | {t_direct:.1f} | {t_wino:.1f} | {t_direct / t_wino:.2f}x | {e_direct:.1e} | {e_wino:.1e} |", flush=True)


if __name__ == "__main__":
    main()
