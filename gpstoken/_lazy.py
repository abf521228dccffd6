"""Module attributes loaded on first use (PEP 562), so importing a package stays light: the CLI parses
arguments and the core runs without torch until a name that needs it is touched."""

from __future__ import annotations

import importlib


def lazy_attributes(package: str, table: dict[str, str], namespace: dict):
    """``(__getattr__, __dir__)`` for ``package`` that import ``table[name]`` (a relative module) on first
    access of ``name`` and cache the value in ``namespace`` (the package's globals())."""

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(table[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
