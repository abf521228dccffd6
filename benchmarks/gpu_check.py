"""One command that proves every GPU path in minutes when a GPU is lent, and says why for what it skips.

    bash benchmarks/gpu_check.sh [--out gpu_report] [--budget 480]     # on the GPU machine, after installing
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_report     # the same script on a CPU machine (CI)

Parts, in order (each with its own time limit; a part that cannot run says why and the rest goes on):
 1. environment: GPU (nvidia-smi), torch and its CUDA, nvcc, ONNX Runtime providers, tensorrt, cuda-bindings
 2. CUDA extension: whether gpstoken's torch op has its CUDA kernels (rebuild: GPSTOKEN_CUDA=ON pip install ...)
 3. CUDA tests: `pytest -m cuda` (CUDA op vs CPU op and the float64 reference, forward and backward, the
    numeric edges, float16, torch.compile, the tokenizer on CUDA vs CPU)
 4. ONNX Runtime's CUDA execution provider vs its CPU provider on an export of the shipped model
 5. TensorRT: the plugin built with CMake (TensorRT_ROOT / TRT_INCLUDE_DIR), engines (`gpstoken export
    --tensorrt`), the runtime's TensorRT backend against ONNX Runtime, the polygraphy parity recipe
 6. benchmarks: splat CUDA op vs dense torch on CUDA; decode images/s at batch 8 (benchmarks/tensorrt.py);
    generation samples/s (benchmarks/generation.py, when it exists)
Writes OUT/report.json and OUT/report.md and prints a one-screen summary. Exit status 1 when a part that
ran failed, else 0 (skips are not failures: they are reported with their reason).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Part:
    name: str
    status: str = "skipped"  # passed | failed | skipped
    reason: str = ""
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    log: str = ""


class Skip(Exception):
    """A part cannot run here; the message says why."""


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT) -> str:
    """Run a command; its output on success, RuntimeError with the output's tail on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}: {out[-1500:]}")
    return out


# ---------------------------------------------------------------------------------------------- parts
def environment(ctx: dict) -> dict:
    info: dict = {"python": sys.version.split()[0]}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            info["gpu"] = run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], 30).strip()
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            info["gpu"] = f"nvidia-smi failed: {err}"
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda or "none (CPU build)"
        info["cuda_available"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
    except ImportError as err:
        info["torch"] = f"not importable ({err})"
        info["cuda_available"] = False
    nvcc = shutil.which("nvcc")
    info["nvcc"] = run([nvcc, "--version"], 30).strip().splitlines()[-1] if nvcc else "not found"
    try:
        import onnxruntime as ort

        info["onnxruntime"] = f"{ort.__version__} providers {ort.get_available_providers()}"
    except ImportError:
        info["onnxruntime"] = "not installed"
    for module in ("tensorrt", "cuda.bindings"):  # in a child: benchmarks/tensorrt.py would shadow tensorrt here
        try:
            info[module] = run([sys.executable, "-c", f"import {module} as m; print(getattr(m, '__version__', 'importable'))"], 60).strip()
        except (RuntimeError, subprocess.TimeoutExpired):
            info[module] = "not installed"
    ctx["cuda"] = bool(info.get("cuda_available")) and not ctx["dry_run"]
    ctx["tensorrt"] = info["tensorrt"] != "not installed" and ctx["cuda"]
    return info


def need_cuda(ctx: dict) -> None:
    if ctx["dry_run"]:
        raise Skip("dry run: CUDA parts are not run")
    if not ctx["cuda"]:
        raise Skip("no CUDA device visible to torch (or torch is a CPU build)")


def cuda_extension(ctx: dict) -> dict:
    need_cuda(ctx)
    import torch

    from gpstoken import splat

    try:
        out = splat(torch.full((1, 1, 5), 0.5, device="cuda"), torch.ones(1, 1, 1, device="cuda"), (4, 4))
    except (RuntimeError, NotImplementedError) as err:
        ctx["cuda"] = False
        raise RuntimeError(f"gpstoken's op has no CUDA kernels in this build ({err}); rebuild with "
                           "GPSTOKEN_CUDA=ON pip install --no-build-isolation --no-deps ./runtime .") from None
    return {"op_on_cuda": float(out.sum())}


def cuda_tests(ctx: dict) -> dict:
    if ctx["dry_run"]:  # the tests must at least import and be selected by the marker
        out = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "--collect-only", "tests/test_cuda.py", "-p", "no:cacheprovider"], ctx["limit"])
        return {"collected (dry run)": out.strip().splitlines()[-1]}
    need_cuda(ctx)
    out = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"], ctx["limit"])
    return {"pytest": out.strip().splitlines()[-1]}


def ort_cuda(ctx: dict) -> dict:
    import numpy as np
    import onnxruntime as ort
    from gpstoken_runtime import Tokenizer

    from gpstoken_core.imageio import bundled_photo, center_crop_resize

    if not ctx["export"].exists():  # the shipped model, exported as a user would
        run([sys.executable, "-m", "gpstoken.cli", "export", "--out", str(ctx["export"])], ctx["limit"])
    photos = np.stack([center_crop_resize(bundled_photo(n), 256) for n in ("astronaut", "coffee")])
    cpu = Tokenizer.load(ctx["export"]).reconstruct(photos).astype(int)
    if ctx["dry_run"]:
        return {"cpu provider reconstructs (dry run)": list(cpu.shape)}
    need_cuda(ctx)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    gpu = Tokenizer.load(ctx["export"], device="cuda").reconstruct(photos).astype(int)
    diff = int(np.abs(gpu - cpu).max())
    if diff > 2:
        raise RuntimeError(f"ORT CUDA vs CPU reconstructions differ by {diff} grey levels (> 2)")
    return {"max_grey_level_difference": diff}


def tensorrt_plugin(ctx: dict) -> dict:
    need_cuda(ctx)
    if not ctx["tensorrt"]:
        raise Skip("the tensorrt Python package is not installed (pip install tensorrt-cu13)")
    include = os.environ.get("TRT_INCLUDE_DIR") or (os.environ.get("TensorRT_ROOT", "") and f"{os.environ['TensorRT_ROOT']}/include")
    if not include or not Path(include, "NvInferRuntime.h").exists():
        raise Skip("TensorRT headers not found: set TensorRT_ROOT or TRT_INCLUDE_DIR (pip wheels ship no headers)")
    build = ctx["work"] / "trt_build"
    run(["cmake", "-S", str(ROOT), "-B", str(build), "-DGPSTOKEN_CUDA=ON", "-DGPSTOKEN_TORCH_EXTENSION=OFF",
         "-DGPSTOKEN_PARTITION_MODULE=OFF", f"-DTRT_INCLUDE_DIR={include}", "-DCMAKE_CUDA_ARCHITECTURES=native"], ctx["limit"])
    run(["cmake", "--build", str(build), "--target", "gpstoken_trt", "gpstoken_trt_selfregister"], ctx["limit"])
    ctx["plugin"] = build / "libgpstoken_trt.so"
    return {"plugin": str(ctx["plugin"])}


def tensorrt_engines(ctx: dict) -> dict:
    if ctx["dry_run"]:  # the parity recipe (written and checked with polygraphy's plugin reference runner)
        parity = ctx["work"] / "trt_parity"
        run([sys.executable, "-m", "gpstoken_export.trt_parity", str(ctx["export"]), "--out", str(parity)], ctx["limit"])
        return {"recipe (dry run)": str((parity / "run_on_gpu.sh").exists())}
    need_cuda(ctx)
    if "plugin" not in ctx:
        raise Skip("no plugin library (see the TensorRT plugin part)")
    import numpy as np
    from gpstoken_runtime import Tokenizer

    from gpstoken_core.imageio import bundled_photo, center_crop_resize

    folder = ctx["work"] / "export_trt"
    run([sys.executable, "-m", "gpstoken.cli", "export", "--out", str(folder), "--tensorrt", "--plugin", str(ctx["plugin"])], ctx["limit"])
    photos = np.stack([center_crop_resize(bundled_photo(n), 256) for n in ("astronaut", "coffee")])
    ref = Tokenizer.load(folder).reconstruct(photos).astype(int)
    figures = {}
    for graphs in (False, True):
        trt = Tokenizer.load(folder, backend="tensorrt", plugin_library=ctx["plugin"], cuda_graph=graphs)
        diff = int(np.abs(trt.reconstruct(photos).astype(int) - ref).max())
        figures[f"tensorrt{'_cuda_graph' if graphs else ''}_vs_ort_grey_levels"] = diff
        if diff > 2:
            raise RuntimeError(f"TensorRT (cuda_graph={graphs}) vs ONNX Runtime differ by {diff} grey levels")
    parity = ctx["work"] / "trt_parity"
    run([sys.executable, "-m", "gpstoken_export.trt_parity", str(folder), "--out", str(parity)], ctx["limit"])
    recipe = parity / "run_on_gpu.sh"
    if recipe.exists():
        figures["polygraphy_recipe"] = run(["bash", str(recipe)], ctx["limit"], env={"PLUGIN": str(ctx["plugin"])}).strip().splitlines()[-1]
    return figures


def bench_splat(ctx: dict) -> dict:
    if not ctx["dry_run"]:
        need_cuda(ctx)
    import torch

    from gpstoken import splat, splat_reference

    gen = torch.Generator().manual_seed(0)
    device = "cpu" if ctx["dry_run"] else "cuda"  # the dry run times the same code on the CPU op
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.cat([torch.rand(8, 128, 2, generator=gen) * 0.1 + 0.02, torch.zeros(8, 128, 1),
                   torch.rand(8, 128, 2, generator=gen) * 2 - 1], -1).to(device)  # fmt: skip
    f = torch.randn(8, 128, 16, generator=gen).to(device)

    def timed(fn, repeats=20 if device == "cuda" else 3):
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - start) / repeats * 1000

    op, dense = timed(lambda: splat(g, f, (64, 64))), timed(lambda: splat_reference(g, f, (64, 64)))
    return {f"splat_{device}_ms": round(op, 3), f"dense_torch_{device}_ms": round(dense, 3), "speed_up": round(dense / op, 1)}


def bench_decode(ctx: dict) -> dict:
    need_cuda(ctx)
    if "plugin" not in ctx:
        raise Skip("no plugin library (see the TensorRT plugin part)")
    out = run([sys.executable, "benchmarks/tensorrt.py", "--plugin", str(ctx["plugin"]), "--batch", "8", "--repeats", "10"], ctx["limit"])
    return {"table": out.strip().splitlines()[-6:]}


def tensorrt_generator(ctx: dict) -> dict:
    """The shipped digits generator on TensorRT (device-resident sampling, CUDA graphs) vs ONNX Runtime, and
    the polygraphy recipe of its velocity engines."""
    parity = ctx["work"] / "generator_parity"
    folder = ctx["work"] / "generator_export"
    if ctx["dry_run"]:
        run([sys.executable, "-m", "gpstoken.cli", "export-generator", "--out", str(folder)], ctx["limit"])
        run([sys.executable, "-m", "gpstoken_export.generator_parity", str(folder), "--out", str(parity)], ctx["limit"])
        return {"velocity recipe checked on ONNX Runtime (dry run)": (parity / "run_on_gpu.sh").exists()}
    need_cuda(ctx)
    if "plugin" not in ctx:
        raise Skip("no plugin library (see the TensorRT plugin part)")
    import numpy as np
    from gpstoken_runtime import Generator

    run([sys.executable, "-m", "gpstoken.cli", "export-generator", "--out", str(folder), "--tensorrt", "--plugin", str(ctx["plugin"])],
        ctx["limit"])
    labels = [0, 3, 5, 9]
    ref = Generator.load(folder)
    trt = Generator.load(folder, backend="tensorrt", plugin_library=ctx["plugin"])
    figures = {"device_resident": trt.device_context() is not None}
    for sampler, steps in (("sde", 50), ("heun", 8)):
        a = ref.sample_tokens(labels, seed=0, sampler=sampler, steps=steps)
        b = trt.sample_tokens(labels, seed=0, sampler=sampler, steps=steps)
        figures[f"{sampler}{steps}_tokens_max_abs"] = float(max(np.abs(a.g - b.g).max(), np.abs(a.f - b.f).max()))
    grey = int(np.abs(ref.sample(labels, seed=0).astype(int) - trt.sample(labels, seed=0).astype(int)).max())
    figures["images_max_grey_levels"] = grey
    if grey > 2:
        raise RuntimeError(f"TensorRT vs ONNX Runtime generated images differ by {grey} grey levels (> 2)")
    run([sys.executable, "-m", "gpstoken_export.generator_parity", str(folder), "--out", str(parity)], ctx["limit"])
    figures["polygraphy_velocity_recipe"] = run(["bash", str(parity / "run_on_gpu.sh")], ctx["limit"]).strip().splitlines()[-1]
    return figures


def bench_generation(ctx: dict) -> dict:
    need_cuda(ctx)
    if "plugin" not in ctx:
        raise Skip("no plugin library (see the TensorRT plugin part)")
    script = ROOT / "benchmarks" / "generation.py"
    out = run([sys.executable, str(script), "--gpu", "--plugin", str(ctx["plugin"]), "--budget", str(ctx["limit"] / 2)], ctx["limit"])
    return {"table": out.strip().splitlines()[-8:]}


PARTS = [
    ("environment", environment),
    ("CUDA extension", cuda_extension),
    ("CUDA tests", cuda_tests),
    ("ONNX Runtime CUDA vs CPU", ort_cuda),
    ("TensorRT plugin", tensorrt_plugin),
    ("TensorRT engines, backend, parity", tensorrt_engines),
    ("TensorRT generator (device-resident)", tensorrt_generator),
    ("benchmark: splat CUDA vs dense", bench_splat),
    ("benchmark: decode images/s", bench_decode),
    ("benchmark: generation samples/s", bench_generation),
]


def markdown(parts: list[Part], total: float) -> str:
    lines = ["# gpstoken GPU check", "", f"total {total:.0f} s", "", "| part | status | s | figures / reason |", "|---|---|---|---|"]
    for p in parts:
        detail = p.reason or json.dumps(p.figures)
        lines.append(f"| {p.name} | {p.status} | {p.seconds:.1f} | {detail.replace('|', '/')[:300]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run on a CPU machine: every CUDA part is reported as skipped")
    parser.add_argument("--out", type=Path, default=Path("gpu_report"), help="report folder (default gpu_report/)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpstoken_gpu_check_"))
    ctx: dict = {"dry_run": args.dry_run, "work": work, "export": work / "export", "limit": args.budget / 3}
    parts = []
    for name, fn in PARTS:
        part = Part(name)
        left = args.budget - (time.perf_counter() - start)
        t0 = time.perf_counter()
        try:
            if left < 10:
                raise Skip("out of the time budget")
            ctx["limit"] = max(10.0, min(args.budget / 3, left))
            part.figures = fn(ctx) or {}
            part.status = "passed"
        except Skip as why:
            part.reason = str(why)
        except Exception as err:  # a failing part is reported; the rest still runs
            part.status, part.reason = "failed", f"{type(err).__name__}: {err}"[:2000]
        part.seconds = time.perf_counter() - t0
        parts.append(part)
    total = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps({"dry_run": args.dry_run, "seconds": total, "parts": [asdict(p) for p in parts]}, indent=1))
    (args.out / "report.md").write_text(markdown(parts, total))
    shutil.rmtree(work, ignore_errors=True)
    print(f"gpstoken GPU check{' (dry run)' if args.dry_run else ''}: {total:.0f} s; report in {args.out}/")
    for p in parts:
        what = p.reason if p.status != "passed" else ", ".join(f"{k}={v}" for k, v in p.figures.items() if not isinstance(v, (list, dict)))
        print(f"  {p.status:7} {p.name:36} {what[:110]}")
    return 1 if any(p.status == "failed" for p in parts) else 0


if __name__ == "__main__":
    sys.exit(main())
