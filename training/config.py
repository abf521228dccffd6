"""A trainer's settings are one dataclass: every field is a flag, ``--config FILE.json`` sets fields first.

Field help comes from ``field(metadata={"help": ...})``; bools get ``--x / --no-x``, ``tuple[float, float]``
takes two values. ``__post_init__`` may raise ValueError for a bad value: it is reported as a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def parse_config(cls: type[T], argv: list[str] | None, description: str) -> T:
    """``cls`` filled from ``--config`` and the command line (flags win); exits with a usage error."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", type=Path, help=f"JSON file with {cls.__name__} fields (flags override it)")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    for f in fields:
        flag, help_text = "--" + f.name.replace("_", "-"), f"{f.metadata.get('help', '')} (default: {f.default})"
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is tuple:
            items = typing.get_args(kind)
            parser.add_argument(flag, type=items[0], nargs=len(items), default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)
    args = parser.parse_args(argv)
    values = {}
    if args.config:
        try:
            values = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as err:
            parser.error(f"--config {args.config}: {err}")
        unknown = set(values) - {f.name for f in fields}
        if unknown:
            parser.error(f"--config {args.config}: unknown field(s) {', '.join(sorted(unknown))}")
    for f in fields:
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
        if typing.get_origin(hints[f.name]) is tuple and f.name in values:
            values[f.name] = tuple(values[f.name])  # argparse and JSON give lists
    try:
        return cls(**values)
    except ValueError as err:
        parser.error(str(err))


def require_positive(cfg, *names: str) -> None:
    """ValueError naming the flag when one of the integer fields ``names`` is below 1."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


def changed_on_resume(saved: dict, cfg, names: tuple[str, ...]) -> list[str]:
    """``name (saved vs now current)`` for each field in ``names`` that differs from the saved config."""
    now = dataclasses.asdict(cfg)
    return [f"{k} ({saved.get(k)!r} vs now {now.get(k)!r})" for k in names if saved.get(k) != now.get(k)]
