"""QuPath GeoJSON of a slide: tissue contours, the store's tiles and per-tile measurements.

QuPath (>= 0.4) imports a ``FeatureCollection`` by drag and drop or *File > Import objects*: each
``Feature`` has a ``Polygon``/``MultiPolygon`` geometry in level-0 pixel coordinates (x right,
y down) and ``properties`` with ``objectType`` (``annotation``, ``tile``, ``detection``), a
``classification`` ``{"name", "color": [r, g, b]}`` and ``measurements`` ``{name: number}``
(shown in QuPath's measurement table and usable to colour tiles, e.g. *Measure > Show
measurement maps*). This module builds such documents from a store's public read API; ``mil
heatmap --geojson`` adds a run's attention and prediction (:mod:`mil.heatmap`).

Coordinates follow QuPath's convention (pixel i covers [i, i+1)): a tile at store coords (x, y)
of size s is the square [x, x+s] x [y, y+s]; tissue contours trace the boundary between mask
pixels, scaled by the mask's downsample.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from featstore.errors import FeatstoreError

TILE_CLASS = ("Tile", (40, 120, 220))
TISSUE_CLASS = ("Tissue", (20, 160, 60))


def _classification(name: str, color: Sequence[int]) -> dict:
    return {"name": str(name), "color": [int(c) for c in color]}


def _number(v) -> float | None:
    """A JSON-safe measurement: a finite float, or None (QuPath shows it as NaN)."""
    v = float(v)
    return v if math.isfinite(v) else None


def _depth(x) -> int:
    """Nesting of a geometry: 2 for one ring (N, 2), 3 for a polygon (rings), 4 for polygons."""
    d = 0
    while isinstance(x, (list, tuple, np.ndarray)) and len(x):
        if isinstance(x, np.ndarray):
            return d + x.ndim
        x, d = x[0], d + 1
    return d


def feature(rings, *, object_type: str, name: str, color: Sequence[int],
            measurements: Mapping[str, float] | None = None, properties: Mapping | None = None) -> dict:
    """One Feature. *rings*: one ring, a polygon (exterior ring, then holes) or a list of such
    polygons (a MultiPolygon); a ring is an (N, 2) array of level-0 (x, y), closed here if it is not."""
    def ring(r) -> list[list[float]]:
        r = np.asarray(r, np.float64)
        if len(r) and not np.array_equal(r[0], r[-1]):
            r = np.vstack([r, r[:1]])
        return [[round(float(x), 3), round(float(y), 3)] for x, y in r]

    depth = _depth(rings)
    polys = [[rings]] if depth == 2 else [rings] if depth == 3 else list(rings)
    coords = [[ring(r) for r in poly] for poly in polys]
    geometry = ({"type": "Polygon", "coordinates": coords[0]} if len(coords) == 1
                else {"type": "MultiPolygon", "coordinates": coords})
    props = {"objectType": object_type, "classification": _classification(name, color), **(properties or {})}
    if measurements:
        props["measurements"] = {k: _number(v) for k, v in measurements.items()}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def tile_features(coords: np.ndarray, size0: int, measurements: Mapping[str, np.ndarray] | None = None, *,
                  name: str = TILE_CLASS[0], color: Sequence[int] = TILE_CLASS[1]) -> list[dict]:
    """One ``tile`` Feature per store row: the square at its level-0 coords, with ``row`` (the
    store row, so a tile can be traced back to its embedding) and every array of
    *measurements* (one value per row) as QuPath measurements."""
    coords = np.asarray(coords)
    measurements = {k: np.asarray(v, np.float64) for k, v in (measurements or {}).items()}
    bad = [k for k, v in measurements.items() if v.shape != (len(coords),)]
    if bad:
        raise FeatstoreError(f"measurement(s) {', '.join(bad)} have other lengths than the {len(coords)} tiles")
    s = float(size0)
    out = []
    for i, (x, y) in enumerate(coords.astype(np.float64)):
        square = np.array([[x, y], [x + s, y], [x + s, y + s], [x, y + s]])
        out.append(feature(square, object_type="tile", name=name, color=color,
                           measurements={"row": i, **{k: v[i] for k, v in measurements.items()}}))
    return out


def contour_rings(mask: np.ndarray, downsample: float) -> list[list[np.ndarray]]:
    """Polygons (exterior ring, then its holes) tracing a boolean mask, in level-0 px.

    contourpy (matplotlib's contouring) fills the level set between 0.5 and 1 of the mask padded
    with background, so each connected region gives one exterior and one ring per hole."""
    import contourpy

    mask = np.asarray(mask, bool)
    if not mask.any():
        return []
    z = np.pad(mask.astype(np.float64), 1)
    points, offsets = contourpy.contour_generator(z=z, fill_type="OuterOffset").filled(0.5, 2.0)
    polys = []
    for pts, offs in zip(points, offsets):
        level0 = (np.asarray(pts, np.float64) - 0.5) * float(downsample)   # -1 pad, +0.5 pixel centre
        polys.append([level0[a:b] for a, b in zip(offs[:-1], offs[1:])])
    return polys


def tissue_features(mask: np.ndarray, downsample: float, *, name: str = TISSUE_CLASS[0],
                    color: Sequence[int] = TISSUE_CLASS[1]) -> list[dict]:
    """One ``annotation`` Feature per connected tissue region of *mask* (holes kept), with its
    area in level-0 px² as a measurement."""
    out = []
    for poly in contour_rings(mask, downsample):
        area = abs(_ring_area(poly[0])) - sum(abs(_ring_area(h)) for h in poly[1:])
        out.append(feature(poly, object_type="annotation", name=name, color=color,
                           measurements={"area_px2": area}))
    return out


def _ring_area(r: np.ndarray) -> float:
    x, y = np.asarray(r, np.float64).T
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def collection(features: Sequence[dict], **properties) -> dict:
    """A FeatureCollection (QuPath ignores the top-level properties; they record provenance)."""
    return {"type": "FeatureCollection", "features": list(features),
            **({"properties": dict(properties)} if properties else {})}


def write_geojson(doc: dict, path: str | Path) -> Path:
    """Write *doc* to *path* atomically (a temporary name, then a rename)."""
    path = Path(path)
    if path.is_dir():
        raise FeatstoreError(f"--out {path} is a folder; give a file name such as slide.geojson")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":"), allow_nan=False))
    tmp.replace(path)
    return path


def slide_tissue(store, slide_id: str, slide: str | Path | None = None) -> tuple[np.ndarray, float]:
    """(mask, downsample) of a slide's tissue as the store tiled it (its tiling config and slide
    mpp), read from *slide* or the source path the store recorded."""
    from featstore.read.slide import Slide
    from featstore.tiling import TilingConfig, mask_for_slide

    info = store.slide_info(slide_id)
    path = Path(slide) if slide is not None else Path(str(info.get("source", "")))
    if not path.is_file():
        raise FeatstoreError(f"slide file {path} of {slide_id} is not there; pass --slide PATH, or --no-tissue "
                             "for the tiles alone")
    cfg = TilingConfig.from_dict(dict(info.get("tiling") or store.tiling or {}), where="tiling")
    with Slide(path, mpp=info.get("slide_mpp")) as s:
        mask, ds, _ = mask_for_slide(s, cfg)
    return mask, float(ds)


def slide_geojson(store, slide_id: str, *, tissue: tuple[np.ndarray, float] | None = None,
                  measurements: Mapping[str, np.ndarray] | None = None,
                  extra: Sequence[dict] = (), **properties) -> dict:
    """The slide's document: tissue contours (``tissue=(mask, downsample)``), the store's tiles
    with their tissue fraction and any per-row *measurements*, then *extra* features (e.g. a
    whole-slide annotation carrying a prediction)."""
    info = store.slide_info(slide_id)
    size0 = int(info["size0"])
    feats = [] if tissue is None else tissue_features(*tissue)
    feats += tile_features(store.coords(slide_id), size0, {"tissue": store.tissue(slide_id), **(measurements or {})})
    feats += list(extra)
    return collection(feats, slide_id=slide_id, source=str(info.get("source", "")), size0=size0,
                      slide_mpp=info.get("slide_mpp"), **properties)


__all__ = ["feature", "tile_features", "contour_rings", "tissue_features", "collection", "write_geojson",
           "slide_geojson", "slide_tissue", "TILE_CLASS", "TISSUE_CLASS"]
