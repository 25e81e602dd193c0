"""`featstore stain-qc`: tiles before and after the stain normalisation a store's features record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from featstore.core.ui import out_console


def register(app: typer.Typer) -> None:
    @app.command("stain-qc")
    def stain_qc_cmd(
        store: Annotated[str, typer.Option("--store", help="Feature store (path or URL).")],
        encoder: Annotated[str, typer.Option("--encoder", "-e", help="Encoder of the features.")],
        weights: Annotated[str, typer.Option(help="Weights tag of stain-normalised features, e.g. imagenet-stain-macenko.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="QC picture (PNG): each slide's tiles before and after.")],
        minus: Annotated[int, typer.Option(help="Truncation level of the features.")] = 0,
        n_slides: Annotated[int, typer.Option(help="Slides to show.")] = 4,
        per_slide: Annotated[int, typer.Option(help="Tiles per slide (evenly spaced over its patches).")] = 4,
        slides: Annotated[Optional[list[str]], typer.Option(help="Slide folders, if the files moved since extraction.")] = None,
    ) -> None:
        """Check the stain normalisation really applied to a store's features: the recorded
        normaliser re-applied to tiles read again, a before/after picture and stain-vector angles."""
        from rich.table import Table

        from featstore.stain.qc import stain_qc
        from featstore.store import open_store

        qc = stain_qc(open_store(store), encoder, minus, weights, out, n_slides=n_slides, per_slide=per_slide,
                      slides=slides)
        table = Table(title=f"{qc.method} (reference {qc.source}): angle to the reference's H/E vectors, degrees")
        for col in ("slide", "before", "after"):
            table.add_column(col)
        for sid, (a, b) in qc.angles.items():
            table.add_row(sid, f"{a:.1f}", f"{b:.1f}")
        out_console.print(table)
        out_console.print(f"picture: {qc.picture}", highlight=False)
