"""`mil` commands, one module per topic, each with ``register(app)``."""

from __future__ import annotations

import typer

from featstore.commands import command_modules

_MODULES = ("train", "finetune", "evaluate")


def register(app: typer.Typer) -> None:
    """Add every mil command module present to *app*."""
    for mod in command_modules(__name__, _MODULES):
        mod.register(app)
