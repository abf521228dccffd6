"""The export manifest (``manifest.json``): its schema, writing, reading and validation, in one place.

A ``gpstoken export`` folder holds ONNX graphs (an encoder for one tile of any size up to the model's
tile, and one decoder graph per output size / normalization grid it covers), optionally TensorRT
engines, and this manifest. Version 2 (this schema):

    format, version                 "gpstoken-export", 2
    model_config                    the tokenizer config (gpstoken.config.TokenizerConfig.to_dict())
    tile, tokens_per_tile, feature_channels, decode_mode (the model's default: "merged" | "tiles")
    sizes                           [[H, W], ...] image sizes the export was made for
    dtype                           "float32" | "float16" (graph inputs and outputs)
    custom_op, onnx_opset, exporter
    decoder_upsampling (optional)   "subpixel" (default export) | "resize": how the decoder graphs run the
                                    up-sampling (gpstoken_export.subpixel); informational, the graphs agree
    decoder_convolutions (optional) "direct" | "winograd F(4x4,3x3) from N channels" (gpstoken export
                                    --winograd, for ONNX Runtime on CPUs; no TensorRT engines or int8 from it)
    encoder_convolutions (optional) the same for the encoder's stem (gpstoken_core.winograd)
    files                           graph name -> {path, sha256, inputs, outputs}; decoder graphs also
                                    {image_size: [H, W], grid: [rows, cols]} (gpstoken_core.tiling.DecoderSpec)
    tensorrt (optional)             {version, gpu, compute_capability, plugin, profiles, files: name -> {path, sha256}}

A generator export (``gpstoken export-generator``) is a folder of its own with the same format and version
and a ``generator`` section instead of the tokenizer fields:

    generator                       {kind: "two-stage" | "one-stage", num_classes, null_class, num_tokens,
                                     feature_channels, channels: {texture: 5 + C, layout: 5}, tile, s_min,
                                     stats: {texture|layout: {mean, std, cond_mean, cond_std}},
                                     sampler_defaults: {...}, models: {graph: SiT config},
                                     layout_bank (optional): {path, sha256}}
    tokenizer                       the nested tokenizer export's folder, relative ("tokenizer")
    dtype, onnx_opset, exporter
    files                           "texture" (always), "layout" (two-stage with a layout model): one velocity
                                    evaluation each, inputs x (B, L, C), t (B,), y (B,) int64, cond (B, L, 5);
                                    external_data: {path, sha256} when the weights are in NAME.onnx.data
    tensorrt (optional)             as above, engines of the velocity graphs

Every reader goes through ``read_manifest`` / ``read_generator_manifest`` (which check the files' hashes),
every writer through ``write_manifest`` (atomic).
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import JSONFileError, atomic_write_text, read_json, sha256_file
from .tiling import DECODE_MODES, DecoderSpec

FORMAT = "gpstoken-export"
VERSION = 2
SUPPORTED_VERSIONS = (2,)
MANIFEST_FILE = "manifest.json"
ENCODER = "encoder"
REQUIRED_FIELDS = ("model_config", "tile", "tokens_per_tile", "feature_channels", "decode_mode", "dtype", "files")


class ExportError(ValueError):
    """An export folder is missing, damaged or inconsistent; the message names the file and field."""


def has_winograd(manifest: dict) -> bool:
    """Whether an export's graphs hold Winograd convolutions (``gpstoken export --winograd``)."""
    return any(manifest.get(field, "direct") != "direct" for field in ("decoder_convolutions", "encoder_convolutions"))


def graph_entry(path: Path, io: dict, spec: DecoderSpec | None = None) -> dict:
    """The ``files`` entry of one graph file: name, hash, inputs/outputs (and what a decoder decodes)."""
    entry = {"path": path.name, "sha256": sha256_file(path), **io}
    data = path.with_name(path.name + ".data")  # ONNX external data (weights of graphs above 2 GiB)
    if data.exists():
        entry["external_data"] = {"path": data.name, "sha256": sha256_file(data)}
    if spec is not None:
        entry.update(image_size=list(spec.image_size), grid=list(spec.grid))
    return entry


def write_manifest(folder: str | Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, "version": VERSION, **manifest}
    atomic_write_text(Path(folder) / MANIFEST_FILE, json.dumps(manifest, indent=1))


def read_manifest(folder: str | Path, verify_files: bool = True) -> dict:
    """The manifest of ``folder``, checked: format, version, required fields, and (``verify_files``) that
    every graph file exists with the recorded SHA-256."""
    manifest = _read_versioned(folder)
    path = Path(folder) / MANIFEST_FILE
    if GENERATOR in manifest:
        raise ExportError(f"{path}: field 'generator' is present: a generator export (load it with gpstoken_runtime.Generator); "
                          f"its tokenizer export is {Path(folder) / str(manifest.get('tokenizer', 'tokenizer'))}")
    return _check_tokenizer(folder, manifest, verify_files)


def _read_versioned(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such export folder")
    if not path.exists():
        raise ExportError(f"{path}: missing (is {folder} a `gpstoken export` folder?)")
    try:
        manifest = read_json(path)
    except JSONFileError as err:
        raise ExportError(str(err)) from None
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: field 'format' is not {FORMAT!r}")
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        raise ExportError(
            f"{path}: field 'version' is {manifest.get('version')!r}; this runtime reads {SUPPORTED_VERSIONS} "
            "(re-export with the matching gpstoken, or update gpstoken_runtime)"
        )
    return manifest


def _check_tokenizer(folder: str | Path, manifest: dict, verify_files: bool) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    for key in REQUIRED_FIELDS:
        if key not in manifest:
            raise ExportError(f"{path}: field {key!r} is missing")
    if manifest["decode_mode"] not in DECODE_MODES:
        raise ExportError(f"{path}: field 'decode_mode' is {manifest['decode_mode']!r}, expected one of {DECODE_MODES}")
    files = manifest["files"]
    if ENCODER not in files:
        raise ExportError(f"{path}: field 'files.{ENCODER}' is missing")
    if not decoder_graphs(manifest):
        raise ExportError(f"{path}: 'files' names no decoder graph (entries with image_size and grid)")
    if verify_files:
        for name, entry in files.items():
            check_file(folder, entry, f"files.{name}", f"{name} graph")
    return manifest


def check_file(folder: Path, entry: dict, field: str, what: str) -> Path:
    """The file of a manifest entry, after checking it exists and has the recorded SHA-256."""
    file = Path(folder) / entry["path"]
    if not file.exists():
        raise ExportError(f"{file}: missing ({what} named in the manifest)")
    if sha256_file(file) != entry["sha256"]:
        raise ExportError(
            f"{file}: its SHA-256 differs from the manifest's {field}.sha256: the file is damaged or comes "
            "from another export (all files of an export must come from the same export)"
        )
    if "external_data" in entry:
        check_file(folder, entry["external_data"], f"{field}.external_data", f"weights of the {what}")
    return file


def decoder_graphs(manifest: dict) -> dict[DecoderSpec, str]:
    """{DecoderSpec: graph name} of the export's decoder graphs."""
    return {
        DecoderSpec(tuple(e["image_size"]), tuple(e["grid"])): name
        for name, e in manifest["files"].items()
        if "image_size" in e and "grid" in e
    }


def decoder_graph(manifest: dict, spec: DecoderSpec, image_size: tuple[int, int], mode: str) -> str:
    """The graph that decodes ``spec``, or an ExportError naming the re-export command that adds it."""
    name = decoder_graphs(manifest).get(spec)
    if name is not None:
        return name
    h, w = image_size
    sh, sw = spec.image_size
    what = f"{w}x{h} images" if spec.image_size == tuple(image_size) else f"the {sw}x{sh} tiles of {w}x{h} images"
    how = f" as one map over a {spec.grid[1]}x{spec.grid[0]} tile grid" if spec.grid != (1, 1) else ""
    have = ", ".join(sorted(f"{s.image_size[1]}x{s.image_size[0]}" + (f" (grid {s.grid[1]}x{s.grid[0]})" if s.grid != (1, 1) else "")
                            for s in decoder_graphs(manifest)))
    raise ExportError(
        f"this export has no decoder for {what}{how} (decode mode {mode!r}; it has: {have}); "
        f"re-export with `gpstoken export --sizes {w}x{h} ...` to add it"
    )


def tensorrt_files(folder: str | Path, manifest: dict) -> dict[str, Path]:
    """{graph name: engine path} of the manifest's tensorrt section, each checked (exists, SHA-256)."""
    section = manifest.get("tensorrt")
    if not section or "files" not in section:
        raise ExportError(f"{Path(folder) / MANIFEST_FILE}: no 'tensorrt' section; build the engines first (gpstoken export --tensorrt)")
    return {name: check_file(Path(folder), entry, f"tensorrt.files.{name}", f"{name} engine") for name, entry in section["files"].items()}


def tensorrt_section(trt_version: str, gpu_name: str, compute_capability: tuple[int, int], plugin: Path,
                     profiles: dict, engines: dict[str, Path]) -> dict:
    return {
        "version": trt_version,
        "gpu": gpu_name,
        "compute_capability": f"{compute_capability[0]}.{compute_capability[1]}",
        "plugin": {"name": "GaussianSplat", "version": "1", "library": Path(plugin).name},
        "profiles": {g: {n: [list(s) for s in shapes] for n, shapes in p.items()} for g, p in profiles.items()},
        "files": {g: {"path": p.name, "sha256": sha256_file(p)} for g, p in engines.items()},
    }


# ----------------------------------------------------------------------------- generator exports
GENERATOR = "generator"
GENERATOR_KINDS = ("two-stage", "one-stage")
TEXTURE, LAYOUT = "texture", "layout"
VELOCITY_INPUTS = {TEXTURE: ["x", "t", "y", "cond"], LAYOUT: ["x", "t", "y"]}  # one-stage texture: no cond
GENERATOR_FIELDS = ("kind", "num_classes", "null_class", "num_tokens", "feature_channels", "channels", "tile", "s_min",
                    "stats", "sampler_defaults")


def velocity_inputs(kind: str, graph: str) -> list[str]:
    """The input names of a velocity graph: x, t, y (+ cond for the two-stage texture network)."""
    return VELOCITY_INPUTS[graph] if not (graph == TEXTURE and kind == "one-stage") else ["x", "t", "y"]


def read_generator_manifest(folder: str | Path, verify_files: bool = True) -> tuple[dict, Path]:
    """(manifest, tokenizer export folder) of a generator export, checked: format, version, the generator
    section, the velocity graphs (names, inputs, hashes), the layout bank, and that the tokenizer export
    it carries decodes what it makes (token count, channels, tile)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    manifest = _read_versioned(folder)
    section = manifest.get(GENERATOR)
    if not isinstance(section, dict):
        raise ExportError(f"{path}: field 'generator' is missing: not a generator export (a tokenizer export loads with gpstoken_runtime.Tokenizer)")
    for key in GENERATOR_FIELDS:
        if key not in section:
            raise ExportError(f"{path}: field 'generator.{key}' is missing")
    kind = section["kind"]
    if kind not in GENERATOR_KINDS:
        raise ExportError(f"{path}: field 'generator.kind' is {kind!r}, expected one of {GENERATOR_KINDS}")
    for key in ("num_classes", "num_tokens", "feature_channels", "tile", "s_min"):
        if isinstance(section[key], bool) or not isinstance(section[key], int) or section[key] < 1:
            raise ExportError(f"{path}: field 'generator.{key}' must be a positive integer, got {section[key]!r}")
    if section["null_class"] != section["num_classes"]:
        raise ExportError(f"{path}: field 'generator.null_class' is {section['null_class']!r}, expected num_classes = {section['num_classes']}")
    c = section["feature_channels"]
    if section["channels"].get(TEXTURE) != 5 + c:
        raise ExportError(f"{path}: field 'generator.channels.texture' is {section['channels'].get(TEXTURE)!r}, expected 5 + feature_channels = {5 + c}")
    for key in ("dtype", "files", "tokenizer"):
        if key not in manifest:
            raise ExportError(f"{path}: field {key!r} is missing")
    files = manifest["files"]
    graphs = [TEXTURE] + ([LAYOUT] if LAYOUT in files else [])
    if TEXTURE not in files:
        raise ExportError(f"{path}: field 'files.{TEXTURE}' is missing")
    extra = sorted(set(files) - {TEXTURE, LAYOUT})
    if extra:
        raise ExportError(f"{path}: field 'files' names unknown graphs {extra} (a generator export has {TEXTURE}, {LAYOUT})")
    if kind == "one-stage" and LAYOUT in files:
        raise ExportError(f"{path}: field 'files.{LAYOUT}': a one-stage generator has no layout network")
    if kind == "two-stage" and LAYOUT not in files and "layout_bank" not in section:
        raise ExportError(f"{path}: a two-stage generator needs 'files.{LAYOUT}' or 'generator.layout_bank'")
    for name in graphs:
        expected = velocity_inputs(kind, name)
        if list(files[name].get("inputs", {})) != expected:
            raise ExportError(f"{path}: field 'files.{name}.inputs' is {list(files[name].get('inputs', {}))}, expected {expected}")
        channels = section["channels"].get(name)
        shape = files[name]["inputs"]["x"].get("shape", [])
        if len(shape) != 3 or shape[1:] != [section["num_tokens"], channels]:
            raise ExportError(f"{path}: field 'files.{name}.inputs.x.shape' is {shape}, expected [batch, {section['num_tokens']}, {channels}] "
                              "(generator.num_tokens, generator.channels)")
        if verify_files:
            check_file(folder, files[name], f"files.{name}", f"{name} velocity graph")
    if "layout_bank" in section and verify_files:
        check_file(folder, section["layout_bank"], "generator.layout_bank", "layout bank")
    tok_folder = folder / str(manifest["tokenizer"])
    try:
        tok = read_manifest(tok_folder, verify_files)
    except ExportError as err:
        raise ExportError(f"{path}: field 'tokenizer' names a tokenizer export that does not load: {err}") from None
    tok_path = tok_folder / MANIFEST_FILE
    for field, ours, theirs in (("num_tokens", section["num_tokens"], tok["tokens_per_tile"]),
                                ("feature_channels", c, tok["feature_channels"]), ("tile", section["tile"], tok["tile"])):
        if ours != theirs:
            raise ExportError(f"{path}: field 'generator.{field}' is {ours}, but the tokenizer export {tok_path} has "
                              f"{'tokens_per_tile' if field == 'num_tokens' else field} {theirs}: the generator does not fit its tokenizer")
    return manifest, tok_folder
