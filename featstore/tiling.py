"""Tissue mask on a thumbnail (Otsu) and a grid of patches of a physical size.

A patch is ``patch_size`` pixels at ``mpp`` microns per pixel (default 512 px at 0.5 µm/px,
about 20x), i.e. a fixed physical size whatever the scanner's resolution. Its tissue fraction
is the area-weighted share of mask pixels it covers (exact for any alignment, via a bilinear
read of the mask's integral image). Coords are level-0 (x, y) of top-left corners, row-major.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np
from scipy import ndimage

from featstore.core.config import Config, option
from featstore.errors import TilingError
from featstore.read.slide import Slide

log = logging.getLogger(__name__)

MASKS = ("saturation", "gray", "robust")
_MIN_SATURATION = 0.05   # below this nothing is tissue, whatever Otsu says (blank glass)
_MIN_DARKNESS = 20.0     # gray mode: 255 - gray must exceed this


@dataclass(frozen=True)
class TilingConfig(Config):
    """How a slide is cut into patches (frozen; round-trips through ``to_dict`` / ``from_dict``)."""

    config_error: ClassVar[type[Exception]] = TilingError

    patch_size: int = option(512, "Patch side in pixels at --mpp.", gt=0)
    mpp: float = option(0.5, "Target microns per pixel of a patch (0.5 ≈ 20x).", gt=0)
    overlap: int = option(0, "Overlap between patches in pixels at --mpp.", ge=0)
    min_tissue: float = option(0.5, "Keep patches with at least this tissue fraction.", ge=0, le=1)
    mask: str = option("saturation", "Tissue mask: saturation (Otsu on saturation, H&E), gray (inverted grayscale) "
                                     "or robust (faint tissue kept; pen ink, marker dots, bubble rims and dark "
                                     "debris left out).", choices=MASKS)
    thumb_mpp: float = option(8.0, "Resolution of the tissue mask in µm/px (finer for tiny patches).", gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()     # declared choices and bounds
        if int(self.patch_size) != self.patch_size:
            raise TilingError(f"--patch-size {self.patch_size} must be a whole number of pixels")
        if not math.isfinite(self.mpp):
            raise TilingError(f"--mpp {self.mpp} must be a finite number")
        if self.overlap >= self.patch_size:
            raise TilingError(f"--overlap {self.overlap} must be < --patch-size {self.patch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Tiles:
    """The patches of one slide."""

    coords: np.ndarray       # (N, 2) int32 level-0 (x, y)
    tissue: np.ndarray       # (N,) float32 tissue fraction
    size0: int               # patch side in level-0 px
    slide_mpp: float
    config: TilingConfig = field(default_factory=TilingConfig)

    def __len__(self) -> int:
        return len(self.coords)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (numpy only)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))]) if len(between) > 1 else lo


def tissue_mask(rgb: np.ndarray, method: str = "saturation", min_object_px: int = 0,
                max_hole_px: int = 0) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: Otsu on saturation (or darkness), then cleanup.

    Specks smaller than ``min_object_px`` are removed and holes smaller than ``max_hole_px``
    filled. A thumbnail with no tissue contrast (blank glass) gives an empty mask.
    """
    x = rgb.astype(np.float32)
    if method == "robust":
        return robust_mask(x, min_object_px, max_hole_px)[0]
    if method == "saturation":
        mx, mn = x.max(axis=2), x.min(axis=2)
        channel = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0.0)
        floor = _MIN_SATURATION
    elif method == "gray":
        channel = 255.0 - (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])
        floor = _MIN_DARKNESS
    else:
        raise TilingError(f"mask must be one of {MASKS}, got {method!r}")
    thr = otsu_threshold(channel)
    low = channel[channel <= thr]
    if low.size and float(low.mean()) > floor:
        # the "background" class is itself tissue (no glass in view, e.g. a fully covered slide):
        # Otsu split stroma from nuclei, so fall back to the glass floor
        thr = floor
    thr = max(thr, floor)
    return _clean(channel > thr, min_object_px, max_hole_px)


#: robust mask: saturation a faint tissue still reaches (glass stays below, a grey bubble rim too)
_FAINT_SATURATION = 0.05
_INK_HUES = (90.0, 245.0)     # green to blue ink (H&E is pink to purple: 255-360 and 0-30 degrees)
_INK_SATURATION = 0.15
_DARK_MAX = 72.0              # black ink and debris: the brightest channel below this
MAX_ARTIFACT = 0.05           # robust mask: a tile with more of its area on ink or debris is left out


def robust_candidates(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tissue candidates, pixels to leave out) of an RGB float image for ``mask="robust"``.

    Candidates are pixels whose saturation exceeds both the glass's own (its median plus six
    robust sds, measured on the brightest quarter) and :data:`_FAINT_SATURATION`, so faint,
    weakly stained tissue is kept where Otsu's split of strong stain vs the rest drops it.
    Left out: coloured ink by hue (green to blue) and black ink or debris by darkness, as regions
    (an opening drops lone pixels such as nuclei), grown by two pixels so their anti-aliased rims
    go too."""
    mx, mn = x.max(axis=2), x.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0.0)
    bright = mx >= np.percentile(mx, 75)
    glass = sat[bright]
    mad = float(np.median(np.abs(glass - np.median(glass)))) if glass.size else 0.0
    floor = max(_FAINT_SATURATION, float(np.median(glass)) + 6 * 1.4826 * mad if glass.size else 0.0)
    cand = sat > floor
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hue = (np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)) + 360.0) % 360.0
    ink = (hue >= _INK_HUES[0]) & (hue <= _INK_HUES[1]) & (sat > _INK_SATURATION)
    dark = mx < _DARK_MAX
    # ink and debris are regions: an opening drops lone dark or bluish pixels (nuclei, a fold's
    # dense spots) so that only strokes, dots and debris are left out
    marks = ndimage.binary_opening(ink | dark, structure=np.ones((3, 3), bool))
    exclude = ndimage.binary_dilation(marks, structure=np.ones((3, 3), bool), iterations=2)
    return cand & ~exclude, exclude


def robust_mask(x: np.ndarray, min_object_px: int = 0, max_hole_px: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tissue mask, ink/debris pixels) of ``mask="robust"``: the candidates cleaned up, ink kept out."""
    cand, exclude = robust_candidates(x)
    return _clean(cand, min_object_px, max_hole_px) & ~exclude, exclude


def _clean(mask: np.ndarray, min_object_px: int, max_hole_px: int) -> np.ndarray:
    """Opening, specks below *min_object_px* removed, holes below *max_hole_px* filled."""
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool)) if mask.any() else mask
    if min_object_px > 0 and mask.any():
        lab, n = ndimage.label(mask)
        sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
        mask = np.isin(lab, 1 + np.flatnonzero(sizes >= min_object_px))
    if max_hole_px > 0 and mask.any():
        holes = ndimage.binary_fill_holes(mask) & ~mask
        lab, n = ndimage.label(holes)
        if n:
            sizes = ndimage.sum(holes, lab, index=np.arange(1, n + 1))
            mask |= np.isin(lab, 1 + np.flatnonzero(sizes < max_hole_px))
    return mask


def _bilinear(S: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bilinear read of the integral image S (H+1, W+1) at fractional (y, x)."""
    y = np.clip(y, 0, S.shape[0] - 1)
    x = np.clip(x, 0, S.shape[1] - 1)
    y0 = np.minimum(np.floor(y).astype(int), S.shape[0] - 2)
    x0 = np.minimum(np.floor(x).astype(int), S.shape[1] - 2)
    fy, fx = y - y0, x - x0
    return ((1 - fy) * (1 - fx) * S[y0, x0] + (1 - fy) * fx * S[y0, x0 + 1]
            + fy * (1 - fx) * S[y0 + 1, x0] + fy * fx * S[y0 + 1, x0 + 1])


def coverage(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Area-weighted share of *mask* pixels inside boxes [x0, x1) x [y0, y1) (mask pixel units)."""
    S = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    S[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)
    area = _bilinear(S, y1, x1) - _bilinear(S, y0, x1) - _bilinear(S, y1, x0) + _bilinear(S, y0, x0)
    return (area / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def mask_for_slide(slide: Slide, config: TilingConfig) -> tuple[np.ndarray, float, np.ndarray]:
    """(mask, downsample of the mask vs level 0, thumbnail) at about ``thumb_mpp`` µm/px.

    The mask resolution is made fine enough that a patch spans at least 16 mask pixels.
    """
    mask, ds, thumb, _ = mask_and_artifacts(slide, config)
    return mask, ds, thumb


def mask_and_artifacts(slide: Slide, config: TilingConfig) -> tuple[np.ndarray, float, np.ndarray, np.ndarray | None]:
    """:func:`mask_for_slide` plus, for ``mask="robust"``, the ink/debris pixels it left out."""
    slide_mpp = slide.mpp
    patch_um = config.patch_size * config.mpp
    thumb_mpp = min(config.thumb_mpp, patch_um / 16.0)
    w, h = slide.dimensions
    target_ds = max(1.0, thumb_mpp / slide_mpp)
    max_side = int(min(8192, max(64, math.ceil(max(w, h) / target_ds))))
    thumb, ds = slide.thumbnail(max_side)
    patch_thumb = patch_um / (slide_mpp * ds)
    sizes = dict(min_object_px=int((patch_thumb / 4) ** 2), max_hole_px=int((patch_thumb / 2) ** 2))
    if config.mask == "robust":
        mask, exclude = robust_mask(thumb.astype(np.float32), **sizes)
        return mask, ds, thumb, exclude
    return tissue_mask(thumb, config.mask, **sizes), ds, thumb, None


def tile_slide(slide: Slide, config: TilingConfig = TilingConfig()) -> Tiles:
    """Grid of patches with tissue fraction >= ``min_tissue``; zero tissue gives empty Tiles."""
    size0 = max(1, int(round(config.patch_size * config.mpp / slide.mpp)))
    w, h = slide.dimensions
    if w < size0 or h < size0:
        log.warning("%s: smaller than one patch (%dx%d < %d px)", slide.path, w, h, size0)
        return Tiles(np.zeros((0, 2), np.int32), np.zeros((0,), np.float32), size0, slide.mpp, config)
    mask, _, _, exclude = mask_and_artifacts(slide, config)
    return tiles_from_mask(slide, config, mask, exclude)


def tiles_from_mask(slide: Slide, config: TilingConfig, mask: np.ndarray, exclude: np.ndarray | None = None) -> Tiles:
    """The patch grid of :func:`tile_slide` over an already computed *mask* (and, for the robust
    mask, its ink/debris pixels *exclude*), so a caller holding the mask reads no thumbnail again."""
    slide_mpp = slide.mpp
    size0 = max(1, int(round(config.patch_size * config.mpp / slide_mpp)))
    stride0 = max(1, size0 - int(round(config.overlap * config.mpp / slide_mpp)))
    w, h = slide.dimensions
    if not mask.any() or w < size0 or h < size0:
        log.info("%s: no tissue found", slide.path)
        return Tiles(np.zeros((0, 2), np.int32), np.zeros((0,), np.float32), size0, slide_mpp, config)
    xs = np.arange(0, w - size0 + 1, stride0)
    ys = np.arange(0, h - size0 + 1, stride0)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    gx, gy = gx.ravel(), gy.ravel()
    # mask pixel (i, j) covers level-0 [j*dsx, (j+1)*dsx) x [i*dsy, (i+1)*dsy)
    dsx, dsy = w / mask.shape[1], h / mask.shape[0]
    frac = coverage(mask, gx / dsx, gy / dsy, (gx + size0) / dsx, (gy + size0) / dsy)
    keep = frac >= config.min_tissue - 1e-6
    if exclude is not None:   # robust: a tile grazing pen ink or debris is left out, however much tissue it holds
        keep &= coverage(exclude, gx / dsx, gy / dsy, (gx + size0) / dsx, (gy + size0) / dsy) <= MAX_ARTIFACT
    coords = np.stack([gx[keep], gy[keep]], axis=1).astype(np.int32)
    return Tiles(coords, np.clip(frac[keep], 0, 1).astype(np.float32), size0, slide_mpp, config)
