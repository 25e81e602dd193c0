"""`featstore encoders`: the encoder zoo, levels, preprocessing and weights on this machine."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from core.ui import out_console

from featstore.errors import EncoderError


def _weights_cell(name: str, show_paths: bool) -> str:
    from featstore.encoders import expected_paths, find_weights, get_spec

    spec = get_spec(name)
    lines = ["random  [green]built in[/]"]
    for tag, wspec in spec.weights.items():
        found = find_weights(wspec)
        if found is not None:
            status = "[green]present[/]" + (f" {found}" if show_paths else "")
        else:
            where = expected_paths(wspec)
            status = "[red]missing[/]" + (f" -> {where[0]}" if show_paths and where else "")
        lines.append(f"{tag}  {status}")
    return "\n".join(lines)


def encoders(
    pattern: Annotated[str, typer.Argument(help="Wildcard over encoder names, e.g. 'res*'.")] = "*",
    paths: Annotated[bool, typer.Option("--paths/--no-paths",
                                        help="Show where each weights file is or is expected.")] = True,
) -> None:
    """List encoders: truncation levels with dims, input preprocessing, weight tags and
    whether each weights file is present on this machine (offline lookup only)."""
    from featstore.encoders import get_spec, list_encoders

    names = list_encoders(pattern)
    if not names:
        raise EncoderError(f"no encoder matches {pattern!r}; run `featstore encoders` to see all")
    table = Table(title="featstore encoders", show_lines=True)
    table.add_column("encoder", style="bold")
    table.add_column("levels (minus K: dim)")
    table.add_column("input")
    table.add_column("weights (tag, file on this machine)", overflow="fold")
    for name in names:
        spec = get_spec(name)
        levels = "\n".join(f"{k}: {spec.dims[k]:>4}  {spec.taps[k]}" for k in spec.levels)
        inp = f"{spec.input_size} px\n{spec.interpolation}"
        table.add_row(name, levels, inp, _weights_cell(name, paths))
    out_console.print(table)


def register(app: typer.Typer) -> None:
    """Add `featstore encoders` to *app*."""
    app.command("encoders")(encoders)
