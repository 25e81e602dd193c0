"""`featstore cka`: block-wise CKA between two encoders of a store; table, CSV and heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from featstore.core.ui import out_console as _console
from featstore.core.ui import progress_bar


def cka(
    store: Annotated[str, typer.Option("--store", help="Feature store (Zarr) holding both encoders.")],
    a: Annotated[str, typer.Option("--a", help="Rows: ENCODER[:WEIGHTS], e.g. resnet18:imagenet.")],
    b: Annotated[str, typer.Option("--b", help="Columns: ENCODER[:WEIGHTS], e.g. resnet18:finetuned.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for cka.csv and cka.png.")],
    levels: Annotated[Optional[str], typer.Option(
        "--levels", help="Comma-separated minus levels, e.g. 0,1,2,3 (default: every stored level).")] = None,
    kernel: Annotated[str, typer.Option("--kernel", help="linear (streams all tiles) or rbf (subsample).")] = "linear",
    debiased: Annotated[bool, typer.Option("--debiased", help="Unbiased HSIC estimator (Song et al. 2012).")] = False,
    max_tiles: Annotated[Optional[int], typer.Option(
        "--max-tiles", help="Use a random subset of this many tiles (rbf default 5000).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the tile subsample.")] = 0,
) -> None:
    """CKA between every level of encoder A and every level of encoder B on the same tiles."""
    from analysis.blockwise import blockwise_cka, parse_set
    from featstore import open_store
    from featstore.encoders import parse_levels

    st = open_store(store)
    with progress_bar(label="[bold]CKA[/]", eta=False, console=_console, transient=True) as bar:
        task = bar.add_task("slides", total=None)
        res = blockwise_cka(st, parse_set(a), parse_set(b), parse_levels(levels, option="--levels"), kernel=kernel,
                            debiased=debiased, max_tiles=max_tiles, seed=seed,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
    out.mkdir(parents=True, exist_ok=True)
    csv_path = res.write_csv(out / "cka.csv")
    png_path = res.plot(out / "cka.png")

    kind = ("debiased " if debiased else "") + f"{kernel} CKA"
    a_name, b_name = (f"{k[0]}:{k[1]}" for k in (res.rows[0], res.cols[0]))
    table = Table(title=f"{kind}: rows {a_name}, columns {b_name}\n{res.n_tiles:,} tiles of {len(res.slides)} slides")
    table.add_column("A \\ B", no_wrap=True)
    for c in res.cols:
        table.add_column(f"minus{c[2]}", justify="right")
    for i, r in enumerate(res.rows):
        table.add_row(f"minus{r[2]}", *[f"{v:.3f}" for v in res.matrix[i]])
    _console.print(table)
    _console.print(f"wrote {csv_path} and {png_path}")


def register(featstore_app: typer.Typer, mil_app: typer.Typer) -> None:
    featstore_app.command("cka")(cka)
