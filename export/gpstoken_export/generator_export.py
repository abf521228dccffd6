"""``gpstoken export-generator``: a GPSGenerator as ONNX velocity graphs + its tokenizer export + manifest.

Folder (written atomically; schema ``gpstoken_core.manifest``, ``generator`` section):
  texture.onnx             one velocity evaluation of the texture (or one-stage) SiT:
                           x (B, L, 5 + C), t (B,), y (B,) int64, cond (B, L, 5) [two-stage only] -> v (B, L, 5 + C)
  layout.onnx              the layout SiT (if the generator has one): x (B, L, 5), t (B,), y (B,) -> v (B, L, 5)
  layout_bank.safetensors  the generator's g_init bank (if it has one): one float32 (N_c, L, 5) per class
  tokenizer/               a `gpstoken export` folder of the generator's tokenizer (decodes the tokens)
  manifest.json
  NAME.onnx.data           the weights of a graph above EXTERNAL_DATA_BYTES (ONNX external data: a protobuf
                           file cannot exceed 2 GiB; SiT-XL/2-gs has 2.7 GB of float32 weights), hashed in the
                           manifest next to its graph

Batch is dynamic. Classifier-free guidance is NOT in the graphs: the runtime doubles the batch
([conditional; unconditional] rows) and combines the halves with ``gpstoken_core.sampling.cfg_velocity``,
as the torch pipeline does. So the guidance interval rule and the combine formula exist once (the sampler
core), one graph serves guided and unguided sampling, a guided step is a single batched engine call, and
outside the guidance interval no rows are evaluated twice.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

import gpstoken
from gpstoken.generation.models import SiT
from gpstoken.generation.pipeline import GPSGenerator
from gpstoken_core.files import atomic_folder
from gpstoken_core.manifest import LAYOUT, TEXTURE, graph_entry, velocity_inputs, write_manifest

from .export import DTYPES, _io, export_model
from .onnx_export import to_float16
from .splat_function import ONNX_OPSET

TOKENIZER_FOLDER = "tokenizer"
BANK_FILE = "layout_bank.safetensors"


class VelocityGraph(nn.Module):
    """One velocity evaluation of a SiT: (x, t (B,), y (B,), [cond]) -> v (B, L, C)."""

    def __init__(self, model: SiT, with_cond: bool):
        super().__init__()
        self.model, self.with_cond = model.eval(), with_cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, t, y, cond if self.with_cond else None)


def example_layouts(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Plausible g_init (B, L, 5): small positive sigmas, rho 0, means in [-0.8, 0.8]."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(batch, tokens, 5, generator=gen) * torch.tensor([0.1, 0.1, 0.0, 1.6, 1.6])
    return g + torch.tensor([0.02, 0.02, 0.0, -0.8, -0.8])


def velocity_feeds(model: SiT, batch: int, with_cond: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of a velocity graph: x normal, t in (0, 1), labels with the null class among them."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    feeds = {
        "x": rng.standard_normal((batch, cfg.num_tokens, cfg.in_channels), dtype=np.float32),
        "t": rng.uniform(0.02, 0.98, batch).astype(np.float32),
        "y": (np.arange(batch) * 7 % (cfg.num_classes + 1)).astype(np.int64),  # includes the null class at 3+ rows for 10 classes
    }
    if with_cond:
        feeds["cond"] = example_layouts(batch, cfg.num_tokens, seed).numpy()
    return feeds


EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to NAME.onnx.data (protobuf's hard limit is 2 GiB)


def weight_bytes(model: SiT, itemsize: int = 4) -> int:
    return sum(p.numel() for p in model.parameters()) * itemsize


def save_graph(proto: onnx.ModelProto, path: Path, external: bool) -> None:
    """Save inline, or with every weight in ``NAME.onnx.data`` next to it; a stale data file is removed."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=0)
    else:
        onnx.save(proto, str(path))


def export_velocity(model: SiT, path: str | Path, with_cond: bool) -> onnx.ModelProto:
    path = Path(path)
    names = ["x", "t", "y"] + (["cond"] if with_cond else [])
    feeds = velocity_feeds(model, 2, with_cond)
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    axes = {n: {0: "batch"} for n in [*names, "v"]}
    external = weight_bytes(model) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        warnings.simplefilter("ignore")  # TorchScript deprecation + the forward's value checks (traced once)
        # The wrapper is put in eval mode first: the exporter restores the wrapper's mode afterwards, recursively,
        # and a fresh module's mode is training (which would switch on the SiT's label dropout). Exported into a
        # scratch folder: above 2 GiB the exporter writes one external file per weight, gathered below.
        raw = Path(tmp) / path.name
        torch.onnx.export(VelocityGraph(model.float().cpu(), with_cond).eval(), args, str(raw), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=names, output_names=["v"], dynamic_axes=axes)
        proto = onnx.load(str(raw))  # with its external weights, if any
    if external:  # shape inference serializes the model: not possible above 2 GiB, and not needed at fp32
        save_graph(proto, path, external=True)
        onnx.checker.check_model(str(path), full_check=True)
        return proto
    proto = drop_identity_casts(onnx.shape_inference.infer_shapes(proto))
    proto = onnx.shape_inference.infer_shapes(proto)
    onnx.checker.check_model(proto, full_check=True)
    save_graph(proto, path, external=False)
    return proto


def drop_identity_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Cast nodes from float32 to float32 (``cond.to(h.dtype)`` in SiT.forward): the float16 converter
    leaves their 'to' at float32, which would meet its float16 constants in the next node."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    outputs = {o.name for o in model.graph.output}
    rename, keep = {}, []
    for node in model.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to == onnx.TensorProto.FLOAT and types.get(node.input[0]) == onnx.TensorProto.FLOAT \
                and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
            continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _stats(model: SiT) -> dict:
    cfg = model.config
    return {"mean": model.mean.tolist(), "std": model.std.tolist(),
            "cond_mean": None if cfg.cond_mean is None else list(cfg.cond_mean),
            "cond_std": None if cfg.cond_std is None else list(cfg.cond_std)}


def export_generator(generator: GPSGenerator, out: str | Path, dtype: str = "float32") -> Path:
    """Export ``generator`` into the folder ``out``: velocity graphs, its layout bank, its tokenizer's
    export (same dtype) and the manifest. ``dtype="float16"``: graphs in float16 (what TensorRT 11 needs
    for fp16 engines); the runtime keeps the sampler state in float32 either way."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    generator.to("cpu")
    tc, kc = generator.texture.config, generator.tokenizer.config
    kind = "two-stage" if generator.two_stage else "one-stage"
    with atomic_folder(out) as tmp:
        export_model(generator.tokenizer, tmp / TOKENIZER_FOLDER, dtype=dtype)
        models = {TEXTURE: generator.texture}
        if generator.layout is not None:
            models[LAYOUT] = generator.layout
        graphs = {}
        for name, model in models.items():
            with_cond = "cond" in velocity_inputs(kind, name)
            graphs[name] = export_velocity(model, tmp / f"{name}.onnx", with_cond)
            if dtype == "float16":
                graphs[name] = to_float16(tmp / f"{name}.onnx")
                # half the weights: inline again when that fits, else back to external data
                save_graph(graphs[name], tmp / f"{name}.onnx", external=weight_bytes(model, 2) > EXTERNAL_DATA_BYTES)
        section = {
            "kind": kind,
            "num_classes": tc.num_classes,
            "null_class": tc.num_classes,
            "num_tokens": tc.num_tokens,
            "feature_channels": kc.feature_channels,
            "channels": {name: m.config.in_channels for name, m in models.items()} | {LAYOUT: 5},
            "tile": kc.tile,
            "s_min": generator.s_min,
            "stats": {name: _stats(m) for name, m in models.items()},
            "sampler_defaults": dict(generator.sampler_defaults),
            "models": {name: m.config.to_dict() for name, m in models.items()},
        }
        if generator.layout_bank is not None:
            from safetensors.numpy import save_file

            bank = generator.layout_bank
            save_file({f"class_{c}": g.float().numpy() for c, g in bank.layouts.items()}, str(tmp / BANK_FILE),
                      metadata={"format": "gpstoken-layout-bank", "num_classes": str(bank.num_classes), "num_tokens": str(bank.num_tokens)})
            section["layout_bank"] = graph_entry(tmp / BANK_FILE, {})
        write_manifest(tmp, {
            "generator": section,
            "tokenizer": TOKENIZER_FOLDER,
            "dtype": dtype,
            "onnx_opset": ONNX_OPSET,
            "exporter": {"gpstoken": gpstoken.__version__, "torch": torch.__version__, "onnx": onnx.__version__},
            "files": {name: graph_entry(tmp / f"{name}.onnx", _io(proto)) for name, proto in graphs.items()},
        })
    for part in (generator.texture, generator.tokenizer, generator.layout):  # the exporters may leave train mode set
        if part is not None:
            part.eval()
    return Path(out)
