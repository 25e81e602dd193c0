"""Segmentation patches cut from whole-slide images with annotations (docs/segmentation.md).

Annotations are GeoJSON polygons as QuPath exports them (:func:`read_geojson`) or a label-mask
TIFF covering the slide (:class:`LabelTiff`). :func:`wsi_dataset` cuts patches of ``patch`` px
at a target ``mpp``, draws or reads each patch's mask at the same resolution, keeps the patches
whose annotated share reaches ``min_annotated`` and returns a :class:`WsiSegData` (a
:class:`seg.data.SegData` that also records the class mapping and where each patch came from).

Coordinates: level-0 pixel (x, y), x right, y down, pixel i covering [i, i+1) (QuPath's
convention). A patch with level-0 origin ``o`` and downsample ``d`` maps level-0 ``p`` to patch
pixel ``(p - o) / d``; a patch pixel is inside a polygon when its centre is.

A slide or annotation file that cannot be used is logged (one line: file + reason), recorded in
``.skipped`` and the other slides go on; nothing usable at all is a :class:`SegError`.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from matplotlib.path import Path as MplPath
from PIL import Image, ImageDraw, ImageFilter

from core.errors import CoreError
from featstore.slide import Slide, resize_filter
from seg.data import MASK_KINDS, SegData
from seg.errors import SegError

log = logging.getLogger(__name__)

GEOJSON_SUFFIXES = (".geojson", ".json")
LABEL_TIFF_SUFFIXES = (".tif", ".tiff")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                  ".bif", ".dcm")
_POLYGON_TYPES = ("Polygon", "MultiPolygon")
# QuPath <= 0.2 wrote the object type as the feature's "id"
_LEGACY_OBJECT_TYPES = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
                        "PathCellObject": "cell", "PathTileObject": "tile"}
_ASPECT_TOLERANCE = 0.01


# ------------------------------------------------------------------ GeoJSON
@dataclass(frozen=True)
class Annotation:
    """One annotated object: ``polygons`` each a tuple of rings (exterior first, then holes),
    a ring an (N, 2) float array of level-0 (x, y); ``name`` its class; ``object_type`` QuPath's
    ``annotation`` / ``detection`` / ``cell`` / ``tile``."""

    polygons: tuple[tuple[np.ndarray, ...], ...]
    name: str
    object_type: str = "annotation"

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the exterior rings, level-0 px."""
        pts = np.concatenate([poly[0] for poly in self.polygons])
        return (float(pts[:, 0].min()), float(pts[:, 1].min()),
                float(pts[:, 0].max()), float(pts[:, 1].max()))


def _load_json(path: Path):
    if not path.is_file():
        raise SegError(f"{path}: no such annotation file")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise SegError(f"{path}: not a GeoJSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise SegError(f"{path}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def _features(doc, path: Path) -> list:
    """The Feature list of a FeatureCollection, a bare list of Features or one Feature."""
    if isinstance(doc, list):
        features = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise SegError(f"{path}: FeatureCollection without a 'features' list")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    else:
        kind = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise SegError(f"{path}: expected a GeoJSON FeatureCollection, a list of Features or a "
                       f"Feature, got {kind!r}")
    if not features:
        raise SegError(f"{path}: no features")
    for i, f in enumerate(features):
        if not isinstance(f, dict) or f.get("type") != "Feature":
            raise SegError(f"{path}: item {i} is not a GeoJSON Feature")
    return features


def _ring(coords, path: Path, where: str) -> np.ndarray:
    try:
        ring = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise SegError(f"{path}: {where}: ring coordinates are not numbers") from None
    if ring.ndim != 2 or ring.shape[1] < 2 or len(ring) < 3 or not np.isfinite(ring[:, :2]).all():
        raise SegError(f"{path}: {where}: a ring needs >= 3 finite [x, y] positions, got shape {ring.shape}")
    return ring[:, :2]


def _polygons(geometry: dict, path: Path, where: str) -> tuple[tuple[np.ndarray, ...], ...]:
    """Polygon / MultiPolygon coordinates as rings; a GeometryCollection's polygon members."""
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "GeometryCollection":
        return tuple(p for g in geometry.get("geometries") or [] if isinstance(g, dict)
                     and g.get("type") in _POLYGON_TYPES for p in _polygons(g, path, where))
    if not isinstance(coords, list) or not coords:
        raise SegError(f"{path}: {where}: {kind} without coordinates")
    polys = [coords] if kind == "Polygon" else coords
    return tuple(tuple(_ring(r, path, where) for r in poly) for poly in polys if poly)


def _class_name(feature: dict) -> str | None:
    """properties.classification.name (or its ``names`` joined as QuPath writes derived classes),
    properties.classification as a string, else properties.name."""
    props = feature.get("properties") or {}
    c = props.get("classification")
    if isinstance(c, dict):
        name = c.get("name") or (": ".join(c["names"]) if isinstance(c.get("names"), list) else None)
        if name:
            return str(name)
    elif isinstance(c, str) and c:
        return c
    name = props.get("name")
    return str(name) if name else None


def _object_type(feature: dict) -> str:
    props = feature.get("properties") or {}
    t = props.get("objectType") or _LEGACY_OBJECT_TYPES.get(str(feature.get("id")), "annotation")
    return str(t).lower()


def read_geojson(path: str | Path, *, default_class: str | None = None,
                 nucleus: bool = False) -> list[Annotation]:
    """The polygon annotations of a QuPath GeoJSON export, in file order.

    Accepts a FeatureCollection, a bare list of Features or one Feature; Polygon and
    MultiPolygon (holes kept; GeometryCollection members likewise). Other geometries (Point,
    LineString, ...) are skipped with a warning. An unclassified, unnamed feature gets
    *default_class*, or with ``None`` is skipped (logged). With *nucleus* a cell's
    ``nucleusGeometry`` is used instead of its cell boundary. Raises :class:`SegError` (file +
    problem) for a missing file, non-JSON, no features, malformed coordinates, or no usable polygon.
    """
    path = Path(path)
    features = _features(_load_json(path), path)
    out: list[Annotation] = []
    other: dict[str, int] = {}
    unclassified = 0
    for i, feature in enumerate(features):
        geometry = feature.get("geometry")
        if nucleus and isinstance(feature.get("nucleusGeometry"), dict):
            geometry = feature["nucleusGeometry"]
        kind = str(geometry.get("type")) if isinstance(geometry, dict) else "null geometry"
        polygons = (_polygons(geometry, path, f"feature {i}")
                    if kind in (*_POLYGON_TYPES, "GeometryCollection") else ())
        if not polygons:
            other[kind] = other.get(kind, 0) + 1
            continue
        name = _class_name(feature) or default_class
        if name is None:
            unclassified += 1
            continue
        out.append(Annotation(polygons, name, _object_type(feature)))
    if other:
        log.warning("%s: skipped %d feature(s) that cannot be rasterised (%s)", path,
                    sum(other.values()), ", ".join(f"{n} {k}" for k, n in sorted(other.items())))
    if unclassified:
        log.info("%s: skipped %d unclassified feature(s) (no default_class)", path, unclassified)
    if not out:
        raise SegError(f"{path}: no usable polygon among {len(features)} feature(s) "
                       f"({unclassified} unclassified, {sum(other.values())} not polygons)")
    return out


# ------------------------------------------------------------------ rasterising
def _size_wh(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def _fill_polygon(rings: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: pixels whose centre is inside the exterior ring and outside every hole; rings
    in canvas px, pixel i spanning [i, i+1).

    PIL's ``polygon`` fills the interior fast but snaps vertices to whole pixels and includes its
    edges, so the pixels within 2 px of an edge are decided again exactly by
    ``matplotlib.path.Path.contains_points`` at their centres.
    """
    fill, edge = Image.new("L", size, 0), Image.new("L", size, 0)
    draw_fill, draw_edge = ImageDraw.Draw(fill), ImageDraw.Draw(edge)
    for k, ring in enumerate(rings):
        pts = [tuple(p) for p in (ring - 0.5).tolist()]
        draw_fill.polygon(pts, fill=0 if k else 1)
        draw_edge.line(pts + pts[:1], fill=1)
    inside = np.array(fill, dtype=bool)
    ys, xs = np.nonzero(np.asarray(edge.filter(ImageFilter.MaxFilter(5))))
    if len(ys):
        centres = np.column_stack([xs + 0.5, ys + 0.5])
        exact = MplPath(rings[0]).contains_points(centres)
        for hole in rings[1:]:
            exact &= ~MplPath(hole).contains_points(centres)
        inside[ys, xs] = exact
    return inside


def _draw_one(ann: Annotation, origin: tuple[float, float], downsample: float,
              size: tuple[int, int]) -> tuple[tuple[int, int], np.ndarray] | None:
    """(top-left, bool mask) of one annotation in a (W, H) canvas, drawn on its clipped bounding
    box only; ``None`` when it misses the canvas."""
    x0, y0, x1, y1 = ann.bounds
    w, h = size
    bx0 = max(0, int(math.floor((x0 - origin[0]) / downsample)))
    by0 = max(0, int(math.floor((y0 - origin[1]) / downsample)))
    bx1 = min(w, int(math.ceil((x1 - origin[0]) / downsample)) + 1)
    by1 = min(h, int(math.ceil((y1 - origin[1]) / downsample)) + 1)
    if bx1 <= bx0 or by1 <= by0:
        return None
    shift = np.array([origin[0] + bx0 * downsample, origin[1] + by0 * downsample])
    out = np.zeros((by1 - by0, bx1 - bx0), bool)
    for poly in ann.polygons:
        out |= _fill_polygon([(ring - shift) / downsample for ring in poly], (bx1 - bx0, by1 - by0))
    return (bx0, by0), out


def rasterise(annotations: Sequence[Annotation], *, origin_xy0: tuple[float, float],
              size: int | tuple[int, int], downsample: float,
              classes: Mapping[str, int] | None = None, instance: bool = False) -> np.ndarray:
    """(H, W) int64 mask of *annotations* in a patch of *size* (W, H) px at *downsample*.

    Level-0 (x, y) maps to ``(xy - origin_xy0) / downsample``. Values: ``classes[name]``, or 1
    for every annotation with ``classes=None``; with *instance* the i-th drawn annotation gets
    id i+1 (the parts of a MultiPolygon share it). Names missing from *classes* are not drawn.
    Later annotations overwrite earlier ones; a hole shows what lies beneath it (background, or
    an earlier annotation), never its own polygon.
    """
    w, h = _size_wh(size)
    if not downsample > 0:
        raise SegError(f"rasterise: downsample must be > 0, got {downsample}")
    out = np.zeros((h, w), np.int64)
    n = 0
    for ann in annotations:
        if classes is not None and ann.name not in classes:
            continue
        n += 1
        drawn = _draw_one(ann, origin_xy0, downsample, (w, h))
        if drawn is None:
            continue
        (bx, by), m = drawn
        value = n if instance else (1 if classes is None else int(classes[ann.name]))
        out[by:by + m.shape[0], bx:bx + m.shape[1]][m] = value
    return out


# ------------------------------------------------------------------ label TIFF
class LabelTiff:
    """A single-channel integer label TIFF covering a slide's level-0 extent, read by windows.

    The mask may be smaller than the slide by any factor (``scale = slide_w / mask_w`` per axis)
    and pyramidal (the coarsest level fine enough for the request is read). Tiles are decoded
    through tifffile's zarr store, so a 100k² level is never read whole. Raises
    :class:`SegError` naming the file for an unreadable file, several channels, a non-integer
    dtype, or an aspect ratio more than 1 % off the slide's.
    """

    def __init__(self, path: str | Path, slide_size: tuple[int, int] | None = None):
        import tifffile
        import zarr

        self.path = Path(path)
        if not self.path.is_file():
            raise SegError(f"{self.path}: no such label TIFF")
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            self._levels = [zarr.open(series.aszarr(level=k), mode="r") for k in range(len(series.levels))]
        except Exception as exc:  # noqa: BLE001 -- any tifffile/zarr failure means unreadable
            raise SegError(f"{self.path}: unreadable label TIFF ({_first_line(exc)})") from None
        shape, dtype = self._levels[0].shape, np.dtype(self._levels[0].dtype)
        if len(shape) != 2:
            self.close()
            raise SegError(f"{self.path}: label TIFF has shape {shape} (axes {series.axes}); "
                           "expected one channel (H, W)")
        if dtype.kind not in "uib":
            self.close()
            raise SegError(f"{self.path}: label TIFF dtype {dtype} is not an integer label type")
        self.size = (int(shape[1]), int(shape[0]))          # (W, H) of level 0
        self.slide_size = tuple(slide_size) if slide_size is not None else self.size
        sx, sy = self.slide_size[0] / self.size[0], self.slide_size[1] / self.size[1]
        if abs(sx / sy - 1) > _ASPECT_TOLERANCE:
            self.close()
            raise SegError(f"{self.path}: label TIFF is {self.size[0]}x{self.size[1]} (WxH), aspect "
                           f"{self.size[0] / self.size[1]:.4f}, but the slide is {self.slide_size[0]}x"
                           f"{self.slide_size[1]}, aspect {self.slide_size[0] / self.slide_size[1]:.4f}")

    def _scale(self, k: int) -> tuple[float, float]:
        h, w = self._levels[k].shape
        return self.slide_size[0] / w, self.slide_size[1] / h

    def _level(self, pixel0: float) -> int:
        """The coarsest level whose pixel is not larger than *pixel0* level-0 px (1 % tolerance)."""
        best = 0
        for k in range(len(self._levels)):
            if max(self._scale(k)) <= pixel0 * 1.01:
                best = k
        return best

    def read(self, origin_xy0: tuple[int, int], size0: float, out_size: int) -> np.ndarray:
        """(out_size, out_size) int64 labels of the level-0 square *size0* at *origin_xy0*,
        nearest neighbour at each output pixel's centre; 0 outside the mask."""
        pixel0 = size0 / out_size
        k = self._level(pixel0)
        z, (sx, sy) = self._levels[k], self._scale(k)
        centres = (np.arange(out_size) + 0.5) * pixel0
        ix = np.floor((origin_xy0[0] + centres) / sx).astype(np.int64)
        iy = np.floor((origin_xy0[1] + centres) / sy).astype(np.int64)
        vx = (ix >= 0) & (ix < z.shape[1])
        vy = (iy >= 0) & (iy < z.shape[0])
        out = np.zeros((out_size, out_size), np.int64)
        if not vx.any() or not vy.any():
            return out
        c0, c1, r0, r1 = ix[vx].min(), ix[vx].max() + 1, iy[vy].min(), iy[vy].max() + 1
        try:
            window = np.asarray(z[r0:r1, c0:c1])
        except Exception as exc:  # noqa: BLE001 -- a corrupt tile
            raise SegError(f"{self.path}: unreadable window at level {k} ({_first_line(exc)})") from None
        out[np.ix_(vy, vx)] = window[np.ix_(iy[vy] - r0, ix[vx] - c0)]
        return out

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> "LabelTiff":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------ pairing
def _is_geojson(path: Path) -> bool:
    return path.suffix.lower() in GEOJSON_SUFFIXES


def _samples(path: Path) -> int:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            return int(tf.pages[0].samplesperpixel)
    except Exception:  # noqa: BLE001 -- not a readable TIFF: let OpenSlide judge it later
        return 0


def _slide_of(paths: list[Path]) -> Path:
    """The slide among files of one stem: a non-TIFF suffix (``.svs``, ``.ndpi``, ...), else the
    TIFF with colour samples (a label TIFF has one channel), else the first."""
    other = [p for p in paths if p.suffix.lower() not in LABEL_TIFF_SUFFIXES]
    if other or len(paths) == 1:
        return (other or paths)[0]
    return next((p for p in paths if _samples(p) >= 3), paths[0])


def pair_by_stem(slides_dir: str | Path,
                 annotations_dir: str | Path | None = None) -> tuple[list[Path], list[Path]]:
    """(slides, annotations) of a folder, paired by stem: ``X.svs`` with ``X.geojson``,
    ``X.json``, or a label ``X.tif`` / ``X.tiff`` (in *annotations_dir*, default the same folder;
    there a ``.tif`` is the mask only when the slide has another suffix). A GeoJSON wins over a
    TIFF of the same stem. Slides without an annotation are logged and left out."""
    slides_dir = Path(slides_dir)
    ann_dir = Path(annotations_dir) if annotations_dir is not None else slides_dir
    for folder in (slides_dir, ann_dir):
        if not folder.is_dir():
            raise SegError(f"{folder}: no such folder")
    files = sorted(p for p in slides_dir.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    stems: dict[str, list[Path]] = {}
    for p in files:
        stems.setdefault(p.stem, []).append(p)
    slides, anns = [], []
    for stem, paths in sorted(stems.items()):
        slide = _slide_of(paths)
        cands = [ann_dir / f"{stem}{s}" for s in (*GEOJSON_SUFFIXES, *LABEL_TIFF_SUFFIXES)]
        cands = [c for c in cands if c.is_file() and c.resolve() != slide.resolve()]
        if not cands:
            log.warning("skipped slide %s: no %s.geojson/.json/.tif in %s", slide, stem, ann_dir)
            continue
        slides.append(slide)
        anns.append(cands[0])
    if not slides:
        raise SegError(f"no slide/annotation pair in {slides_dir} and {ann_dir} (matched by file name)")
    return slides, anns


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
        if _is_geojson(ann):
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
        if not _is_geojson(ann) and ann.suffix.lower() not in LABEL_TIFF_SUFFIXES:
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


__all__ = ["Annotation", "GEOJSON_SUFFIXES", "LABEL_TIFF_SUFFIXES", "LabelTiff", "SLIDE_SUFFIXES",
           "WsiSegData", "pair_by_stem", "rasterise", "read_geojson", "wsi_dataset"]
