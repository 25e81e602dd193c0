"""`featstore` commands, one module per topic, each with ``register(app)``."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import typer

_MODULES = ("tiling", "encoders", "extract", "store", "pretrain", "stain", "geojson")


def command_modules(package: str, names: tuple[str, ...]) -> Iterator[ModuleType]:
    """Import ``package.<name>`` for each name that exists (shared by the three packages)."""
    for name in names:
        try:
            yield importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{name}":
                raise


def register(app: typer.Typer) -> None:
    """Add every featstore command module present to *app*."""
    for mod in command_modules(__name__, _MODULES):
        mod.register(app)
