"""Encode + decode: torch eager (GPSTokenizer) vs the slim runtime on ONNX Runtime, same weights, one run.

    python benchmarks/runtime.py [--quick] [--rounds 3] [--models tiny m128] [--batches 1 8]
        [--precisions fp32 fp32-direct int8 fp32-resize fp32-winograd fp32-spinning fp32-batched]

Latency at batch 1 and throughput at batch 8 on 256x256 photos, for the tiny model and M128 (random
weights: timing only). Both sides include the partition. Each side is timed in a process of its own
(ONNX Runtime's worker threads spin after a run and torch's OpenMP threads wait actively too: either would
slow the other in one process), in ``--rounds`` rounds that alternate torch and the runtime variants; the
table shows each side's median over the rounds (this VM's speed drifts by tens of percent within
minutes, and one measurement per side would credit the drift to one of them). Outputs are compared in the parent: max |diff| in grey levels against
torch eager. ``fp32-resize`` times an export without the sub-pixel up-sampling (nearest resize + 3x3
convolution as the model is written; ``gpstoken_export/subpixel.py``), to show what that rewrite gives;
``fp32`` is the default export as the runtime runs it on the CPU (it rewrites the 3x3 convolutions with
>= 128 channels as Winograd F(4x4,3x3) when loading: ``gpstoken_core.winograd``), ``fp32-direct`` the same
with ``winograd=False``; ``fp32-winograd`` an export with ``--winograd`` (the same rewrite in the files);
``fp32-spinning`` the
default export with ONNX Runtime's default thread spinning (the runtime stops its threads spinning after
each run: the encoder's session would slow the decoder's), ``fp32-batched`` the default export run on
whole batches (the runtime runs one image per graph run on the CPU: ``Tokenizer.load(max_batch=)``). With ``--flops`` the table also shows the FLOPs per image (from the graphs) and the achieved
GFLOP/s next to this CPU's float32 GEMM peak (``benchmarks/flops.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "camera", "coins", "brick")
HERE = Path(__file__).resolve().parent


def photos(n: int) -> np.ndarray:
    import skimage.data

    from gpstoken_core.imageio import bundled_photo, center_crop_resize, to_rgb_uint8

    out = []
    for name in PHOTOS[:n]:
        image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else bundled_photo(name)
        out.append(center_crop_resize(to_rgb_uint8(image), 256))
    return np.stack(out)


def time_side(side: str, model: str, folder: Path, precision: str, batch: int, repeats: int, out: Path) -> float:
    """Median ms of one reconstruct call of ``batch`` photos, measured in a fresh process; its output
    is saved to ``out`` (.npy)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", side, model, str(folder), precision, str(batch), str(repeats), str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{side} {model} batch {batch} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def child(side: str, model: str, folder: str, precision: str, batch: int, repeats: int, out: str) -> None:
    from timing import median_ms

    images = photos(batch)
    if side == "torch":
        import torch

        import gpstoken

        net = gpstoken.GPSTokenizer.from_pretrained(folder + "/torch")
        net.eval()

        def run():
            with torch.inference_mode():
                return gpstoken.to_uint8(net.reconstruct(images))
    else:
        from gpstoken_runtime import Tokenizer

        if precision == "fp32-spinning":  # the default export, ONNX Runtime's default thread spinning
            tok = Tokenizer.load(folder + "/fp32", stop_spinning=False)
        elif precision == "fp32-batched":  # the default export, the whole batch in each graph run
            tok = Tokenizer.load(folder + "/fp32", max_batch=batch)
        elif precision == "fp32-direct":  # the default export, convolutions as exported
            tok = Tokenizer.load(folder + "/fp32", winograd=False)
        elif precision == "fp32-resize":
            tok = Tokenizer.load(folder + "/fp32-resize", winograd=False)
        else:
            tok = Tokenizer.load(folder + "/" + precision)

        def run():
            return tok.reconstruct(images)

    np.save(out, run())
    print(median_ms(run, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--models", nargs="+", default=["tiny", "m128"], help="configs to time (default: tiny m128)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "fp32-direct", "int8", "fp32-resize", "fp32-winograd", "fp32-spinning", "fp32-batched"],
                        help="runtime exports to time (default: fp32, as the runtime runs it on the CPU; fp32-direct: "
                             "the same without the runtime's Winograd rewrite; int8 is calibrated on held-out photos; "
                             "fp32-resize: without the sub-pixel up-sampling; fp32-winograd: export --winograd; "
                             "fp32-spinning: the fp32 export with ONNX Runtime's default thread spinning; "
                             "fp32-batched: the fp32 export run on whole batches, not one image per run)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of torch then each runtime variant, each side in a fresh process; the table "
                             "shows each side's median over the rounds (default: 3)")
    parser.add_argument("--flops", action="store_true", help="add FLOPs per image and GFLOP/s vs the GEMM peak")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, model, folder, precision, batch, repeats, out = args.child
        return child(side, model, folder, precision, int(batch), int(repeats), out)

    import torch
    from gpstoken_export.export import export_model

    import gpstoken

    repeats = 3 if args.quick else 7
    peak = None
    if args.flops:
        from flops import gemm_peak_gflops, tokenizer_flops

        peak = gemm_peak_gflops()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), 256x256, encode + decode incl. partition, "
          f"each side in its own process, median of {args.rounds} alternating round(s)" + (f"; float32 GEMM peak {peak:.0f} GFLOP/s (numpy, all cores)" if peak else "") + "\n")
    columns = ["model", "precision", "batch", "torch eager (ms)", "runtime (ms)", "speed-up", "images/s torch",
               "images/s runtime", "max abs diff vs torch (grey levels)"]
    if peak:  # the runtime's graphs may do fewer FLOPs than the model as written (sub-pixel up-sampling)
        columns += ["GFLOP per image torch", "GFLOP per image runtime", "GFLOP/s torch", "GFLOP/s runtime", "runtime / GEMM peak"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name in args.models:
        torch.manual_seed(0)
        model = gpstoken.GPSTokenizer(name).eval()
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            model.save_pretrained(folder / "torch")
            export_model(model, folder / "fp32")
            if "fp32-resize" in args.precisions or peak:
                export_model(model, folder / "fp32-resize", subpixel=False)
            if "fp32-winograd" in args.precisions:
                export_model(model, folder / "fp32-winograd", winograd=True)
            if "int8" in args.precisions:
                from gpstoken_export.quantize import quantize_export

                quantize_export(folder / "fp32", folder / "int8")
            gflop = {}
            if peak:
                for key, export, winograd in (("fp32", "fp32", None), ("fp32-direct", "fp32", False), ("fp32-resize", "fp32-resize", False)):
                    counts = tokenizer_flops(folder / export, photos(1)[0], winograd)
                    gflop[key] = sum(sum(v.values()) for v in counts.values()) / 1e9
                gflop["int8"] = gflop["fp32-direct"]  # the same graphs, int8 convolutions
                gflop["fp32-spinning"] = gflop["fp32-batched"] = gflop["fp32"]
                if "fp32-winograd" in args.precisions:
                    counts = tokenizer_flops(folder / "fp32-winograd", photos(1)[0])
                    gflop["fp32-winograd"] = sum(sum(v.values()) for v in counts.values()) / 1e9
            for batch in args.batches:
                reps = repeats if (name == "tiny" or batch == 1) else max(2, repeats // 3)
                # Rounds alternate the sides, so a slow minute of this shared VM hits both, not one.
                times = {key: [] for key in ["torch", *args.precisions]}
                diffs = {}
                for _ in range(args.rounds):
                    times["torch"].append(time_side("torch", name, folder, "fp32", batch, reps, folder / "torch.npy"))
                    reference = np.load(folder / "torch.npy").astype(int)
                    for precision in args.precisions:
                        times[precision].append(time_side("runtime", name, folder, precision, batch, reps, folder / "rt.npy"))
                        diffs[precision] = int(np.abs(reference - np.load(folder / "rt.npy").astype(int)).max())
                t_torch = float(np.median(times["torch"]))
                for precision in args.precisions:
                    t_rt, diff = float(np.median(times[precision])), diffs[precision]
                    row = (f"| {name} | {precision} | {batch} | {t_torch:.0f} | {t_rt:.0f} | {t_torch / t_rt:.2f}x | "
                           f"{1000 * batch / t_torch:.1f} | {1000 * batch / t_rt:.1f} | {diff} |")
                    if gflop:
                        g_torch, g_rt = gflop["fp32-resize"], gflop[precision]
                        row += (f" {g_torch:.1f} | {g_rt:.1f} | {g_torch * batch / t_torch * 1000:.0f} | {g_rt * batch / t_rt * 1000:.0f} | "
                                f"{g_rt * batch / t_rt * 1000 / peak:.0%} |")
                    print(row, flush=True)
    if peak:
        print(f"\nfloat32 GEMM peak measured again at the end: {gemm_peak_gflops():.0f} GFLOP/s (the last column uses the first)")


if __name__ == "__main__":
    main()
