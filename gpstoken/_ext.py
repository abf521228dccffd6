"""Loading the compiled torch extension with errors that say what to do."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch


def _installed_package_dir() -> Path | None:
    """The installed gpstoken's folder when it is not this one (a source checkout on sys.path first, e.g.
    `python -m training.train_tokenizer` run from the repository root over a regular install)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        folder = Path(distribution("gpstoken").locate_file("gpstoken")).resolve()
    except PackageNotFoundError:
        return None
    here = Path(__file__).resolve().parent
    return folder if folder != here and (folder / "_build_info.py").exists() else None


def load_extension() -> None:
    package_dir = Path(__file__).resolve().parent
    try:
        try:
            build_info = importlib.import_module("gpstoken._build_info")
        except ImportError:
            # the source tree has no compiled parts: take them from the installed package of the same
            # project (its Python files stay the checkout's; _build_info below still checks torch)
            installed = _installed_package_dir()
            if installed is None:
                raise
            importlib.import_module("gpstoken").__path__.append(str(installed))
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
