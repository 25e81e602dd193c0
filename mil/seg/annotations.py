"""Annotations of whole slides: QuPath GeoJSON polygons, label-mask TIFFs, and slide pairing.

:func:`read_geojson` reads a FeatureCollection (or a bare list / single Feature) as QuPath exports
it into :class:`Annotation` objects (Polygon / MultiPolygon with holes, the class from
``classification``, the object type from ``objectType`` or QuPath <= 0.2's ``id``);
:func:`rasterise` draws them into a class mask of any window and downsample; :class:`LabelTiff`
reads a (pyramidal) label-mask TIFF covering the slide by windows at any scale; and
:func:`pair_by_stem` pairs slides with their annotation files. The patch dataset built on these is
:mod:`mil.seg.wsi`.

Coordinates: level-0 pixel (x, y), x right, y down, pixel i covering [i, i+1) (QuPath's
convention); a pixel is inside a polygon when its centre is.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.path import Path as MplPath
from PIL import Image, ImageDraw, ImageFilter

from featstore.core.errors import first_line
from mil.seg.errors import SegError

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
            raise SegError(f"{self.path}: unreadable label TIFF ({first_line(exc)})") from None
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
            raise SegError(f"{self.path}: unreadable window at level {k} ({first_line(exc)})") from None
        out[np.ix_(vy, vx)] = window[np.ix_(iy[vy] - r0, ix[vx] - c0)]
        return out

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> "LabelTiff":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ pairing
def is_geojson(path: Path) -> bool:
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


__all__ = ["Annotation", "GEOJSON_SUFFIXES", "LABEL_TIFF_SUFFIXES", "LabelTiff", "SLIDE_SUFFIXES",
           "is_geojson", "pair_by_stem", "rasterise", "read_geojson"]
