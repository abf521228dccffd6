"""The library's torch-free modules the runtime builds on (partition, image reading, metrics).

From the runtime-only wheel they live in ``gpstoken_runtime._shared`` (installed from gpstoken's own
files); with the full ``gpstoken`` package they are gpstoken's. Neither path imports torch."""

import importlib

try:
    _package = importlib.import_module(f"{__package__}._shared").__name__
except ImportError:
    _package = "gpstoken"

# import_module, not `from gpstoken import partition`: gpstoken.partition is also the function's name.
imageio = importlib.import_module(f"{_package}.imageio")
metrics = importlib.import_module(f"{_package}.metrics")
partition = importlib.import_module(f"{_package}.partition")

__all__ = ["imageio", "metrics", "partition"]
