"""Analysis commands, one module per topic, each with ``register(featstore_app, mil_app)``."""

from __future__ import annotations

import importlib

import typer

_MODULES = ("cka", "compare", "probe", "umap", "study")


def register(featstore_app: typer.Typer, mil_app: typer.Typer) -> None:
    """Add every analysis command module present to the two apps."""
    for name in _MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        mod.register(featstore_app, mil_app)
