"""Build TensorRT engines for an export folder: one ``NAME.engine`` per ONNX graph (``encoder.engine``,
``decoder.engine``, and one per further decoder graph), next to the ONNX files. For a generator export
(``gpstoken export-generator``) the velocity graphs (``texture.engine``, ``layout.engine``) and the engines
of the tokenizer export it carries.

    python -m gpstoken_export.build_engine EXPORT_DIR [--plugin libgpstoken_trt.so] [--max-batch 8]
    gpstoken export --model DIR --out EXPORT_DIR --tensorrt
    gpstoken export-generator --out EXPORT_DIR --tensorrt

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
import sys
from pathlib import Path

from gpstoken_core.files import atomic_write_bytes
from gpstoken_core.manifest import (
    ENCODER,
    GENERATOR,
    ExportError,
    has_winograd,
    read_generator_manifest,
    read_manifest,
    tensorrt_section,
    write_manifest,
)
from gpstoken_core.tensorrt import (
    PLUGIN_ENV,
    PLUGIN_LIBRARY,
    TensorRTUnavailable,
    find_plugin_library,
    gpu_properties,
    import_tensorrt,
    load_plugin,
)

from gpstoken_core.tiling import tile_grid

from .splat_function import SPLAT_ATTRIBUTES


def _resolve(shape: list, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else int(d) for d in shape)


def optimization_profiles(manifest: dict, max_batch: int = 8, opt_batch: int = 1, max_tokens: int | None = None) -> dict:
    """{graph: {input: (min, opt, max)}} for the export's dynamic dims ("batch", "tokens", "height", "width").

    The encoder runs tiles (any size up to the model's tile; the runtime batches a size's tiles), so its
    batch bound is max_batch x the most tiles of one size among the export's sizes; a decoder over a grid
    of n tiles sees all their tokens, so its token bound is max_tokens x n."""
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, max_batch={max_batch}")
    per_tile = int(manifest["tokens_per_tile"])
    max_tokens = max_tokens or 2 * per_tile
    if max_tokens < per_tile:
        raise ValueError(f"max_tokens ({max_tokens}) is below the export's tokens per tile ({per_tile})")
    tile = int(manifest["tile"])
    sizes = manifest.get("sizes") or [[tile, tile]]
    tiles = max(len(tile_grid(h, w, tile)) for h, w in sizes)
    min_side = 2 * int(manifest["model_config"]["min_region"])
    bounds = {ENCODER: {"batch": (1, opt_batch * tiles, max_batch * tiles), "tokens": (1, per_tile, max_tokens),
                        "height": (min_side, tile, tile), "width": (min_side, tile, tile)}}
    for name, entry in manifest["files"].items():
        if name != ENCODER:
            n = entry["grid"][0] * entry["grid"][1]
            bounds[name] = {"batch": (1, opt_batch, max_batch), "tokens": (1, per_tile * n, max_tokens * n)}
    profiles = {}
    for graph, dims in bounds.items():
        lo, opt, hi = ({k: v[i] for k, v in dims.items()} for i in range(3))
        profiles[graph] = {
            name: (_resolve(io["shape"], lo), _resolve(io["shape"], opt), _resolve(io["shape"], hi))
            for name, io in manifest["files"][graph]["inputs"].items()
        }
    return profiles


def read_any_manifest(folder: Path) -> dict:
    """The checked manifest of a tokenizer export or of a generator export."""
    try:
        return read_manifest(folder)
    except ExportError as err:
        if f"field '{GENERATOR}' is present" not in str(err):
            raise
    return read_generator_manifest(folder)[0]


def generator_profiles(manifest: dict, max_batch: int = 8, opt_batch: int = 1) -> dict:
    """{graph: {input: (min, opt, max)}} of a generator export's velocity graphs. The runtime doubles the
    batch for classifier-free guidance (conditional and unconditional rows in one call), so a sampler of
    up to ``max_batch`` images feeds up to 2 x max_batch rows; TensorRT tunes for 2 x opt_batch."""
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, max_batch={max_batch}")
    dims = ({"batch": 1}, {"batch": 2 * opt_batch}, {"batch": 2 * max_batch})
    return {
        graph: {name: tuple(_resolve(io["shape"], d) for d in dims) for name, io in entry["inputs"].items()}
        for graph, entry in manifest["files"].items()
    }


def onnx_for_tensorrt(path: Path):
    """The ONNX model as TensorRT must parse it: the splat function dropped, the bare node kept."""
    import onnx

    from .splat_function import drop_splat_function, splat_nodes

    model = onnx.load(str(path))
    drop_splat_function(model)
    for node in splat_nodes(model):
        names = {a.name for a in node.attribute}
        if not set(SPLAT_ATTRIBUTES) <= names:
            raise ValueError(f"{path}: GaussianSplat node {node.name!r} lacks attributes {sorted(set(SPLAT_ATTRIBUTES) - names)}")
    return model


def build_engines(folder: str | Path, plugin: str | Path | None = None, max_batch: int = 8, opt_batch: int = 1,
                  max_tokens: int | None = None, workspace_gib: float = 4.0, verbose: bool = False) -> Path:
    """Build one engine per graph of ``folder`` (``NAME.engine``) and record them in its manifest; for a
    generator export also the engines of its tokenizer folder."""
    folder = Path(folder)
    manifest = read_any_manifest(folder)
    generator = GENERATOR in manifest
    if has_winograd(manifest):
        raise ValueError(f"{folder} was exported with --winograd (for ONNX Runtime on CPUs); TensorRT engines are "
                         "built from an export without it (TensorRT chooses its own convolution algorithms)")
    if generator:
        profiles = generator_profiles(manifest, max_batch, opt_batch)
    else:
        profiles = optimization_profiles(manifest, max_batch, opt_batch, max_tokens)
    plugin_path = find_plugin_library(plugin)
    trt = import_tensorrt()
    gpu_name, capability = gpu_properties()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    load_plugin(trt, plugin_path)  # once per process: TensorRT refuses a second registration
    if generator:
        build_engines(folder / manifest["tokenizer"], plugin_path, max_batch, opt_batch, max_tokens, workspace_gib, verbose)
    cache_path = folder / "timing.cache"
    engines = {}
    for graph in manifest["files"]:
        onnx_path = folder / manifest["files"][graph]["path"]
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if "external_data" in manifest["files"][graph]:  # above 2 GiB: no splat function to drop, parse the file
            parsed = parser.parse_from_file(str(onnx_path))
        else:
            parsed = parser.parse(onnx_for_tensorrt(onnx_path).SerializeToString(), str(onnx_path))
        if not parsed:
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
        atomic_write_bytes(engine_path, bytes(plan))
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
        engines[graph] = engine_path
    manifest["tensorrt"] = tensorrt_section(trt.__version__, gpu_name, capability, plugin_path, profiles, engines)
    write_manifest(folder, manifest)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a `gpstoken export` or `gpstoken export-generator` folder")
    parser.add_argument("--plugin", type=Path, help=f"{PLUGIN_LIBRARY} (default: ${PLUGIN_ENV} or the installed one)")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="largest batch the engines accept (default 8; velocity engines take twice that for CFG)")
    parser.add_argument("--opt-batch", type=int, default=1, help="batch TensorRT tunes for (default 1)")
    parser.add_argument("--max-tokens", type=int, help="largest token count per tile (default 2x the export's)")
    parser.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace (default 4 GiB)")
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    args = parser.parse_args(argv)
    try:
        out = build_engines(args.folder, args.plugin, args.max_batch, args.opt_batch, args.max_tokens, args.workspace_gib, args.verbose)
    except (TensorRTUnavailable, ExportError, ValueError, RuntimeError) as err:
        print(f"build_engine: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote the engines to {out}/ (one NAME.engine per graph); manifest.json has the tensorrt section")
    return 0


if __name__ == "__main__":
    sys.exit(main())
