"""A straightforward pure-Python/numpy implementation of the official partition rules (Alg. 1) and
of calibration (Alg. 2), written for the tests and the benchmark: slow, but easy to check line by line
against the facts file. The C++ implementation must give exactly the same boxes."""

from __future__ import annotations

import numpy as np


def grey01(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float64) / 127.5 - 1
    return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2] + 1) / 2


def resize_bilinear(img: np.ndarray, out: int = 64) -> np.ndarray:
    """cv2.resize INTER_LINEAR / torch bilinear align_corners=False, no antialias."""

    def taps(n):
        s = np.maximum((np.arange(out) + 0.5) * (n / out) - 0.5, 0)
        i0 = np.minimum(np.floor(s).astype(int), n - 1)
        return i0, np.minimum(i0 + 1, n - 1), s - i0

    y0, y1, fy = taps(img.shape[0])
    x0, x1, fx = taps(img.shape[1])
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def sobel_magnitude(img: np.ndarray) -> np.ndarray:
    p = np.pad(img, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return np.sqrt(gx**2 + gy**2)


def complexity(grey: np.ndarray, box, lam: float, priority=None) -> float:
    x0, y0, x1, y1 = box
    region = grey[y0 : y1 + 1, x0 : x1 + 1]
    hist, _ = np.histogram(sobel_magnitude(resize_bilinear(region)), bins=512, range=(-5.5, 5.5))
    q = hist / (hist.sum() + 1e-5)
    entropy = -np.sum(q * np.log2(q + 1e-10))
    m = entropy**lam * region.shape[0] * region.shape[1]
    if priority is not None:
        m += priority[y0 : y1 + 1, x0 : x1 + 1].sum()
    return m


def _split(box, by_width):
    x0, y0, x1, y1 = box
    if by_width:
        half = (x1 - x0 + 1) // 2
        return (x0, y0, x0 + half - 1, y1), (x0 + half, y0, x1, y1)
    half = (y1 - y0 + 1) // 2
    return (x0, y0, x1, y0 + half - 1), (x0, y0 + half, x1, y1)


def _split_loop(whole, count, min_size, score, square_by_width):
    items = [(whole, score(whole) if count > 1 else 0.0)]
    while len(items) < count:
        items = sorted(items, key=lambda item: -item[1])  # Python's sort is stable
        pick = next(i for i, (b, _) in enumerate(items) if not (b[3] - b[1] <= min_size and b[2] - b[0] <= min_size))
        box = items.pop(pick)[0]
        w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
        by_width = w > h if w != h else square_by_width(box)
        a, b = _split(box, by_width)
        items += [(a, score(a)), (b, score(b))]
    return [b for b, _ in items]


def partition(grey: np.ndarray, count: int, lam: float = 2.5, min_size: int = 8, priority=None):
    h, w = grey.shape

    def score(box):
        return complexity(grey, box, lam, priority)

    def square_by_width(box):
        l, r = _split(box, True)
        t, b = _split(box, False)
        return min(score(l), score(r)) < min(score(t), score(b))

    return np.array(_split_loop((0, 0, w - 1, h - 1), count, min_size, score, square_by_width), dtype=np.int32)


def calibrate(gaussians: np.ndarray, height: int, width: int, s_min: int):
    def snap(mu, n):
        p = min(max((mu + 1) * (n - 1) / 2, 0), n - 1)
        cell = min(int(p // s_min), (n - 1) // s_min)
        return min(cell * s_min + (s_min - 1) / 2, n - 1)

    means = [(snap(g[3], width), snap(g[4], height)) for g in gaussians]

    def score(box):
        return float(sum(box[0] <= x <= box[2] and box[1] <= y <= box[3] for x, y in means))

    def square_by_width(box):
        line = box[0] + (box[2] - box[0] + 1) // 2 - 0.5
        return not any(x == line and box[1] <= y <= box[3] for x, y in means)

    boxes = _split_loop((0, 0, width - 1, height - 1), len(gaussians), s_min, score, square_by_width)
    return np.array(boxes, dtype=np.int32)


def boxes_to_gaussians(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    b = boxes.astype(np.float64)
    return np.stack(
        [
            (b[:, 2] - b[:, 0]) / width * 2 / 3,
            (b[:, 3] - b[:, 1]) / height * 2 / 3,
            np.zeros(len(b)),
            2 * ((b[:, 0] + b[:, 2]) / 2) / (width - 1) - 1,
            2 * ((b[:, 1] + b[:, 3]) / 2) / (height - 1) - 1,
        ],
        axis=1,
    )
