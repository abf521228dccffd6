"""The digits demo: scikit-learn's 8x8 digits as 32x32 images, a fixed held-out split, and a judge.

Images. ``sklearn.datasets.load_digits`` bundles 1,797 labelled 8x8 digits (values 0..16, 10 classes; no
download). Each is mapped to grey uint8 as ``round(v * 255 / 16)`` (white ink on black, as stored),
upscaled 4x to 32x32 with PIL's bicubic filter (deterministic; smooth strokes rather than 8x8 blocks, so the
tokenizer sees shapes, not a pixel grid) and repeated into RGB. 32 rather than 64 px: the source has 8x8
pixels, and a 2-core CPU trains the whole pipeline on 32x32 four times faster.

Split. Per class, the images are permuted with ``numpy.random.default_rng(SPLIT_SEED)`` and the first
``round(TEST_FRACTION * n_class)`` are held out: ``digits:test`` (361 images), ``digits:train`` (1,436).
The tokenizer, the generators and the judge are trained on ``digits:train`` only.

Judge. An independent classifier (not one of our models): scikit-learn's MLPClassifier (one hidden ReLU
layer of JUDGE_HIDDEN units) on the image downsampled to JUDGE_SIDE x JUDGE_SIDE grey pixels in [0, 1]
(box average), trained on ``digits:train``. ``predict`` gives class ids and ``features`` the hidden-layer
activations (the space of the judge's Frechet distance, a small-data FID). The trained weights are plain
numpy arrays (safetensors + judge.json), so inference needs neither scikit-learn nor pickle; training does.

Everything here is numpy + PIL (+ scikit-learn to load the digits and to train the judge); no torch.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..imagesets import DataError

SIZE = 32  # side of a digit image
TEST_FRACTION = 0.2
SPLIT_SEED = 0
SPLITS = ("train", "test", "all")
NUM_CLASSES = 10
JUDGE_SIDE = 16  # the judge looks at 16x16 grey pixels: 2x2 boxes of the 32x32 image
JUDGE_HIDDEN = 64
JUDGE_SEED = 0
JUDGE_ITERATIONS = 300  # L-BFGS iterations (the budget: it stops there)
JUDGE_FORMAT = "gpstoken-digits-judge"
JUDGE_FILES = ("judge.json", "judge.safetensors")
# the shipped judge (trained by ``train_judge`` on digits:train); see gpstoken/weights/digits/README.md
SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "digits"


class DigitsError(DataError):
    """The digits cannot be loaded or a judge file is unusable; the message says why (a DataError, so the
    trainers and the CLI report it as one line)."""


# ----------------------------------------------------------------------------- images and split
@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DigitsError("digits: needs scikit-learn (pip install scikit-learn), which bundles the 8x8 digits") from None
    data = load_digits()
    grey = np.rint(data.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    big = np.stack([np.asarray(Image.fromarray(d).resize((SIZE, SIZE), Image.BICUBIC)) for d in grey])
    images = np.repeat(big[..., None], 3, axis=-1)  # (N, 32, 32, 3)
    labels = data.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # cached: callers must not change them
    return images, labels


@functools.lru_cache(maxsize=1)
def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into the 1,797 digits: stratified, seeded, sorted, disjoint."""
    _, labels = _all_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        held = round(TEST_FRACTION * len(members))
        test.append(members[:held])
        train.append(members[held:])
    out = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    for a in out:
        a.flags.writeable = False
    return out


def digit_images(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 3), labels int64 (N,)) of ``split``: train, test or all.

    The default is ``train``: the data source ``digits:`` of the shard writer trains generators, which must
    not see the held-out digits the judge's numbers are reported on."""
    if split not in SPLITS:
        raise DigitsError(f"unknown digits split {split!r}; choose one of {', '.join(SPLITS)}")
    images, labels = _all_digits()
    if split == "all":
        return images, labels
    index = split_indices()[0 if split == "train" else 1]
    return images[index], labels[index]


def parse_source(source: str) -> str:
    """``digits:``, ``digits:train``, ``digits:test``, ``digits:all`` -> the split name (``digits:`` is train)."""
    if not source.startswith("digits:"):
        raise DigitsError(f"not a digits source: {source!r}")
    split = source[len("digits:") :] or "train"
    if split not in SPLITS:
        raise DigitsError(f"{source}: unknown digits split {split!r}; choose digits:train, digits:test or digits:all")
    return split


def image_names(source: str) -> list[str]:
    """Names ``digits:SPLIT:i`` of a source's images, i the position within the split."""
    split = parse_source(source)
    return [f"digits:{split}:{i}" for i in range(len(digit_images(split)[1]))]


def read_digit(name: str) -> np.ndarray:
    """The image of a name ``digits:SPLIT:i`` (HxWx3 uint8)."""
    parts = name.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        raise DigitsError(f"{name}: expected digits:SPLIT:INDEX")
    images, _ = digit_images(parse_source(f"digits:{parts[1]}"))
    i = int(parts[2])
    if i >= len(images):
        raise DigitsError(f"{name}: the {parts[1]} split has {len(images)} images")
    return np.array(images[i])


# ----------------------------------------------------------------------------- the judge
def judge_pixels(images: np.ndarray) -> np.ndarray:
    """(N, JUDGE_SIDE**2) float64 in [0, 1]: the grey mean of each 2x2 box of uint8 (N, 32, 32, 3) images.

    Box averages instead of a resampling filter: exact, and the same on every platform."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3) or images.dtype != np.uint8:
        raise DigitsError(f"the judge takes uint8 (N, {SIZE}, {SIZE}, 3) images, got {images.dtype} {images.shape}")
    grey = images.astype(np.float64).mean(axis=-1) / 255.0
    k = SIZE // JUDGE_SIDE
    return grey.reshape(len(images), JUDGE_SIDE, k, JUDGE_SIDE, k).mean(axis=(2, 4)).reshape(len(images), -1)


@dataclass
class DigitsJudge:
    """An MLP (one hidden ReLU layer) in numpy: ``w1`` (D, H), ``b1`` (H,), ``w2`` (H, 10), ``b2`` (10,)."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    test_accuracy: float = float("nan")  # on digits:test, measured when trained

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, JUDGE_HIDDEN) hidden activations of uint8 (N, 32, 32, 3) images."""
        return np.maximum(judge_pixels(images) @ self.w1 + self.b1, 0.0)

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.features(images) @ self.w2 + self.b2

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N,) class ids of uint8 (N, 32, 32, 3) images."""
        return self.logits(images).argmax(axis=1)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())

    def save(self, folder: str | Path) -> Path:
        """Write judge.safetensors (the four arrays) + judge.json (format, sizes, held-out accuracy)."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(getattr(self, k), dtype=np.float32) for k in ("w1", "b1", "w2", "b2")}, folder / JUDGE_FILES[1])
        info = {
            "format": JUDGE_FORMAT, "side": JUDGE_SIDE, "hidden": int(self.w1.shape[1]), "classes": NUM_CLASSES,
            "split_seed": SPLIT_SEED, "test_fraction": TEST_FRACTION, "seed": JUDGE_SEED,
            "test_accuracy": self.test_accuracy,
        }  # fmt: skip
        (folder / JUDGE_FILES[0]).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> DigitsJudge:
        from safetensors.numpy import load_file

        folder = Path(folder)
        for name in JUDGE_FILES:
            if not (folder / name).is_file():
                raise DigitsError(f"{folder / name}: missing (a judge folder holds {' and '.join(JUDGE_FILES)})")
        info = json.loads((folder / JUDGE_FILES[0]).read_text())
        if info.get("format") != JUDGE_FORMAT or info.get("side") != JUDGE_SIDE:
            raise DigitsError(f"{folder / JUDGE_FILES[0]}: not a {JUDGE_FORMAT} of side {JUDGE_SIDE}")
        arrays = load_file(str(folder / JUDGE_FILES[1]))
        d, h = JUDGE_SIDE**2, int(info["hidden"])
        shapes = {"w1": (d, h), "b1": (h,), "w2": (h, NUM_CLASSES), "b2": (NUM_CLASSES,)}
        for key, shape in shapes.items():
            if key not in arrays or arrays[key].shape != shape:
                got = arrays[key].shape if key in arrays else "missing"
                raise DigitsError(f"{folder / JUDGE_FILES[1]}: {key} must be {shape}, got {got}")
        return cls(**{k: arrays[k].astype(np.float64) for k in shapes}, test_accuracy=float(info["test_accuracy"]))


def train_judge(
    images: np.ndarray | None = None, labels: np.ndarray | None = None, seed: int = JUDGE_SEED, iterations: int = JUDGE_ITERATIONS
) -> DigitsJudge:
    """Train the judge (scikit-learn, about a second) on ``digits:train`` or the given images/labels;
    its ``test_accuracy`` is measured on ``digits:test``."""
    try:
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        raise DigitsError("training the digits judge needs scikit-learn (pip install scikit-learn)") from None
    if images is None:
        images, labels = digit_images("train")
    # L-BFGS on the full batch: a second or two for 1.4k images, and no mini-batch order to depend on
    mlp = MLPClassifier(
        hidden_layer_sizes=(JUDGE_HIDDEN,), activation="relu", solver="lbfgs", alpha=1e-2, max_iter=iterations,
        random_state=seed, tol=0.0,
    )  # fmt: skip
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # one BLAS thread: the matrices are small, and on a shared CPU more threads spin rather than work
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is the budget, not a failure
        mlp.fit(judge_pixels(images), np.asarray(labels))
    if list(mlp.classes_) != list(range(NUM_CLASSES)):
        raise DigitsError(f"the judge's training labels must cover 0..{NUM_CLASSES - 1}, got {list(mlp.classes_)}")
    (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
    judge = DigitsJudge(w1, b1, w2, b2)
    judge.test_accuracy = judge.accuracy(*digit_images("test"))
    return judge


def load_judge(folder: str | None = None) -> DigitsJudge:
    """The judge from ``folder`` (default: the shipped one, gpstoken/weights/digits/judge); the factory for
    ``gpstoken eval-generator --judge gpstoken.generation.digits:load_judge``."""
    return DigitsJudge.load(folder if folder else SHIPPED / "judge")
