"""`featstore` commands, one module per topic, each with ``register(app)``."""

from __future__ import annotations

import importlib

import typer

_MODULES = ("tiling", "encoders", "extract", "store")


def register(app: typer.Typer) -> None:
    """Add every featstore command module present to *app*."""
    for name in _MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        mod.register(app)
