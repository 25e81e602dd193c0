"""`featstore tiles` (tiling + QC picture) and `featstore demo-data` (the demo cohort)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from featstore.core.config import help_of
from featstore.core.ui import counting_bar, out_console

from featstore.tiling import TilingConfig

_FIELDS = {f.name: f for f in dataclasses.fields(TilingConfig)}


def register(app: typer.Typer) -> None:
    @app.command("tiles")
    def tiles_cmd(
        slide: Annotated[Path, typer.Argument(help="A slide file (any format OpenSlide reads).")],
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="QC picture (PNG): thumbnail, tissue outline, kept patches.")] = None,
        patch_size: Annotated[int, typer.Option(help="Patch side in pixels at --mpp.")] = 512,
        mpp: Annotated[float, typer.Option(help="Target microns per pixel of a patch (0.5 ≈ 20x).")] = 0.5,
        overlap: Annotated[int, typer.Option(help="Overlap between patches in pixels at --mpp.")] = 0,
        min_tissue: Annotated[float, typer.Option(help="Keep patches with at least this tissue fraction.")] = 0.5,
        mask: Annotated[str, typer.Option("--mask", "--tissue", help=help_of(_FIELDS["mask"]))] = _FIELDS["mask"].default,
        mask_weights: Annotated[Optional[str], typer.Option(help=help_of(_FIELDS["mask_weights"]))] = None,
        qc: Annotated[str, typer.Option(help=help_of(_FIELDS["qc"]))] = _FIELDS["qc"].default,
        slide_mpp: Annotated[Optional[float], typer.Option(help="Microns per pixel of a slide whose file does not record it.")] = None,
        compare: Annotated[Optional[Path], typer.Option(help="Also save every mask method side by side (contour and "
                                                              "kept tiles each) to this PNG.")] = None,
    ) -> None:
        """Tile one slide: print the patch count and save a QC picture to check the tissue mask by eye."""
        from featstore.read.native import probe
        from featstore.qc import tiling_qc
        from featstore.read.slide import Slide
        from featstore.tiling import tile_slide

        cfg = TilingConfig(patch_size=patch_size, mpp=mpp, overlap=overlap, min_tissue=min_tissue, mask=mask,
                           mask_weights=mask_weights or "", qc=qc)
        con = out_console
        with Slide(slide, mpp=slide_mpp) as s:
            tiles = tile_slide(s, cfg)
            if len(tiles) == 0:
                con.print(f"{slide}: no tissue found (0 patches with >= {min_tissue:.0%} tissue)")
            else:
                con.print(f"{slide}: {len(tiles)} patches of {tiles.size0} level-0 px "
                          f"({patch_size} px @ {mpp} µm/px; slide {s.mpp:.4g} µm/px, {s.vendor})", highlight=False)
            if tiles.qc_flags is not None:
                con.print(f"QC: {tiles.qc_summary()}", highlight=False)
            layout = probe(s.path, s.level_dimensions)
            con.print("reader (--reader auto): " + (f"native ({len(layout.levels)} JPEG-tiled levels)"
                      if not isinstance(layout, str) else f"openslide (native reader: {layout})"), highlight=False)
            if out is not None:
                con.print(f"QC picture: {tiling_qc(s, tiles, out)}")
            if compare is not None:
                from featstore.qc import masks_compare

                path, counts = masks_compare(s, cfg, compare)
                con.print("masks compared: " + ", ".join(f"{m} {n} tiles" for m, n in counts.items())
                          + f" -> {path}", highlight=False)

    @app.command("demo-data")
    def demo_data_cmd(
        out: Annotated[Path, typer.Argument(help="Folder for slides/, labels.csv and lesions.json.")],
        n_slides: Annotated[int, typer.Option(help="Number of slides.")] = 24,
        seed: Annotated[int, typer.Option(help="Seed (same seed, same pixels).")] = 0,
    ) -> None:
        """Write the built-in demo cohort: labelled pyramidal TIFFs with H&E-like texture and small lesions."""
        from featstore.demo import make_demo_cohort

        with counting_bar("demo slides", n_slides) as advance:
            labels = make_demo_cohort(out, n_slides=n_slides, seed=seed, progress=advance)
        out_console.print(f"wrote {n_slides} slides to {out / 'slides'} and labels to {labels}")
