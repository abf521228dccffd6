"""Evaluating a generator: N images per class, FID against real images, and a judge classifier's view.

A judge is any object with ``predict(images) -> labels (N,)`` and ``features(images) -> (N, D)`` on uint8
images (N, H, W, 3) (e.g. the digits judge); ``judge_metrics`` gives its per-class accuracy on generated
images (did the generator draw the class it was asked for?) and the Frechet distance between generated
and real images in its feature space (a small-data FID). Images for index i are of class
``classes[i % len(classes)]`` (the official label rule), made in consecutive batches; batch j uses seed + j.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from gpstoken_core.files import atomic_folder, atomic_write_text
from gpstoken_core.imageio import center_crop_resize

from ..imagesets import DataError, list_images, read_image
from ..perceptual import InceptionFeatures, frechet_distance


class Judge(Protocol):
    def predict(self, images: np.ndarray) -> np.ndarray: ...  # uint8 (N, H, W, 3) -> (N,) class ids

    def features(self, images: np.ndarray) -> np.ndarray: ...  # uint8 (N, H, W, 3) -> (N, D)


def generate_per_class(gen, classes: list[int], num_per_class: int, seed: int = 0, batch: int = 8, progress: bool = True, **sample):
    """(images uint8 (N, H, W, 3), labels (N,)) with N = num_per_class * len(classes); ``sample``: options of
    ``GPSGenerator.generate`` (cfg_scale, sampler, texture_steps, ...)."""
    from tqdm import tqdm

    if num_per_class < 1 or batch < 1:
        raise ValueError(f"--num-per-class and --batch must be >= 1, got {num_per_class} and {batch}")
    gen._labels(classes)  # unknown class ids: one line before any sampling
    labels = np.array([classes[i % len(classes)] for i in range(num_per_class * len(classes))], dtype=np.int64)
    images = []
    for j, start in enumerate(tqdm(range(0, len(labels), batch), desc="generate", unit="batch", disable=not progress)):
        images.append(gen.generate(labels[start : start + batch].tolist(), seed=seed + j, **sample).images)
    return np.concatenate(images), labels


def inception_features(model: InceptionFeatures, images: np.ndarray, batch: int = 16) -> torch.Tensor:
    """(N, 2048) FID features of uint8 images (N, H, W, 3)."""
    device = next(model.parameters(), torch.empty(0)).device  # a stand-in without weights runs on the CPU
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch])).to(device)
            out.append(model(x.permute(0, 3, 1, 2).float() / 127.5 - 1).cpu())
    return torch.cat(out)


def judge_metrics(judge: Judge, images: np.ndarray, labels: np.ndarray, reference: np.ndarray | None = None) -> dict:
    """The judge's accuracy on generated images per asked-for class and overall, and (with reference
    images) the Frechet distance between the two sets in the judge's feature space."""
    predicted = np.asarray(judge.predict(images)).reshape(-1)
    if predicted.shape != labels.shape:
        raise ValueError(f"judge.predict returned {predicted.shape[0]} labels for {len(labels)} images")
    per_class = {str(int(c)): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}
    out = {"accuracy": float((predicted == labels).mean()), "per_class_accuracy": per_class}
    if reference is not None:
        a, b = np.asarray(judge.features(images)), np.asarray(judge.features(reference))
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(f"judge.features must give (N, D) arrays, got {a.shape} and {b.shape}")
        out["frechet_distance"] = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    return out


def load_reference(folder: str | Path, size: int) -> np.ndarray:
    """Real images of a folder (recursive), resized and centre-cropped to size x size, uint8 (N, H, W, 3)."""
    names = list_images(str(folder))
    try:
        return np.stack([center_crop_resize(read_image(n), size) for n in names])
    except (OSError, ValueError) as err:
        raise DataError(f"{folder}: a reference image cannot be read ({err})") from None


def load_judge(spec: str, argument: str | None = None) -> Judge:
    """``MODULE:FACTORY`` -> ``FACTORY(argument)`` (or ``FACTORY()``): the plug-in point for judges."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--judge must be MODULE:FACTORY, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--judge {spec}: cannot load it ({err})") from None
    judge = factory(argument) if argument is not None else factory()
    missing = [m for m in ("predict", "features") if not callable(getattr(judge, m, None))]
    if missing:
        raise ValueError(f"--judge {spec}: the judge has no {' or '.join(missing)} method")
    return judge


def evaluate_generator(
    gen, classes: list[int], num_per_class: int, *, reference: np.ndarray | None = None, inception: InceptionFeatures | None = None,
    judge: Judge | None = None, seed: int = 0, batch: int = 8, progress: bool = True, **sample,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """(report, images, labels): FID with ``inception`` against ``reference``, and ``judge_metrics``."""
    images, labels = generate_per_class(gen, classes, num_per_class, seed, batch, progress, **sample)
    report: dict = {"classes": [int(c) for c in classes], "num_per_class": num_per_class, "images": len(images), "seed": seed}
    report |= {k: v if isinstance(v, (int, float, str)) else list(v) for k, v in sample.items()}
    if inception is not None:
        if reference is None:
            raise ValueError("FID needs --reference images")
        report["fid"] = frechet_distance(inception_features(inception, images), inception_features(inception, reference))
        report["fid_reference_images"] = len(reference)
    if judge is not None:
        report["judge"] = judge_metrics(judge, images, labels, reference)
    return report, images, labels


def evaluate_generator_cli(args) -> None:
    """``gpstoken eval-generator``: checks first, then generate, measure, write."""
    if args.inception_weights is None and args.judge is None:
        raise ValueError("nothing to measure: give --inception-weights (FID) and/or --judge")
    if args.inception_weights is not None and args.reference is None:
        raise ValueError("FID needs --reference (a folder of real images)")
    if args.samples is not None and args.samples.exists() and any(args.samples.iterdir()):
        raise FileExistsError(f"{args.samples}: exists and is not empty; choose a new folder")
    from .pipeline import GPSGenerator

    gen = GPSGenerator.from_pretrained(args.model, device=args.device)
    classes = list(range(gen.num_classes)) if not args.classes else [int(c) for c in args.classes.split(",")]
    inception = InceptionFeatures.from_weights(args.inception_weights).to(args.device) if args.inception_weights else None
    judge = load_judge(args.judge, args.judge_weights) if args.judge else None
    reference = load_reference(args.reference, gen.tokenizer.config.tile) if args.reference else None
    report, images, labels = evaluate_generator(
        gen, classes, args.num_per_class, reference=reference, inception=inception, judge=judge, seed=args.seed,
        batch=args.batch, cfg_scale=args.cfg, sampler=args.sampler, texture_steps=args.steps, layout_steps=args.layout_steps,
    )  # fmt: skip
    report["model"] = str(args.model)
    if args.samples is not None:
        from PIL import Image

        with atomic_folder(args.samples) as tmp:
            for i, (image, label) in enumerate(zip(images, labels)):
                Image.fromarray(image).save(tmp / f"class{int(label)}_{i:05d}.png")
    text = json.dumps(report, indent=1)
    if args.report is not None:
        atomic_write_text(args.report, text + "\n")
    print(text)
