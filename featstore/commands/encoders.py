"""`featstore encoders`: the encoder zoo, levels, preprocessing and weights on this machine."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from featstore.core.ui import check_format, out_console, write_json, write_tsv
from featstore.errors import EncoderError

if TYPE_CHECKING:
    from featstore.encoders import EncoderSpec, WeightsSpec


def _tag_note(spec: EncoderSpec, wspec: WeightsSpec) -> str:
    """What tag *wspec* changes of the entry's minus-0 dim, depth and pooling, e.g.
    ``" (2560-d, cls+mean)"`` for Virchow2; ``""`` when it changes none of them.

    The tagged spec (the tag's kwargs merged over the entry's, its pooling; what
    ``create_encoder(name, TAG)`` builds) is plain data, and the runner's ``dim`` reads only its
    ``spec`` (token width x the pooling's factor), so no model is built and no file is read.
    """
    from featstore.encoders.registry import tagged_spec
    from featstore.encoders.runners import runner_class

    tagged = tagged_spec(spec, wspec)
    if tagged is spec:
        return ""
    dims = [runner_class(s).dim(SimpleNamespace(spec=s), 0, s.pooling) for s in (spec, tagged)]
    parts = [f"{dims[1]}-d"] if dims[1] != dims[0] else []
    if len(tagged.taps) != len(spec.taps):
        parts.append(f"{len(tagged.taps)} blocks")
    if tagged.pooling != spec.pooling:
        parts.append(tagged.pooling)
    return f" ({', '.join(parts)})" if parts else ""


def _weights_cell(name: str, show_paths: bool) -> str:
    """``random``, then one line per weight tag: the tag (with its own dim, depth or pooling
    where they differ from the entry's) and whether its file is on this machine."""
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
        lines.append(f"{tag}{_tag_note(spec, wspec)}  {status}")
    return "\n".join(lines)


def _weights_records(name: str) -> list[dict]:
    """One record per weights tag of *name* (``random`` first): its status and file, whole."""
    from featstore.encoders import expected_paths, find_weights, get_spec

    spec = get_spec(name)
    levels = [f"{k}:{spec.dims[k]}" for k in spec.all_levels]
    base = {"encoder": name, "levels": levels, "pooling": spec.pooling, "input_size": spec.input_size,
            "interpolation": spec.interpolation}
    out = [{**base, "weights": "random", "status": "built in", "path": "", "note": ""}]
    for tag, wspec in spec.weights.items():
        found = find_weights(wspec)
        where = expected_paths(wspec)
        path = str(found) if found is not None else (str(where[0]) if where else "")
        out.append({**base, "weights": tag, "status": "present" if found is not None else "missing",
                    "path": path, "note": _tag_note(spec, wspec).strip(" ()")})
    return out


def _levels_cell(name: str) -> str:
    """The ``--minus all`` levels with dims and taps; "any of 0..N-1" when all is a subset."""
    from featstore.encoders import get_spec

    spec = get_spec(name)
    lines = [f"{k}: {spec.dims[k]:>4}  {spec.taps[k]}" for k in spec.all_levels]
    if spec.all_levels != spec.levels:
        lines.append(f"(all = these; any 0..{len(spec.levels) - 1})")
    return "\n".join(lines)


def _pooling_cell(name: str) -> str:
    """The default pooling first, then the others the encoder's family offers."""
    from featstore.encoders import get_spec
    from featstore.encoders.runners import runner_class

    spec = get_spec(name)
    others = [p for p in runner_class(spec).poolings if p != spec.pooling]
    return "\n".join([f"{spec.pooling} (default)", *others])


def encoders(
    pattern: Annotated[str, typer.Argument(help="Wildcard over encoder names, e.g. 'res*'.")] = "*",
    paths: Annotated[bool, typer.Option("--paths/--no-paths",
                                        help="Show where each weights file is or is expected.")] = True,
    fmt: Annotated[str, typer.Option("--format", help="table (for people) | tsv | json: one record per "
                                                      "encoder x weights tag, names and paths whole.")] = "table",
) -> None:
    """List encoders: the levels `--minus all` takes with dims, pooling, input, weight tags
    and whether each weights file is present on this machine (offline lookup only)."""
    from featstore.encoders import get_spec, list_encoders

    check_format(fmt)
    names = list_encoders(pattern)
    if not names:
        raise EncoderError(f"no encoder matches {pattern!r}; run `featstore encoders` to see all")
    if fmt != "table":
        records = [r for name in names for r in _weights_records(name)]
        if not paths:
            records = [{k: v for k, v in r.items() if k != "path"} for r in records]
        write_tsv(records) if fmt == "tsv" else write_json(records)
        return
    table = Table(title="featstore encoders", show_lines=True)
    table.add_column("encoder", style="bold", overflow="fold")
    table.add_column("levels (minus K: dim)")
    table.add_column("pooling")
    table.add_column("input")
    table.add_column("weights (tag, file on this machine)", overflow="fold")
    for name in names:
        spec = get_spec(name)
        inp = f"{spec.input_size} px\n{spec.interpolation}"
        table.add_row(name, _levels_cell(name), _pooling_cell(name), inp, _weights_cell(name, paths))
    out_console.print(table)


def register(app: typer.Typer) -> None:
    """Add `featstore encoders` to *app*."""
    app.command("encoders")(encoders)
