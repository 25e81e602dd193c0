"""`featstore umap`: 2-D embedding plot of slide or tile features (umap-learn optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from featstore.core.ui import out_console as _console


def umap_cmd(
    store: Annotated[str, typer.Option("--store", help="Feature store (Zarr).")],
    encoder: Annotated[List[str], typer.Option(
        "--encoder", help="ENCODER[:WEIGHTS]; repeat to embed several weights of one architecture jointly.")],
    minus: Annotated[int, typer.Option("--minus", help="Truncation level K (minus K).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for <method>.png and <method>.csv.")],
    labels: Annotated[Optional[Path], typer.Option(
        "--labels", help="slide_id,label CSV: colour by label and keep labelled slides only.")] = None,
    level: Annotated[str, typer.Option("--level", help="slide (mean-pooled) or tile (subsampled).")] = "slide",
    max_tiles: Annotated[int, typer.Option("--max-tiles", help="Tiles per feature set at --level tile.")] = 5000,
    method: Annotated[str, typer.Option("--method", help="umap (needs umap-learn) or pca.")] = "umap",
    color_by: Annotated[Optional[str], typer.Option(
        "--color-by", help="label or encoder (default: encoder when several, else label).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subsample and the embedding.")] = 0,
) -> None:
    """Embed slide or tile features in 2-D and plot them coloured by label or encoder."""
    from analysis.blockwise import parse_set
    from analysis.probe import read_slide_labels
    from analysis.umap import collect_points, plot_embedding
    from featstore import open_store

    st = open_store(store)
    lab = None
    if labels is not None:
        sl = read_slide_labels(labels)
        lab = dict(zip(sl.slide_ids, sl.labels))
    sets = [(e, minus, w) for e, w in map(parse_set, encoder)]
    points = collect_points(st, sets, level=level, labels=lab, max_tiles=max_tiles, seed=seed)
    paths = plot_embedding(points, out, method=method, seed=seed, color_by=color_by)
    _console.print(f"{method}: {len(points.ids):,} points -> {paths['png']} and {paths['csv']}")


def register(featstore_app: typer.Typer, mil_app: typer.Typer) -> None:
    featstore_app.command("umap")(umap_cmd)
