"""`featstore export-geojson`: a slide's tissue contours and store tiles as QuPath GeoJSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from featstore.core.ui import out_console


def export_geojson(
    store: Annotated[str, typer.Argument(help="Feature store (path or fsspec URL) made by `featstore extract`.")],
    slide_id: Annotated[str, typer.Argument(help="Slide id in the store (`featstore ls STORE` lists them).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="GeoJSON file to write, e.g. slide.geojson.")],
    slide: Annotated[Optional[Path], typer.Option(help="The slide file, for the tissue contours (default: the "
                                                       "source path the store recorded).")] = None,
    tissue: Annotated[bool, typer.Option(help="Trace the tissue mask's contours (reads the slide's thumbnail); "
                                              "--no-tissue writes the tiles alone, without the slide file.")] = True,
) -> None:
    """Write a slide's tissue contours and tiles (with tissue fraction and store row) as QuPath GeoJSON,
    in level-0 pixels: drag the file onto the slide in QuPath (`mil heatmap --geojson` adds attention)."""
    from featstore.geojson import slide_geojson, slide_tissue, write_geojson
    from featstore.store import open_store

    st = open_store(store)
    if slide_id not in st.slide_ids():
        from featstore.errors import StoreError

        raise StoreError(f"{store} has no slide {slide_id!r}; `featstore ls {store}` lists its slides")
    mask = slide_tissue(st, slide_id, slide) if tissue else None
    doc = slide_geojson(st, slide_id, tissue=mask)
    path = write_geojson(doc, out)
    n_tiles = sum(f["properties"]["objectType"] == "tile" for f in doc["features"])
    n_regions = len(doc["features"]) - n_tiles
    out_console.print(f"{slide_id}: {n_tiles} tiles" + (f", {n_regions} tissue region(s)" if tissue else "")
                      + f" written to {path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("export-geojson")(export_geojson)
