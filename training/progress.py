"""What a run shows and records: a tqdm bar, ``OUT/log.jsonl`` and TensorBoard when it is installed.

Only rank 0 writes; on the other ranks ``Progress`` does nothing, so a trainer calls it unconditionally.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("gpstoken.train")


def setup_logging(main: bool) -> None:
    """Messages on stderr, warnings only from ranks other than 0 (one copy of each note, not N)."""
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(message)s")


class Progress:
    """Rank 0's bar over steps ``initial..total``, scalar rows in log.jsonl (+ TensorBoard), pictures."""

    def __init__(self, out: str | Path, total: int, initial: int, main: bool, tensorboard: bool = True):
        from tqdm import tqdm

        self.out, self.main = Path(out), main
        self.writer = None
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self.writer = _summary_writer(self.out / "tensorboard")
        self.bar = tqdm(total=total, initial=initial, disable=not main, unit="step", dynamic_ncols=True, mininterval=2)

    def step(self) -> None:
        self.bar.update(1)

    def scalars(self, step: int, stats: dict[str, float], show: tuple[str, ...] = ()) -> None:
        """Append ``{"step": step, **stats}`` to log.jsonl and TensorBoard; ``show`` keys go on the bar."""
        if not self.main:
            return
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in stats.items() if k in show})
        with open(self.out / "log.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **stats}) + "\n")
        if self.writer is not None:
            for k, v in stats.items():
                self.writer.add_scalar(k, v, step)

    def image(self, tag: str, picture: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 picture to TensorBoard (nothing without it)."""
        if self.writer is not None:
            self.writer.add_image(tag, picture, step, dataformats="HWC")

    @property
    def pictures(self) -> bool:
        """Whether ``image`` records anything (so a trainer can skip drawing)."""
        return self.writer is not None

    def write(self, message: str) -> None:
        """A line printed above the bar (rank 0 only)."""
        if self.main:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _summary_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: scalars go to log.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(str(path))
