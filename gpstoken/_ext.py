"""Loading the compiled torch extension with errors that say what to do."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch


def load_extension() -> None:
    package_dir = Path(__file__).resolve().parent
    try:
        build_info = importlib.import_module("gpstoken._build_info")
        importlib.import_module("gpstoken._C")
    except ImportError as err:
        raise ImportError(
            f"gpstoken's compiled extension is missing from {package_dir}. If this is the source tree, "
            "you are importing it instead of the installed package: install with `pip install .` and "
            "run from another directory (or `pip install --no-build-isolation -e .` for development). "
            f"Original error: {err}"
        ) from err
    running = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if running != build_info.TORCH_MAJOR_MINOR:
        raise ImportError(
            f"gpstoken was built against torch {build_info.TORCH_VERSION} but torch {torch.__version__} is "
            "running; torch has no binary compatibility across minor versions. Rebuild: "
            "pip install --no-build-isolation --no-deps --force-reinstall ."
        )
