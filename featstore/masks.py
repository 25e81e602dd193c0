"""Tissue masks of a slide's thumbnail, by name: the registry behind ``--mask`` / ``--tissue``.

A method takes the thumbnail (RGB uint8 at about ``thumb_mpp`` µm/px) and a :class:`MaskInput`
(the slide, the tiling config, the thumbnail's downsample and the clean-up sizes) and returns
(tissue mask, pixels to leave out or None) at the thumbnail's shape. Tiles whose area is more than
:data:`MAX_ARTIFACT` on left-out pixels are dropped (featstore.tiling). Register a new method with
:func:`register_mask`; deep segmenters with user weights live in :mod:`featstore.deepmask`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from featstore.errors import TilingError

MaskResult = tuple[np.ndarray, "np.ndarray | None"]


@dataclass(frozen=True)
class MaskInput:
    """What a mask method may use besides the thumbnail."""

    slide: Any                 # featstore.read.slide.Slide (deep methods read their own resolution)
    config: Any                # featstore.tiling.TilingConfig
    downsample: float          # thumbnail pixel -> level-0 pixels
    min_object_px: int = 0     # specks smaller than this (thumbnail px) are dropped
    max_hole_px: int = 0       # holes smaller than this are filled


@dataclass(frozen=True)
class MaskMethod:
    """One registered tissue-mask method."""

    name: str
    help: str
    fn: Callable[[np.ndarray, MaskInput], MaskResult]
    needs_weights: bool = False     # a deep segmenter: --mask-weights names its file


MASK_METHODS: dict[str, MaskMethod] = {}


def register_mask(name: str, help: str, *, needs_weights: bool = False):
    """Decorator: register ``fn(thumb, MaskInput) -> (mask, exclude | None)`` under *name*."""
    def deco(fn):
        MASK_METHODS[name] = MaskMethod(name, help, fn, needs_weights)
        return fn
    return deco


def mask_names() -> tuple[str, ...]:
    """Every registered method's name (classical first, then the deep segmenters)."""
    return tuple(MASK_METHODS)


def get_mask(name: str) -> MaskMethod:
    """The registered method *name*; an error listing the methods otherwise."""
    if name not in MASK_METHODS:
        raise TilingError(f"mask must be one of {', '.join(mask_names())}, got {name!r}")
    return MASK_METHODS[name]


_MIN_SATURATION = 0.05   # below this nothing is tissue, whatever Otsu says (blank glass)
_MIN_DARKNESS = 20.0     # gray mode: 255 - gray must exceed this


def channel_max_min(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max and min over R, G, B (element-wise: several times faster than a reduction over axis 2)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def _window(a: np.ndarray, size: int, op, pad_mode: str, axis: int) -> np.ndarray:
    """*op* (a binary ufunc) folded over a window of *size* along *axis*, centred, by shifted slices
    (one pass per offset: several times faster than scipy's filters on bool and float images)."""
    r = size // 2
    widths = [(r, r) if ax == axis else (0, 0) for ax in range(a.ndim)]
    p = np.pad(a, widths, mode=pad_mode)
    n = a.shape[axis]

    def at(i: int) -> np.ndarray:
        return p[i:i + n] if axis == 0 else p[:, i:i + n]

    out = at(0).copy()
    for i in range(1, 2 * r + 1):
        op(out, at(i), out=out)
    return out


def _erosion(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary erosion by a size² square, the outside taken as background (scipy's border_value=0)."""
    return _window(_window(mask, size, np.logical_and, "constant", 1), size, np.logical_and, "constant", 0)


def _dilation(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary dilation by a size² square."""
    return _window(_window(mask, size, np.logical_or, "constant", 1), size, np.logical_or, "constant", 0)


def _opening(mask: np.ndarray, size: int = 3) -> np.ndarray:
    """Binary opening by a size² square (as ``ndimage.binary_opening``)."""
    return _dilation(_erosion(mask, size), size)


def _box_mean(a: np.ndarray, size: int) -> np.ndarray:
    """Mean over a size² window, edges repeated (as ``ndimage.uniform_filter`` with mode="nearest")."""
    return _window(_window(a, size, np.add, "edge", 1), size, np.add, "edge", 0) / np.float32(size * size)


def _local_level(sat: np.ndarray) -> np.ndarray:
    """The stain level around each pixel: the highest 5x5 mean within about 3 px, computed at half
    resolution (a smooth field) and repeated back to *sat*'s shape."""
    h, w = sat.shape
    half = sat[: h - h % 2, : w - w % 2].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) if h > 1 and w > 1 else sat
    level = ndimage.maximum_filter(_box_mean(half, 3), size=4)
    if level.shape == sat.shape:
        return level
    full = np.repeat(np.repeat(level, 2, axis=0), 2, axis=1)
    return np.pad(full, ((0, h - full.shape[0]), (0, w - full.shape[1])), mode="edge")


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
    if method not in ("saturation", "gray"):
        raise TilingError(f"tissue_mask: method must be saturation, gray or robust, got {method!r}")
    if method == "saturation":
        mx, mn = channel_max_min(x)
        channel = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0.0)
        floor = _MIN_SATURATION
    elif method == "gray":
        channel = 255.0 - (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])
        floor = _MIN_DARKNESS
    thr = otsu_threshold(channel)
    low = channel[channel <= thr]
    if low.size and float(low.mean()) > floor:
        # the "background" class is itself tissue (no glass in view, e.g. a fully covered slide):
        # Otsu split stroma from nuclei, so fall back to the glass floor
        thr = floor
    thr = max(thr, floor)
    return _clean(channel > thr, min_object_px, max_hole_px)


#: robust mask: saturation a faint tissue still reaches (glass stays below, a grey bubble rim too)
_FAINT_SATURATION = 0.03
_INK_HUES = (90.0, 200.0, 238.0)   # green to cyan, then blue ink (haematoxylin ~245, H&E 255-360 and 0-30 degrees)
_INK_SATURATION = (0.15, 0.35)     # green ink vs (bluish) glass; blue ink vs dense haematoxylin
_DARK_MAX = 72.0              # black ink and debris: the brightest channel below this
_DARK_SATURATION = 0.35       # ... and greyish (dense brown DAB or haematoxylin is as dark but saturated)
_RIM_DARK = 120.0             # ... and the darker pixels joined to them are their rims
_VERY_DARK = 56.0             # darker than this is ink or debris whatever its colour
MAX_ARTIFACT = 0.05           # robust mask: a tile with more of its area on ink or debris is left out


def robust_candidates(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tissue candidates, pixels to leave out) of an RGB float image for ``mask="robust"``.

    Candidates are pixels whose saturation (averaged over 3x3 px, so scanner noise on glass
    averages out) exceeds both the glass's own (its median plus six robust sds, measured on the
    brightest quarter) and :data:`_FAINT_SATURATION`, so faint, weakly stained tissue is kept where
    Otsu's split of strong stain vs the rest drops it. Where the brightest quarter is itself
    stained (tissue covers most of the view) the glass level is :data:`_FAINT_SATURATION`.
    Left out: coloured ink by hue (green to blue) and black ink or debris by darkness, as regions
    (an opening drops lone pixels such as nuclei), grown by two pixels so their anti-aliased rims
    go too."""
    mx, mn = channel_max_min(x)
    sat = ((mx - mn) / np.maximum(mx, 1)).astype(np.float32)
    smooth = _box_mean(sat, 3)   # scanner noise averaged out
    sub_mx, sub = mx[::2, ::2], smooth[::2, ::2]      # a quarter of the pixels is plenty for the levels
    glass = sub[sub_mx >= np.percentile(sub_mx, 75)]
    level = float(np.median(glass))
    mad = float(np.median(np.abs(glass - level)))
    floor = _FAINT_SATURATION if level > 2 * _FAINT_SATURATION else max(_FAINT_SATURATION, level + 6 * 1.4826 * mad)
    # a pixel is tissue past half-way from the glass to its neighbourhood's stain level (where Otsu
    # puts an edge): a pixel half on tissue splits as the area does, and JPEG's chroma bleeding into
    # the glass beside stained tissue stays glass; faint tissue, far from strong stain, needs the floor only
    local = _local_level(sat)
    glass_level = 0.0 if level > 2 * _FAINT_SATURATION else level
    cand = (smooth > floor) & (smooth >= 0.5 * (glass_level + local))
    ink = np.zeros(sat.shape, bool)
    coloured = sat > _INK_SATURATION[0]        # the hue only where ink can be
    r, g, b = (x[..., i][coloured] for i in range(3))
    hue = (np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)) + 360.0) % 360.0
    s_c = sat[coloured]
    ink[coloured] = (((hue >= _INK_HUES[0]) & (hue < _INK_HUES[1]))
                     | ((hue >= _INK_HUES[1]) & (hue <= _INK_HUES[2]) & (s_c > _INK_SATURATION[1])))
    dark = (mx < _DARK_MAX) & ((sat < _DARK_SATURATION) | (mx < _VERY_DARK))   # not dense DAB or nuclei
    # ink and debris are regions: an opening drops lone dark or bluish pixels (nuclei, a fold's
    # dense spots) so that only strokes, dots and debris are left out
    marks = _opening(ink | dark)
    # grown into the darker pixels up to 3 px away (a stroke's rim mixed with tissue), then by 2 px
    marks |= _dilation(marks, 7) & (mx < _RIM_DARK)
    exclude = _dilation(marks, 5)
    return cand & ~exclude, exclude


def robust_mask(x: np.ndarray, min_object_px: int = 0, max_hole_px: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tissue mask, ink/debris pixels) of ``mask="robust"``: the candidates cleaned up, ink kept out."""
    cand, exclude = robust_candidates(x)
    return _clean(cand, min_object_px, max_hole_px) & ~exclude, exclude


def _clean(mask: np.ndarray, min_object_px: int, max_hole_px: int) -> np.ndarray:
    """Opening, specks below *min_object_px* removed, holes below *max_hole_px* filled."""
    mask = _opening(mask) if mask.any() else mask
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


@register_mask("robust", "the default: saturation above the glass's own level (faint tissue kept) with pen ink "
                         "(green to blue by hue, black by darkness), marker dots, bubble rims and dark debris "
                         "left out; tiles over 5 % on them are dropped")
def _robust(thumb: np.ndarray, inp: MaskInput) -> MaskResult:
    return robust_mask(thumb.astype(np.float32), inp.min_object_px, inp.max_hole_px)


@register_mask("saturation", "Otsu's threshold on saturation (clean H&E; keeps ink, drops faint tissue)")
def _saturation(thumb: np.ndarray, inp: MaskInput) -> MaskResult:
    return tissue_mask(thumb, "saturation", inp.min_object_px, inp.max_hole_px), None


@register_mask("gray", "Otsu's threshold on inverted grayscale (dark stains)")
def _gray(thumb: np.ndarray, inp: MaskInput) -> MaskResult:
    return tissue_mask(thumb, "gray", inp.min_object_px, inp.max_hole_px), None


def _deep(name: str, help: str) -> None:
    """Register the deep segmenter *name* of :mod:`featstore.deepmask` (torch is imported when it runs)."""
    def method(thumb: np.ndarray, inp: MaskInput) -> MaskResult:
        from featstore.deepmask import segment

        return _clean(segment(thumb, inp, name) >= 0.5, inp.min_object_px, inp.max_hole_px), None

    register_mask(name, help, needs_weights=True)(method)


_deep("grandqc", "GrandQC's UNet++ tissue detector at 10 µm/px, with your Tissue_Detection_MPP10.pth")
_deep("hest", "HEST's DeepLabV3 tissue segmenter at 1 µm/px, with your deeplabv3_seg_v4.ckpt")
