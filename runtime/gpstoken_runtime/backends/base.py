"""What every inference backend offers: one object per graph, ``run(feeds) -> outputs``, built from an
export's manifest. Callers (the tokenizer, later the generator) never special-case a backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class Backend(ABC):
    """One loaded graph."""

    input_names: list[str]
    output_names: list[str]

    @classmethod
    @abstractmethod
    def from_manifest(cls, folder: Path, manifest: dict, graph: str, device: str = "cpu", threads: int | None = None,
                      **options) -> Backend:
        """Load the file of ``graph`` (a name in the manifest's ``files``) that this backend runs."""

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in ``output_names`` order."""
