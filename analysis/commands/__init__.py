"""Analysis commands, one module per topic, each with ``register(featstore_app, mil_app)``."""

from __future__ import annotations

import typer

from featstore.commands import command_modules

_MODULES = ("cka", "compare", "probe", "umap")


def register(featstore_app: typer.Typer, mil_app: typer.Typer) -> None:
    """Add every analysis command module present to the two apps."""
    for mod in command_modules(__name__, _MODULES):
        mod.register(featstore_app, mil_app)
