"""Build TensorRT engines for an export folder: ``encoder.engine`` and ``decoder.engine`` next to the ONNX files.

    python -m gpstoken_export.build_engine EXPORT_DIR [--plugin libgpstoken_trt.so] [--max-batch 8]
    gpstoken export --model DIR --out EXPORT_DIR --tensorrt

Needs an NVIDIA GPU, the ``tensorrt`` Python package (TensorRT 11) and the plugin library built with
CMake (``-DGPSTOKEN_CUDA=ON -DTensorRT_ROOT=...``). The decoder's model-local GaussianSplat function is
dropped before parsing so the node reaches the plugin (TensorRT's parser prefers local functions).
TensorRT 11 builds are strongly typed: the engines run in the ONNX files' dtype (export with
``--dtype float16`` for an fp16 engine). The manifest gets a ``tensorrt`` section (TensorRT version, GPU,
compute capability, profiles, engine hashes); the engines only run on that GPU model and TensorRT version.

Everything but the build itself (profiles, plugin lookup, manifest update) is plain Python, tested on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from gpstoken_runtime.tensorrt_backend import (
    PLUGIN_ENV,
    PLUGIN_LIBRARY,
    TensorRTUnavailable,
    find_plugin_library,
    gpu_properties,
    import_tensorrt,
    load_plugin,
)
from gpstoken_runtime.tokenizer import read_manifest, sha256_file


def _resolve(shape: list, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else int(d) for d in shape)


def optimization_profiles(manifest: dict, max_batch: int = 8, opt_batch: int = 1, max_tokens: int | None = None) -> dict:
    """{graph: {input: (min, opt, max)}} for the export's dynamic dims ("batch", "tokens").

    The encoder runs one 256 tile per batch item, so its batch bound is max_batch x tiles per image; the
    decoder (single/merged) sees all of an image's tokens, so its token bound is max_tokens x tiles."""
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, max_batch={max_batch}")
    per_tile = int(manifest["tokens_per_tile"])
    max_tokens = max_tokens or 2 * per_tile
    if max_tokens < per_tile:
        raise ValueError(f"max_tokens ({max_tokens}) is below the export's tokens per tile ({per_tile})")
    tiles = int(manifest["grid"][0]) * int(manifest["grid"][1])
    mode = manifest["decode_mode"]
    bounds = {
        "encoder": {"batch": (1, opt_batch * tiles, max_batch * tiles), "tokens": (1, per_tile, max_tokens)},
        "decoder": (
            {"batch": (1, opt_batch, max_batch), "tokens": (1, per_tile * tiles, max_tokens * tiles)}
            if mode in ("single", "merged")
            else {"batch": (1, opt_batch * tiles, max_batch * tiles), "tokens": (1, per_tile, max_tokens)}
        ),
    }
    profiles = {}
    for graph in ("encoder", "decoder"):
        lo, opt, hi = ({k: v[i] for k, v in bounds[graph].items()} for i in range(3))
        profiles[graph] = {
            name: (_resolve(io["shape"], lo), _resolve(io["shape"], opt), _resolve(io["shape"], hi))
            for name, io in manifest["files"][graph]["inputs"].items()
        }
    return profiles


def tensorrt_manifest_section(trt_version: str, gpu_name: str, compute_capability: tuple[int, int], plugin: Path,
                              profiles: dict, engines: dict[str, Path]) -> dict:
    return {
        "version": trt_version,
        "gpu": gpu_name,
        "compute_capability": f"{compute_capability[0]}.{compute_capability[1]}",
        "plugin": {"name": "GaussianSplat", "version": "1", "library": plugin.name},
        "profiles": {g: {n: [list(s) for s in shapes] for n, shapes in p.items()} for g, p in profiles.items()},
        "files": {g: {"path": p.name, "sha256": sha256_file(p)} for g, p in engines.items()},
    }


def write_manifest_atomically(folder: Path, manifest: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".json", dir=folder)
    with os.fdopen(fd, "w") as fh:
        json.dump(manifest, fh, indent=1)
    os.replace(tmp, folder / "manifest.json")


def onnx_for_tensorrt(path: Path):
    """The ONNX model as TensorRT must parse it: the splat function dropped, the bare node kept."""
    import onnx

    from .splat_function import drop_splat_function, splat_nodes

    model = onnx.load(str(path))
    drop_splat_function(model)
    for node in splat_nodes(model):
        names = {a.name for a in node.attribute}
        if not {"height", "width", "support"} <= names:
            raise ValueError(f"{path}: GaussianSplat node {node.name!r} lacks attributes {sorted({'height', 'width', 'support'} - names)}")
    return model


def build_engines(folder: str | Path, plugin: str | Path | None = None, max_batch: int = 8, opt_batch: int = 1,
                  max_tokens: int | None = None, workspace_gib: float = 4.0, verbose: bool = False) -> Path:
    """Build ``encoder.engine`` and ``decoder.engine`` in ``folder`` and record them in its manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    profiles = optimization_profiles(manifest, max_batch, opt_batch, max_tokens)
    plugin_path = find_plugin_library(plugin)
    trt = import_tensorrt()
    gpu_name, capability = gpu_properties()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    load_plugin(trt, plugin_path)  # once per process: TensorRT refuses a second registration
    cache_path = folder / "timing.cache"
    engines = {}
    for graph in ("encoder", "decoder"):
        onnx_path = folder / manifest["files"][graph]["path"]
        model = onnx_for_tensorrt(onnx_path)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(model.SerializeToString(), str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            # a cache from another GPU or TensorRT version is refused: start a fresh one
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles[graph].items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the log above)")
        engine_path = folder / f"{graph}.engine"
        tmp = engine_path.with_name(f".{engine_path.name}.tmp")
        tmp.write_bytes(bytes(plan))
        os.replace(tmp, engine_path)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        engines[graph] = engine_path
    manifest["tensorrt"] = tensorrt_manifest_section(trt.__version__, gpu_name, capability, plugin_path, profiles, engines)
    write_manifest_atomically(folder, manifest)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a `gpstoken export` folder")
    parser.add_argument("--plugin", type=Path, help=f"{PLUGIN_LIBRARY} (default: ${PLUGIN_ENV} or the installed one)")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch the engines accept (default 8)")
    parser.add_argument("--opt-batch", type=int, default=1, help="batch TensorRT tunes for (default 1)")
    parser.add_argument("--max-tokens", type=int, help="largest token count per tile (default 2x the export's)")
    parser.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace (default 4 GiB)")
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    args = parser.parse_args(argv)
    try:
        out = build_engines(args.folder, args.plugin, args.max_batch, args.opt_batch, args.max_tokens, args.workspace_gib, args.verbose)
    except (TensorRTUnavailable, ValueError, RuntimeError) as err:
        print(f"build_engine: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}/encoder.engine, {out}/decoder.engine; manifest.json has the tensorrt section")
    return 0


if __name__ == "__main__":
    sys.exit(main())
