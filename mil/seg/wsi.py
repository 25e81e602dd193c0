"""Segmentation patches cut from whole-slide images with annotations (docs/segmentation.md).

Annotations are GeoJSON polygons as QuPath exports them or a label-mask TIFF covering the slide,
read by :mod:`mil.seg.annotations` (:func:`~mil.seg.annotations.read_geojson`,
:class:`~mil.seg.annotations.LabelTiff`). :func:`wsi_dataset` cuts patches of ``patch`` px
at a target ``mpp``, draws or reads each patch's mask at the same resolution, keeps the patches
whose annotated share reaches ``min_annotated`` and returns a :class:`WsiSegData` (a
:class:`mil.seg.data.SegData` that also records the class mapping and where each patch came from).

Coordinates: level-0 pixel (x, y), x right, y down, pixel i covering [i, i+1) (QuPath's
convention). A patch with level-0 origin ``o`` and downsample ``d`` maps level-0 ``p`` to patch
pixel ``(p - o) / d``; a patch pixel is inside a polygon when its centre is.

A slide or annotation file that cannot be used is logged (one line: file + reason), recorded in
``.skipped`` and the other slides go on; nothing usable at all is a :class:`SegError`.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from featstore.core.errors import CoreError
from featstore.read.slide import Slide, resize_filter
from mil.seg.annotations import LABEL_TIFF_SUFFIXES, Annotation, LabelTiff, is_geojson, rasterise, read_geojson
from mil.seg.data import MASK_KINDS, SegData
from mil.seg.errors import SegError

log = logging.getLogger(__name__)
# ------------------------------------------------------------------ data sets
@dataclass
class WsiSegData(SegData):
    """:class:`SegData` of WSI patches, plus ``classes`` {name: id} (0 background), ``mpp`` of
    the patches as asked, and ``sources`` per patch: (slide path, x0, y0, size0) in level-0 px."""

    classes: dict[str, int] = field(default_factory=dict)
    mpp: float | None = None
    sources: list[tuple[str, int, int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class _Grid:
    """Patch geometry of one slide: level-0 side and stride, and the actual downsample."""

    size0: int
    stride0: int
    downsample: float


class _GeoSource:
    """Masks drawn from parsed annotations; a spatial prefilter on their bounding boxes."""

    def __init__(self, annotations: list[Annotation], kind: str, classes: dict[str, int]):
        self.kind = kind
        self.draw_classes = classes if kind == "multiclass" else None
        self.kept = [a for a in annotations if a.name in classes]
        if len(self.kept) < len(annotations):
            log.info("%d annotation(s) of classes outside %s not drawn", len(annotations) - len(self.kept),
                     sorted(classes))
        self.bounds = np.array([a.bounds for a in self.kept], np.float64).reshape(-1, 4)

    def region0(self) -> tuple[float, float, float, float] | None:
        if not len(self.bounds):
            return None
        b = self.bounds
        return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())

    def mask(self, origin: tuple[int, int], grid: _Grid, patch: int) -> np.ndarray:
        x, y, s = origin[0], origin[1], grid.size0
        b = self.bounds
        hit = np.flatnonzero((b[:, 0] < x + s) & (b[:, 2] > x) & (b[:, 1] < y + s) & (b[:, 3] > y))
        m = rasterise([self.kept[i] for i in hit], origin_xy0=origin, size=patch,
                      downsample=grid.downsample, classes=self.draw_classes,
                      instance=self.kind == "instance")
        return (m > 0).astype(np.int64) if self.kind == "binary" else m


class _TiffSource:
    """Masks read from a label TIFF; multiclass values checked against the class ids."""

    def __init__(self, tiff: LabelTiff, kind: str, classes: dict[str, int] | None):
        self.tiff, self.kind = tiff, kind
        self.allowed = None if not classes or kind != "multiclass" else {0, *classes.values()}

    def region0(self) -> tuple[float, float, float, float]:
        return 0.0, 0.0, float(self.tiff.slide_size[0]), float(self.tiff.slide_size[1])

    def mask(self, origin: tuple[int, int], grid: _Grid, patch: int) -> np.ndarray:
        m = self.tiff.read(origin, grid.size0, patch)
        if m.size and m.min() < 0:
            raise SegError(f"{self.tiff.path}: negative label {int(m.min())} near level-0 {origin}")
        if self.kind == "binary":
            return (m > 0).astype(np.int64)
        if self.allowed is not None:
            bad = sorted(set(np.unique(m).tolist()) - self.allowed)
            if bad:
                raise SegError(f"{self.tiff.path}: label value(s) {bad[:6]} near level-0 {origin} "
                               f"are not class ids {sorted(self.allowed - {0})}")
        return m


def _geo_source(annotations: list[Annotation], kind: str, classes: dict[str, int],
                dims: tuple[int, int]) -> _GeoSource:
    return _GeoSource(annotations, kind, classes)


def _tiff_source(path: Path, kind: str, classes: dict[str, int] | None, dims: tuple[int, int]) -> _TiffSource:
    return _TiffSource(LabelTiff(path, dims), kind, classes)


def _grid(slide: Slide, mpp: float, patch: int, stride: int) -> _Grid:
    ds = mpp / slide.mpp
    size0 = max(1, int(round(patch * ds)))
    return _Grid(size0, max(1, int(round(stride * size0 / patch))), size0 / patch)


def _origins(region: tuple[float, float, float, float], dims: tuple[int, int], g: _Grid) -> list[tuple[int, int]]:
    """Level-0 origins of the grid (multiples of stride0 from 0) whose patch meets *region*,
    clipped to the slide; row-major."""
    x0, y0 = max(0.0, region[0]), max(0.0, region[1])
    x1, y1 = min(float(dims[0]), region[2]), min(float(dims[1]), region[3])
    if x1 <= x0 or y1 <= y0:
        return []

    def axis(a0: float, a1: float) -> range:
        first = max(0, math.ceil((a0 - g.size0 + 1) / g.stride0))
        return range(first * g.stride0, int(math.ceil(a1)), g.stride0)

    return [(x, y) for y in axis(y0, y1) for x in axis(x0, x1)]


def _clip_to_slide(mask: np.ndarray, origin: tuple[int, int], g: _Grid, dims: tuple[int, int]) -> np.ndarray:
    """Zero the pixels whose centre lies outside the slide's level-0 extent."""
    nx = int(np.clip(round((dims[0] - origin[0]) / g.downsample), 0, mask.shape[1]))
    ny = int(np.clip(round((dims[1] - origin[1]) / g.downsample), 0, mask.shape[0]))
    mask[:, nx:] = 0
    mask[ny:, :] = 0
    return mask


@dataclass(frozen=True)
class _Options:
    mpp: float
    patch: int
    stride: int
    kind: str
    min_annotated: float
    max_patches: int | None
    seed: int
    slide_mpp: float | None
    interpolation: str


def _choose(n: int, stem: str, opts: _Options) -> np.ndarray:
    """Indices kept out of *n* passing patches: all, or a seeded subsample in grid order."""
    if opts.max_patches is None or n <= opts.max_patches:
        return np.arange(n)
    rng = np.random.default_rng([opts.seed, zlib.crc32(stem.encode())])
    return np.sort(rng.choice(n, opts.max_patches, replace=False))


def _slide_patches(slide_path: Path, source_of, opts: _Options):
    """(names, images, masks, sources) of one slide; raises CoreError when it cannot be used."""
    with Slide(slide_path, mpp=opts.slide_mpp) as slide:
        g = _grid(slide, opts.mpp, opts.patch, opts.stride)
        source = source_of(slide.dimensions)
        try:
            region = source.region0()
            if region is None:
                raise SegError(f"{slide_path}: no annotation of the requested classes")
            origins = _origins(region, slide.dimensions, g)
            if not origins:
                raise SegError(f"{slide_path}: no annotation inside the slide's {slide.dimensions[0]}x"
                               f"{slide.dimensions[1]} level-0 extent")
            # two passes (share, then the kept masks again) so memory holds only the kept patches
            share = [float((_clip_to_slide(source.mask(o, g, opts.patch), o, g, slide.dimensions) > 0).mean())
                     for o in origins]
            passing = [o for o, s in zip(origins, share) if s >= opts.min_annotated]
            chosen = [passing[i] for i in _choose(len(passing), slide_path.stem, opts)]
            out = ([], [], [], [])
            for o in chosen:
                mask = _clip_to_slide(source.mask(o, g, opts.patch), o, g, slide.dimensions)
                image = slide.read_patch(o, g.size0, opts.patch, interpolation=opts.interpolation)
                if mask.shape != image.shape[:2]:   # by construction; a guard against a reader bug
                    raise SegError(f"{slide_path}: mask {mask.shape} and image {image.shape[:2]} differ at {o}")
                out[0].append(f"{slide_path.stem}_x{o[0]}_y{o[1]}")
                out[1].append(image)
                out[2].append(mask)
                out[3].append((str(slide_path), int(o[0]), int(o[1]), g.size0))
        finally:
            if isinstance(source, _TiffSource):
                source.tiff.close()
    log.info("%s: %d of %d grid patches kept (%d >= min_annotated), size0 %d px at mpp %.4g",
             slide_path, len(chosen), len(origins), len(passing), g.size0, opts.mpp)
    return out


def _class_map(classes: Mapping[str, int] | None, parsed: dict[int, list[Annotation]]) -> dict[str, int]:
    if classes is None:
        names = sorted({a.name for anns in parsed.values() for a in anns})
        return {n: i + 1 for i, n in enumerate(names)}
    out = {}
    for name, cid in classes.items():
        if not isinstance(cid, (int, np.integer)) or isinstance(cid, bool) or cid < 1:
            raise SegError(f"classes: id of {name!r} must be an integer >= 1 (0 is background), got {cid!r}")
        out[str(name)] = int(cid)
    return out


def _check_args(slides, annotations, mpp, patch, stride, mask_kind, min_annotated, max_patches,
                slide_mpp, interpolation) -> None:
    if len(slides) != len(annotations):
        raise SegError(f"wsi_dataset: {len(slides)} slide(s) but {len(annotations)} annotation file(s)")
    if not slides:
        raise SegError("wsi_dataset: no slides given")
    if mask_kind not in MASK_KINDS:
        raise SegError(f"mask_kind {mask_kind!r} is not one of {list(MASK_KINDS)}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise SegError(f"wsi_dataset: mpp must be a positive number, got {mpp}")
    if patch < 1 or stride < 1:
        raise SegError(f"wsi_dataset: patch and stride must be >= 1, got {patch} and {stride}")
    if not 0 <= min_annotated <= 1:
        raise SegError(f"wsi_dataset: min_annotated must be in [0, 1], got {min_annotated}")
    if slide_mpp is not None and not (slide_mpp > 0 and math.isfinite(slide_mpp)):
        raise SegError(f"wsi_dataset: slide_mpp must be a positive number, got {slide_mpp}")
    try:
        resize_filter(interpolation)
    except CoreError as exc:
        raise SegError(f"wsi_dataset: {exc}") from None
    if max_patches is not None and max_patches < 1:
        raise SegError(f"wsi_dataset: max_patches_per_slide must be >= 1, got {max_patches}")


def wsi_dataset(slides: Sequence[str | Path], annotations: Sequence[str | Path], *, mpp: float,
                patch: int = 256, stride: int | None = None, classes: Mapping[str, int] | None = None,
                mask_kind: str = "multiclass", min_annotated: float = 0.05,
                max_patches_per_slide: int | None = None, seed: int = 0,
                slide_mpp: float | None = None, default_class: str | None = None,
                interpolation: str = "bilinear") -> WsiSegData:
    """Patches of *patch* px at *mpp* from *slides*, each with the mask of its annotation file.

    *annotations[i]* is a QuPath GeoJSON (``.geojson`` / ``.json``) or a label TIFF of
    ``slides[i]``. The grid (stride *stride* px at *mpp*, default *patch*) starts at level-0
    (0, 0) and covers the annotations' bounding box (GeoJSON) or the whole slide (label TIFF);
    patches whose non-zero share is >= *min_annotated* are kept, at most
    *max_patches_per_slide* (seeded). Edge patches are padded (white image, mask 0).
    *classes* {name: id >= 1}; ``None``: the sorted GeoJSON class names get 1..n. *slide_mpp*
    overrides every slide's mpp. See docs/segmentation.md, "Whole-slide datasets".
    """
    stride = patch if stride is None else stride
    slides = [Path(s) for s in slides]
    annotations = [Path(a) for a in annotations]
    _check_args(slides, annotations, mpp, patch, stride, mask_kind, min_annotated, max_patches_per_slide,
                slide_mpp, interpolation)
    opts = _Options(float(mpp), int(patch), int(stride), mask_kind, float(min_annotated),
                    max_patches_per_slide, int(seed), slide_mpp, interpolation)
    data = WsiSegData([], [], [], mask_kind=mask_kind, mpp=float(mpp))

    def skip(slide: Path, reason: str) -> None:
        log.warning("skipped slide %s: %s", slide, reason)
        data.skipped[slide.stem] = reason

    parsed: dict[int, list[Annotation]] = {}      # all GeoJSON first: names -> ids needs every file
    for i, ann in enumerate(annotations):
        if is_geojson(ann):
            try:
                parsed[i] = read_geojson(ann, default_class=default_class)
            except SegError as exc:
                skip(slides[i], str(exc))
    class_map = _class_map(classes, parsed)
    if classes is None and mask_kind == "multiclass" and parsed and len(parsed) < len(annotations) \
            and any(a.suffix.lower() in LABEL_TIFF_SUFFIXES for a in annotations):
        raise SegError("wsi_dataset: GeoJSON and label TIFF annotations mixed need an explicit classes= "
                       "mapping (GeoJSON names would get ids 1..n, label TIFF values are taken as stored)")
    loaded: set[str] = set()
    for i, (slide, ann) in enumerate(zip(slides, annotations)):
        if slide.stem in loaded:
            skip(slide, "another slide of the same name was already loaded (patch names would clash)")
            continue
        if slide.stem in data.skipped:
            continue
        if not is_geojson(ann) and ann.suffix.lower() not in LABEL_TIFF_SUFFIXES:
            skip(slide, f"{ann}: annotation file must be .geojson, .json, .tif or .tiff")
            continue
        if i in parsed:
            source_of = partial(_geo_source, parsed[i], mask_kind, class_map)
        else:
            source_of = partial(_tiff_source, ann, mask_kind, class_map if classes is not None else None)
        try:
            names, images, masks, sources = _slide_patches(slide, source_of, opts)
        except CoreError as exc:
            skip(slide, str(exc))
            continue
        if not names:
            skip(slide, f"no patch reaches min_annotated={min_annotated}")
            continue
        data.names += names
        data.images += images
        data.masks += masks
        data.sources += sources
        loaded.add(slide.stem)
    if not data.names:
        first = next(iter(data.skipped.values()), "no slides")
        raise SegError(f"no usable slide out of {len(slides)} (first problem: {first})")
    _record_classes(data, class_map, explicit=classes is not None)
    return data


def _record_classes(data: WsiSegData, class_map: dict[str, int], *, explicit: bool) -> None:
    """``data.classes`` and, for multiclass, ``n_classes`` (largest id or label seen + 1); label
    TIFFs without a mapping name their values ``"1"``, ``"2"``, ..."""
    if data.mask_kind == "multiclass" and not explicit and not class_map:
        class_map = {str(v): v for v in sorted({int(u) for m in data.masks for u in np.unique(m)} - {0})}
    data.classes = {n: 1 for n in class_map} if data.mask_kind == "binary" else class_map
    if data.mask_kind == "multiclass":
        max_label = max(int(m.max()) for m in data.masks)
        data.n_classes = max([1, max_label, *class_map.values()]) + 1


__all__ = ["WsiSegData", "wsi_dataset"]
