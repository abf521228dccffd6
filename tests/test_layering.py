"""The import graph of the four packages, read from their sources: one direction only, no cycles.

DESIGN.md's layers: gpstoken_core (torch-free) <- gpstoken (torch library) <- gpstoken_export, and
gpstoken_core <- gpstoken_runtime. Package edges count every import statement, also those inside
functions (a lazy import is still a dependency); module cycles count the imports that run when a module
is imported (top level), since those are what fail as a circular import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "gpstoken_core": ROOT / "runtime" / "gpstoken_core",
    "gpstoken": ROOT / "gpstoken",
    "gpstoken_runtime": ROOT / "runtime" / "gpstoken_runtime",
    "gpstoken_export": ROOT / "export" / "gpstoken_export",
}
# who may import whom (DESIGN.md); the exporter's parity tool runs the deployed runtime end to end
ALLOWED = {
    "gpstoken_core": set(),
    "gpstoken": {"gpstoken_core"},
    "gpstoken_runtime": {"gpstoken_core"},
    "gpstoken_export": {"gpstoken", "gpstoken_core", "gpstoken_runtime"},
}


def module_files() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(all imported project modules, those imported at module level) of one module."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports guarded by `if` / `try` at module level also run on import
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    every, eager = set(), set()

    def add(target: str, node) -> None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            every.add(target)
            if id(node) in top_level:
                eager.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(base[: len(base) - node.level + 1])
                source = f"{prefix}.{node.module}" if node.module else prefix
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                add(full if full in modules else source, node)
    return every, eager


def graph():
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_packages_import_one_way_only():
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    where: dict[tuple[str, str], str] = {}
    for module, (every, _) in graph().items():
        src = module.split(".")[0]
        for target in every:
            dst = target.split(".")[0]
            if dst != src:
                edges[src].add(dst)
                where.setdefault((src, dst), f"{module} -> {target}")
    bad = [f"{where[(s, d)]}" for s in edges for d in edges[s] if d not in ALLOWED[s]]
    assert not bad, f"imports against the layering: {bad}"
    assert find_cycle(edges) is None


def test_no_import_cycle_between_modules():
    eager = {module: deps for module, (_, deps) in graph().items()}
    cycle = find_cycle(eager)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    """The checks above can fail: a planted cycle and a planted upward import are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    modules = module_files()
    tree = {"gpstoken_core.planted": ROOT / "runtime" / "gpstoken_core" / "tiling.py"}
    every, eager = imports_of("gpstoken_core.tiling", tree["gpstoken_core.planted"], modules)
    assert every == eager  # tiling imports nothing of the project lazily
    planted = ROOT / "tests" / "_planted_upward_import.py"
    planted.write_text("import numpy\nfrom gpstoken.tokens import Tokens\n\ndef f():\n    import gpstoken_runtime\n")
    try:
        every, eager = imports_of("gpstoken_core.planted", planted, modules)
    finally:
        planted.unlink()
    assert every == {"gpstoken.tokens", "gpstoken_runtime"} and eager == {"gpstoken.tokens"}


@pytest.mark.parametrize("package", ["gpstoken", "gpstoken_core"])
def test_importing_the_library_loads_neither_exporter_nor_runtime(package):
    """Every module of the library (and of the core) imported: gpstoken_export / gpstoken_runtime stay unloaded."""
    script = f"""
import importlib, pkgutil, sys
if "{package}" == "gpstoken":
    import torch  # the compiled gpstoken._C links libtorch, which torch loads first
import {package}
for info in pkgutil.walk_packages({package}.__path__, "{package}."):
    importlib.import_module(info.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("gpstoken_export", "gpstoken_runtime"))
assert not loaded, loaded
if "{package}" == "gpstoken_core":
    assert "torch" not in sys.modules, "the core imported torch"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT / "tests")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
