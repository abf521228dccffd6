"""The runtime generator: the velocity graphs of a `gpstoken export-generator` folder, sampled with the shared
sampler core (``gpstoken_core.generation`` / ``gpstoken_core.sampling``) and decoded by the tokenizer export
the folder carries. No torch: the same seed gives the torch pipeline's tokens (``GPSGenerator``).

    from gpstoken_runtime import Generator
    gen = Generator.load("generator_export")                 # backend="onnxruntime" | "tensorrt"
    images = gen.sample([3, 7], seed=0, steps=50)            # (2, H, W, 3) uint8

On TensorRT the sampler state lives on the GPU for a whole stage (``backends.cuda_arrays``): the engines
read and write device arrays, the step updates are element-wise kernels on the same stream, the SDE noise
is uploaded once per generation, and each step shape replays one CUDA graph. The state comes to the host
once per stage (the layout for calibration, the tokens for decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import warnings

import numpy as np

from gpstoken_core import generation as stages
from gpstoken_core import sampling as core
from gpstoken_core.manifest import LAYOUT, TEXTURE, ExportError, read_generator_manifest

from .backends import Backend, load_graphs
from .tokenizer import Tokenizer, Tokens


@dataclass
class Generation:
    """The stages of one batch (numpy): the layout the layout network sampled (None for one-stage), the
    tokens (``tokens.g_init`` the calibrated layout the texture network saw), the images (or None)."""

    labels: np.ndarray
    tokens: Tokens
    layout_sampled: np.ndarray | None
    images: np.ndarray | None


class Generator:
    def __init__(self, folder: Path, manifest: dict, graphs: dict[str, Backend], tokenizer: Tokenizer,
                 bank: dict[int, np.ndarray] | None):
        self.folder, self.manifest, self.graphs, self.tokenizer, self.bank = folder, manifest, graphs, tokenizer, bank
        s = manifest["generator"]
        self.section = s
        self.kind = s["kind"]
        self.num_classes, self.null_class = int(s["num_classes"]), int(s["null_class"])
        self.num_tokens, self.tile, self.s_min = int(s["num_tokens"]), int(s["tile"]), int(s["s_min"])
        try:
            self.defaults = stages.sampler_defaults(s["sampler_defaults"], where=f"{folder}/manifest.json: field 'generator.sampler_defaults'")
        except ValueError as err:
            raise ExportError(str(err)) from None
        self._input_dtypes = {
            name: {k: np.dtype(io["dtype"]) for k, io in manifest["files"][name]["inputs"].items()} for name in graphs
        }
        self._device = None  # cuda_arrays.DeviceContext once device-resident sampling started; False: unavailable
        self._uploads: dict[int, tuple] = {}  # id(host array) -> (host array, device copy), per generation

    @property
    def two_stage(self) -> bool:
        return self.kind == "two-stage"

    @classmethod
    def load(cls, folder: str | Path, backend: str = "onnxruntime", device: str = "cpu", threads: int | None = None,
             max_batch: int | None = None, winograd: bool | int | None = None, **backend_options) -> Generator:
        """Load a generator export (velocity graphs on ``backend``) and the tokenizer export it carries;
        ``max_batch`` and ``winograd`` are the tokenizer's (``Tokenizer.load``)."""
        folder = Path(folder)
        manifest, tok_folder = read_generator_manifest(folder)
        tok_options = dict(backend_options)
        if backend == "tensorrt":
            backend_options.setdefault("cuda_graph", True)  # a velocity graph runs at one shape per stage
        graphs = load_graphs(folder, manifest, backend, device, threads, **backend_options)
        tokenizer = Tokenizer.load(tok_folder, backend=backend, device=device, threads=threads, max_batch=max_batch,
                                   winograd=winograd, **tok_options)
        bank = None
        if "layout_bank" in manifest["generator"]:
            path = folder / manifest["generator"]["layout_bank"]["path"]
            try:
                tensors, _ = stages.read_safetensors(path)
                bank = {int(k.removeprefix("class_")): v.astype(np.float32) for k, v in tensors.items()}
            except ValueError as err:
                raise ExportError(f"{path}: field 'generator.layout_bank' names a bad layout bank ({err})") from None
        return cls(folder, manifest, graphs, tokenizer, bank)

    # ----------------------------------------------------------------- networks
    def network(self, name: str):
        """network(x, t (B,), y (B,), cond) of graph ``name`` on numpy arrays (float32 in and out; an fp16
        export's feeds are cast, its outputs widened)."""
        graph, types = self.graphs[name], self._input_dtypes[name]

        def run(x, t, y, cond=None):
            feeds = {"x": x, "t": t, "y": y}
            if cond is not None:
                feeds["cond"] = cond
            feeds = {k: np.ascontiguousarray(v, dtype=types[k]) for k, v in feeds.items() if k in types}
            return np.asarray(graph.run(feeds)[0], dtype=np.float32)

        return run

    def device_context(self):
        """The GPU context of device-resident sampling, or None (ONNX Runtime, or no NVRTC: host sampling)."""
        if self._device is None:
            graph = self.graphs[TEXTURE]
            self._device = False
            if hasattr(graph, "run_device"):
                from .backends.cuda_arrays import DeviceContext, DeviceUnavailable

                try:
                    self._device = DeviceContext(graph.device)
                except DeviceUnavailable as err:
                    warnings.warn(f"sampling with host round trips per step: {err}", stacklevel=2)
        return self._device or None

    def _on_device(self, array: np.ndarray, dtype):
        """A device copy of a host array that stays the same during a generation (labels, layouts)."""
        hit = self._uploads.get(id(array))
        if hit is None or hit[0] is not array:
            hit = self._uploads[id(array)] = (array, self._device.upload(np.asarray(array, dtype=dtype)))
        return hit[1]

    def device_network(self, name: str):
        """network(x, t, y, cond) of graph ``name`` on device arrays: x and t are device arrays (float32),
        y and cond host arrays uploaded once; returns the float32 velocity on the device."""
        graph, types, ctx = self.graphs[name], self._input_dtypes[name], self._device

        def run(x, t, y, cond=None):
            feeds = {"x": x.astype(types["x"]), "t": t.astype(types["t"]), "y": self._on_device(y, types["y"])}
            if cond is not None and "cond" in types:
                feeds["cond"] = self._on_device(cond, types["cond"])
            return graph.run_device(feeds, ctx)[0].astype(np.float32)

        return run

    # ----------------------------------------------------------------- sampling
    def _layouts(self, y: np.ndarray, rng, steps: int, sampler: str, cfg_scale: float, calibrate: bool):
        if LAYOUT not in self.graphs:
            if self.bank is None:
                raise ValueError("this generator export has no layout network and no layout bank")
            g = np.stack(stages.pick_layouts(self.bank, y, rng)).astype(np.float32)
            return g, g
        stats = self.section["stats"][LAYOUT]
        z = stages.start_noise(rng, len(y), self.num_tokens, stages.LAYOUT_CHANNELS, self._like())
        velocity = stages.guided_velocity(self._network(LAYOUT), y, None, cfg_scale, (0.0, 1.0), self.null_class)
        x = _host(stages.sample_layout(velocity, z, steps, sampler, cfg_scale))
        g = stages.denormalize(x, stats["mean"], stats["std"])
        return g, (stages.calibrate_batch(g, self.tile, self.s_min) if calibrate else g)

    def generate(self, labels, seed: int = 0, cfg_scale: float | None = None, guidance=None, layout_steps: int | None = None,
                 steps: int | None = None, sampler: str | None = None, layout_sampler: str | None = None,
                 layout_cfg_scale: float | None = None, decode: bool = True) -> Generation:
        """Every stage of a generation for class ids ``labels``; options default to the manifest's
        ``sampler_defaults`` (the generator's own, official unless it was saved with others). ``steps``: texture-stage steps (SDE points or ODE steps)."""
        o = stages.resolve_options(self.defaults, cfg_scale=cfg_scale, guidance=guidance, layout_steps=layout_steps,
                                   texture_steps=steps, sampler=sampler, layout_sampler=layout_sampler,
                                   layout_cfg_scale=layout_cfg_scale)
        cfg_scale, guidance, layout_steps, steps = o["cfg_scale"], tuple(o["guidance"]), o["layout_steps"], o["texture_steps"]
        sampler, layout_sampler, layout_cfg_scale = o["sampler"], o["layout_sampler"], o["layout_cfg_scale"]
        stages.check_options(sampler, cfg_scale, guidance, layout_cfg_scale, layout_steps, steps, layout_sampler)
        y = stages.check_labels(labels, self.num_classes)
        b = len(y)
        rng = core.pcg64(seed)
        self._uploads.clear()
        sampled = cond = None
        if self.two_stage:
            sampled, cond = self._layouts(y, rng, layout_steps, layout_sampler, layout_cfg_scale, True)
        stats = self.section["stats"][TEXTURE]
        channels = self.section["channels"][TEXTURE]
        z = stages.start_noise(rng, b, self.num_tokens, channels, self._like())
        velocity = stages.guided_velocity(self._network(TEXTURE), y, cond, cfg_scale, guidance, self.null_class)
        move = None if self.device_context() is None else self._device.upload
        x = _host(stages.sample_texture(velocity, z, rng, steps, sampler, cfg_scale, move_noise=move))
        self._uploads.clear()
        g, f = stages.split_tokens(stages.denormalize(x, stats["mean"], stats["std"]), cond)
        tile = self.tile
        tokens = Tokens(g=g.astype(np.float32), f=f.astype(np.float32),
                        g_init=(cond if cond is not None else np.zeros_like(g)).astype(np.float32),
                        image_size=(tile, tile), tiles=np.array([[0, 0, tile - 1, tile - 1]], np.int32),
                        tile_index=np.zeros(self.num_tokens, np.int32))
        images = self.tokenizer.decode(tokens) if decode else None
        return Generation(labels=y, tokens=tokens, layout_sampled=sampled, images=images)

    def _like(self):
        """An array of the sampler's namespace: float32 on the device when sampling there, else numpy."""
        ctx = self.device_context()
        return np.zeros((), np.float32) if ctx is None else ctx.empty((1,))

    def _network(self, name: str):
        return self.network(name) if self.device_context() is None else self.device_network(name)

    def sample_tokens(self, labels, seed: int = 0, **options) -> Tokens:
        """Tokens (g (B, L, 5), f (B, L, C)) for class ids ``labels``; options as ``generate``."""
        return self.generate(labels, seed=seed, decode=False, **options).tokens

    def sample(self, labels, seed: int = 0, cfg_scale: float | None = None, steps: int | None = None,
               sampler: str | None = None, **options) -> np.ndarray:
        """(B, H, W, 3) uint8 images for class ids ``labels``, decoded by the carried tokenizer export."""
        return self.generate(labels, seed=seed, cfg_scale=cfg_scale, steps=steps, sampler=sampler, **options).images


def _host(x):
    """A sampled state on the host (device arrays are downloaded, numpy passes through)."""
    return x.get() if hasattr(x, "gpstoken_ops") else x
