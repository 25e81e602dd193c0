"""The tiling QC picture: thumbnail, tissue outline and kept patches. People check tiling by looking."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featstore.read.slide import Slide
from featstore.tiling import Tiles, mask_for_slide


#: the QC picture's colour of each flag (featstore.tileqc.FLAGS bits), the first that applies
QC_COLOURS = ((2, (0.85, 0.1, 0.1)), (1, (1.0, 0.55, 0.0)), (4, (0.5, 0.5, 0.5)))


def tiling_qc(slide: Slide, tiles: Tiles, out_png: str | Path, max_size: int = 1600) -> Path:
    """Save thumbnail | thumbnail + tissue contour (green) + kept patches (blue boxes; with QC, flagged
    ones in orange (blur), red (dark or folded) or grey (mostly background)) to *out_png*."""
    from matplotlib.patches import Rectangle

    from featstore.core.plotting import new_figure, save

    thumb, ds = slide.thumbnail(max_size)
    mask, mds, _ = mask_for_slide(slide, tiles.config)
    h, w = thumb.shape[:2]
    fig = new_figure(12, 6 * h / max(w, 1) + 0.8, dpi=110, layout=None)
    ax0, ax1 = fig.subplots(1, 2)
    for ax in (ax0, ax1):
        ax.imshow(thumb)
        ax.set_axis_off()
    ax0.set_title(f"{slide.path.name}  {slide.dimensions[0]}x{slide.dimensions[1]} px, {slide.mpp:.3g} µm/px")
    scale = mds / ds
    ys = (np.arange(mask.shape[0]) + 0.5) * scale
    xs = (np.arange(mask.shape[1]) + 0.5) * scale
    if mask.any() and not mask.all():
        ax1.contour(xs, ys, mask.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
    side = tiles.size0 / ds
    flags = tiles.qc_flags if tiles.qc_flags is not None else np.zeros(len(tiles), np.uint8)
    for (x, y), f, q in zip(tiles.coords, tiles.tissue, flags):
        colour = next((c for bit, c in QC_COLOURS if q & bit), (0.1, 0.3, 1.0))
        ax1.add_patch(Rectangle((x / ds, y / ds), side, side, fill=False, lw=0.6 if not q else 1.2,
                                ec=(*colour, 0.4 + 0.6 * float(f) if not q else 1.0)))
    c = tiles.config
    title = (f"{len(tiles)} patches of {c.patch_size}px @ {c.mpp} µm/px (≥{c.min_tissue:.0%} tissue, "
             f"{c.mask} mask)")
    if tiles.qc_flags is not None:
        title += f"\nQC: {tiles.qc_summary()}"
    ax1.set_title(title)
    fig.tight_layout()
    return save(fig, out_png, dpi=None)


def masks_compare(slide: Slide, config, out_png: str | Path, methods: tuple[str, ...] | None = None,
                  max_size: int = 1200) -> tuple[Path, dict[str, int]]:
    """Save the slide's tissue mask under every method side by side (contour in green, the
    tiles each keeps in blue) to *out_png*; returns the path and each method's tile count.
    Deep segmenters take part when *config* names one with its weights."""
    from dataclasses import replace

    from matplotlib.patches import Rectangle

    from featstore.core.plotting import new_figure, save
    from featstore.masks import MASK_METHODS, mask_names
    from featstore.tiling import mask_and_artifacts, tiles_from_mask

    methods = tuple(methods or (m for m in mask_names() if not MASK_METHODS[m].needs_weights
                                or (m == config.mask and config.mask_weights)))
    thumb, ds = slide.thumbnail(max_size)
    h, w = thumb.shape[:2]
    fig = new_figure(5.0 * len(methods), 5.0 * h / max(w, 1) + 0.7, dpi=100, layout=None)
    axes = np.atleast_1d(fig.subplots(1, len(methods)))
    counts = {}
    for ax, method in zip(axes, methods):
        cfg = replace(config, mask=method)
        mask, mds, _, exclude = mask_and_artifacts(slide, cfg)     # one thumbnail read per method
        tiles = tiles_from_mask(slide, cfg, mask, exclude)
        counts[method] = len(tiles)
        ax.imshow(thumb)
        scale = mds / ds
        if mask.any() and not mask.all():
            ax.contour((np.arange(mask.shape[1]) + 0.5) * scale, (np.arange(mask.shape[0]) + 0.5) * scale,
                       mask.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
        side = tiles.size0 / ds
        for x, y in tiles.coords:
            ax.add_patch(Rectangle((x / ds, y / ds), side, side, fill=False, lw=0.5, ec=(0.1, 0.3, 1.0, 0.7)))
        ax.set_title(f"{method}: {len(tiles)} tiles, {mask.mean():.1%} of the thumbnail", fontsize=10)
        ax.set_axis_off()
    fig.tight_layout()
    return save(fig, out_png, dpi=None), counts

