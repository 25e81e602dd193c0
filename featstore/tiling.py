"""A slide's tissue mask (a :mod:`featstore.masks` method) and a grid of patches of a physical size.

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

from featstore.core.config import Config, option
from featstore.errors import TilingError
from featstore.masks import (MASK_METHODS, MAX_ARTIFACT, MaskInput, get_mask, mask_names,
                             otsu_threshold, robust_candidates, robust_mask, tissue_mask)
from featstore.read.slide import Slide
from featstore.tileqc import QC_MODES

log = logging.getLogger(__name__)

__all__ = ["TilingConfig", "Tiles", "coverage", "mask_provenance", "mask_for_slide", "mask_and_artifacts",
           "tile_slide", "tiles_from_mask", "with_qc", "TilingError",
           # the masks themselves live in featstore.masks; these names stay importable from here
           "MASK_METHODS", "MAX_ARTIFACT", "get_mask", "mask_names", "otsu_threshold", "robust_candidates",
           "robust_mask", "tissue_mask"]


@dataclass(frozen=True)
class TilingConfig(Config):
    """How a slide is cut into patches (frozen; round-trips through ``to_dict`` / ``from_dict``)."""

    config_error: ClassVar[type[Exception]] = TilingError

    patch_size: int = option(512, "Patch side in pixels at --mpp.", gt=0)
    mpp: float = option(0.5, "Target microns per pixel of a patch (0.5 ≈ 20x).", gt=0)
    overlap: int = option(0, "Overlap between patches in pixels at --mpp.", ge=0)
    min_tissue: float = option(0.5, "Keep patches with at least this tissue fraction.", ge=0, le=1)
    mask: str = option("robust", "Tissue mask method (featstore.masks): robust (faint tissue kept; pen ink, marker "
                                 "dots, bubble rims and dark debris left out), saturation (Otsu on saturation), "
                                 "gray (Otsu on darkness), or a deep segmenter with your weights: grandqc, hest "
                                 "(see docs/tiling.md).", flags=("--mask", "--tissue"), choices=mask_names)
    mask_weights: str = option("", "Weights file of a deep --mask (grandqc: Tissue_Detection_MPP10.pth; hest: "
                                   "deeplabv3_seg_v4.ckpt); read offline, never downloaded.")
    qc: str = option("off", "Per-tile QC at 2 µm/px (featstore.tileqc): flag records blurred, folded/dark and "
                            "mostly empty tiles (counted in `featstore ls`); drop also leaves them out; off "
                            "measures nothing.", choices=QC_MODES)
    thumb_mpp: float = option(8.0, "Resolution of the tissue mask in µm/px (finer for tiny patches).", gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()     # declared choices and bounds
        if int(self.patch_size) != self.patch_size:
            raise TilingError(f"--patch-size {self.patch_size} must be a whole number of pixels")
        if not math.isfinite(self.mpp):
            raise TilingError(f"--mpp {self.mpp} must be a finite number")
        if self.overlap >= self.patch_size:
            raise TilingError(f"--overlap {self.overlap} must be < --patch-size {self.patch_size}")
        method = get_mask(self.mask)
        if method.needs_weights and not self.mask_weights:
            from featstore.deepmask import weights_help

            raise TilingError(weights_help(self.mask))
        if self.mask_weights and not method.needs_weights:
            raise TilingError(f"--mask-weights {self.mask_weights}: --mask {self.mask} takes no weights "
                              f"(the deep ones do: {', '.join(m for m in mask_names() if MASK_METHODS[m].needs_weights)})")

    def to_dict(self) -> dict:
        """The fields as a dict; ``mask_weights`` and ``qc`` only when set, so stores tiled before
        they existed keep their tiling key."""
        d = asdict(self)
        for key, unset in (("mask_weights", ""), ("qc", "off")):    # fields newer than the first stores
            if d[key] == unset:
                del d[key]
        return d


@dataclass(frozen=True)
class Tiles:
    """The patches of one slide."""

    coords: np.ndarray       # (N, 2) int32 level-0 (x, y)
    tissue: np.ndarray       # (N,) float32 tissue fraction
    size0: int               # patch side in level-0 px
    slide_mpp: float
    config: TilingConfig = field(default_factory=TilingConfig)
    qc: np.ndarray | None = None          # (N, 3) featstore.tileqc.MEASURES per kept tile (config.qc != "off")
    qc_flags: np.ndarray | None = None    # (N,) uint8 featstore.tileqc.FLAGS bits
    qc_dropped: dict | None = None        # --qc drop: how many tiles each flag left out

    def __len__(self) -> int:
        return len(self.coords)

    def qc_summary(self) -> str:
        """The QC counts in one line (``blur 3, dark 1, background 0``; ``dropped ...`` with --qc drop)."""
        from featstore.tileqc import qc_counts, qc_text

        return qc_text(None if self.qc_flags is None else qc_counts(self.qc_flags), self.qc_dropped)


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


def mask_provenance(config: TilingConfig) -> dict:
    """What a slide's tiling records of its mask beyond the config: a deep mask's weights sha256."""
    if not get_mask(config.mask).needs_weights:
        return {}
    from featstore.deepmask import weights_sha256

    return {"mask_weights_sha256": weights_sha256(config.mask, config.mask_weights)}


def mask_for_slide(slide: Slide, config: TilingConfig) -> tuple[np.ndarray, float, np.ndarray]:
    """(mask, downsample of the mask vs level 0, thumbnail) at about ``thumb_mpp`` µm/px.

    The mask resolution is made fine enough that a patch spans at least 16 mask pixels.
    """
    mask, ds, thumb, _ = mask_and_artifacts(slide, config)
    return mask, ds, thumb


def mask_and_artifacts(slide: Slide, config: TilingConfig) -> tuple[np.ndarray, float, np.ndarray, np.ndarray | None]:
    """:func:`mask_for_slide` plus the pixels the method left out (ink, debris; None if it leaves none)."""
    slide_mpp = slide.mpp
    patch_um = config.patch_size * config.mpp
    thumb_mpp = min(config.thumb_mpp, patch_um / 16.0)
    w, h = slide.dimensions
    target_ds = max(1.0, thumb_mpp / slide_mpp)
    max_side = int(min(8192, max(64, math.ceil(max(w, h) / target_ds))))
    thumb, ds = slide.thumbnail(max_side)
    patch_thumb = patch_um / (slide_mpp * ds)
    inp = MaskInput(slide, config, ds, min_object_px=int((patch_thumb / 4) ** 2),
                    max_hole_px=int((patch_thumb / 2) ** 2))
    mask, exclude = get_mask(config.mask).fn(thumb, inp)
    return mask, ds, thumb, exclude


def tile_slide(slide: Slide, config: TilingConfig = TilingConfig()) -> Tiles:
    """Grid of patches with tissue fraction >= ``min_tissue``; zero tissue gives empty Tiles."""
    size0 = max(1, int(round(config.patch_size * config.mpp / slide.mpp)))
    w, h = slide.dimensions
    if w < size0 or h < size0:
        log.warning("%s: smaller than one patch (%dx%d < %d px)", slide.path, w, h, size0)
        return Tiles(np.zeros((0, 2), np.int32), np.zeros((0,), np.float32), size0, slide.mpp, config)
    mask, _, _, exclude = mask_and_artifacts(slide, config)
    return with_qc(slide, tiles_from_mask(slide, config, mask, exclude))


def with_qc(slide: Slide, tiles: Tiles) -> Tiles:
    """*tiles* with their per-tile QC (``config.qc`` flag or drop; unchanged when off)."""
    if tiles.config.qc == "off" or not len(tiles):
        return tiles
    from dataclasses import replace

    from featstore.tileqc import flag_tiles, qc_counts, slide_measures

    measures = slide_measures(slide, tiles.coords, tiles.size0)
    flags = flag_tiles(measures)
    if tiles.config.qc == "flag":
        return replace(tiles, qc=measures, qc_flags=flags)
    keep = flags == 0
    return replace(tiles, coords=tiles.coords[keep], tissue=tiles.tissue[keep], qc=measures[keep],
                   qc_flags=flags[keep], qc_dropped=qc_counts(flags))


def tiles_from_mask(slide: Slide, config: TilingConfig, mask: np.ndarray, exclude: np.ndarray | None = None) -> Tiles:
    """The patch grid of :func:`tile_slide` over an already computed *mask* (and the pixels its
    method left out, *exclude*), so a caller holding the mask reads no thumbnail again."""
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
    if exclude is not None:   # a tile grazing pen ink or debris is left out, however much tissue it holds
        keep &= coverage(exclude, gx / dsx, gy / dsy, (gx + size0) / dsx, (gy + size0) / dsy) <= MAX_ARTIFACT
    coords = np.stack([gx[keep], gy[keep]], axis=1).astype(np.int32)
    return Tiles(coords, np.clip(frac[keep], 0, 1).astype(np.float32), size0, slide_mpp, config)
