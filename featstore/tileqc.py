"""Per-tile quality control: out-of-focus, folded or dark, and mostly empty tiles (``--qc``).

The tissue mask works at about 8 µm/px; a tile it keeps may still be blurred, folded, or mostly
glass or fat at the resolution the encoder sees. Each tile is measured at :data:`QC_MPP`
(2 µm/px, nuclei about 4 px across; the slide's own resolution if coarser) from strips read once
per row of tiles, so the cost is one low-resolution pass over the tissue:

* ``sharpness``: variance of the Laplacian of the grey image over the tile's stained pixels
  (Pech-Pacheco et al. 2000) divided by their grey variance, so faint or pale tissue (low
  contrast, but in focus) is not taken for blur; a tile below :attr:`QCRule.blur` × the slide's median is blurred.
  Relative to the slide, so stain strength and scanner optics do not move the threshold.
* ``density``: the mean optical density of its stained pixels; above :attr:`QCRule.dark` × the
  slide's median a tile is folded (two layers of tissue: about twice the density) or dark debris.
* ``background``: the share of glass pixels (unsaturated and bright); above
  :attr:`QCRule.background` a tile is mostly empty.

``--qc flag`` stores the measures and flags with the tiling (``Store.qc``) and counts them in
``featstore ls``; ``--qc drop`` also leaves flagged tiles out of the tiling; ``off`` (default)
measures nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from featstore.masks import channel_max_min

QC_MODES = ("off", "flag", "drop")
QC_MPP = 2.0
MEASURES = ("sharpness", "density", "background")
FLAGS = {"blur": 1, "dark": 2, "background": 4}   # bits of the per-tile flag
_GLASS_SAT, _GLASS_BRIGHT = 0.06, 200


@dataclass(frozen=True)
class QCRule:
    """When a tile is flagged: relative to the slide's median tile, or an absolute share."""

    blur: float = 0.35          # sharpness below this x the slide's median
    dark: float = 1.6           # density above this x the slide's median
    background: float = 0.6     # share of glass above this


def tile_measures(rgb: np.ndarray) -> tuple[float, float, float]:
    """(sharpness, density, background share) of one RGB uint8 tile (see the module docstring)."""
    x = rgb.astype(np.float32)
    mx, mn = channel_max_min(x)
    glass = ((mx - mn) / np.maximum(mx, 1) < _GLASS_SAT) & (mx > _GLASS_BRIGHT)
    background = float(glass.mean())
    stained = ~glass
    if stained.sum() < 0.1 * stained.size:
        return float("nan"), float("nan"), background
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = ndimage.laplace(gray)[1:-1, 1:-1]
    inner = stained[1:-1, 1:-1]
    # high-frequency energy relative to the tile's contrast: faint or pale tissue is not "blurred"
    sharp = float(lap[inner].var() / max(float(gray[1:-1, 1:-1][inner].var()), 1e-3))
    od = -np.log((x[stained] + 1.0) / 256.0).mean()
    return sharp, float(od), background


def flag_tiles(measures: np.ndarray, rule: QCRule = QCRule()) -> np.ndarray:
    """Per-tile flag bits (:data:`FLAGS`) of (N, 3) measures, relative to the slide's medians."""
    flags = np.zeros(len(measures), np.uint8)
    if not len(measures):
        return flags
    sharp, dens, bg = measures[:, 0], measures[:, 1], measures[:, 2]
    ok = np.isfinite(sharp)
    if ok.any():
        flags[ok & (sharp < rule.blur * np.median(sharp[ok]))] |= FLAGS["blur"]
        flags[ok & (dens > rule.dark * np.median(dens[ok]))] |= FLAGS["dark"]
    flags[bg > rule.background] |= FLAGS["background"]
    return flags


def slide_measures(slide, coords: np.ndarray, size0: int) -> np.ndarray:
    """(N, 3) float32 measures of the tiles at *coords* (level-0 corners, side *size0*), read as
    one strip per row of tiles at :data:`QC_MPP` (or the slide's resolution, if coarser)."""
    out = np.full((len(coords), 3), np.nan, np.float32)
    if not len(coords):
        return out
    px = max(8, int(round(size0 * slide.mpp / max(QC_MPP, slide.mpp))))
    ds = size0 / px
    level = slide.best_level(ds)
    lds = slide.level_downsamples[level]
    for y in np.unique(coords[:, 1]):
        rows = np.flatnonzero(coords[:, 1] == y)
        x0, x1 = int(coords[rows, 0].min()), int(coords[rows, 0].max()) + size0
        side = (max(1, int(round((x1 - x0) / lds))), max(1, int(round(size0 / lds))))
        strip = slide.read_region((x0, int(y)), level, side)
        width = max(1, int(round((x1 - x0) / ds)))
        if strip.shape[:2] != (px, width):
            strip = np.asarray(Image.fromarray(strip).resize((width, px), Image.Resampling.BILINEAR))
        for r in rows:
            a = int(round((coords[r, 0] - x0) / ds))
            out[r] = tile_measures(strip[:, a:a + px])
    return out


def qc_counts(flags: np.ndarray) -> dict[str, int]:
    """How many tiles carry each flag (a tile can carry several)."""
    return {name: int((flags & bit).astype(bool).sum()) for name, bit in FLAGS.items()}


def qc_text(flagged: dict[str, int] | None, dropped: dict[str, int] | None = None) -> str:
    """One line of QC counts, e.g. ``blur 3, dark 1, background 0``, prefixed ``dropped`` when the
    flagged tiles were left out (--qc drop); ``-`` without QC."""
    counts = dropped or flagged
    if not counts:
        return "-"
    return ("dropped " if dropped else "") + ", ".join(f"{k} {v}" for k, v in counts.items())
