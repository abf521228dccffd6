"""Winograd F(4x4, 3x3) 3x3 convolutions in standard ONNX ops against ONNX Runtime's own Conv (CPU).

    python benchmarks/winograd.py [--shapes 512x64 256x128 128x256 128x64] [--batch 1] [--repeats 5]

The measurement behind the runtime's and the export's choice of which convolutions to rewrite
(``gpstoken_core.winograd``: Winograd's minimal filtering, Lavin & Gray 2016, as standard ONNX ops; 36
multiplies per 4x4 output tile and channel pair instead of 144, transforms that move ~36/16 of the map
through memory, so the gain depends on the channel count and the map size).

Each shape (channels x map side, channels in = out) is exported from torch as one Conv and run by ONNX
Runtime on all cores as it is and rewritten; the table gives medians and the max error relative to a
float64 convolution.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from gpstoken_core.winograd import rewrite_convolutions


def main() -> None:
    import argparse
    import tempfile
    import warnings
    from pathlib import Path

    import numpy as np
    import onnx
    import onnxruntime as ort
    from timing import median_ms

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["512x64", "256x128", "128x256", "128x64", "32x256"], help="CHANNELSxSIDE")
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
            path = str(Path(tmp) / "conv.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(conv, (x,), path, dynamo=False, opset_version=18, input_names=["x"])
            for name in ("direct", "winograd"):
                proto = onnx.load(path)
                if name == "winograd" and rewrite_convolutions(proto, 1) != 1:
                    raise SystemExit("the convolution was not rewritten")
                options = ort.SessionOptions()  # idle threads of the other session must not spin while this one runs
                options.add_session_config_entry("session.force_spinning_stop", "1")
                session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
                feeds = {"x": x.numpy()}
                error = float(np.abs(session.run(None, feeds)[0] - exact).max() / np.abs(exact).max())
                row[name] = (median_ms(lambda: session.run(None, feeds), args.repeats), error)
        (t_direct, e_direct), (t_wino, e_wino) = row["direct"], row["winograd"]
        print(f"| {channels} | {side}x{side} | {t_direct:.1f} | {t_wino:.1f} | {t_direct / t_wino:.2f}x | {e_direct:.1e} | {e_wino:.1e} |", flush=True)


if __name__ == "__main__":
    main()
