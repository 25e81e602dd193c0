"""The folder of whole-slide class maps: written by `mil seg predict-slides` (:mod:`mil.seg.slides`),
read by `featstore view --seg` (:mod:`mil.viewer`). Here, one floor below both, so neither imports
the other.

A folder holds, per slide, ``<slide_id>.png``: a palette PNG whose pixel values are class ids
(0: background or not segmented), covering the slide's level-0 extent at ``downsample`` level-0 px
per map pixel; and one ``seg.json``::

    {"format": "featstore-seg-slides/1", "run": ..., "model_sha256": ..., "settings": {...},
     "classes": [{"id": 0, "name": "background", "color": [0, 0, 0]}, ...],
     "slides": {slide_id: {"png", "source", "size0": [W, H], "slide_mpp", "downsample", "map": [w, h],
                           "windows", "segmented", "area_mm2": {class name: mm²}}},
     "skipped": {slide_id: reason}}

``seg.json`` is replaced by a rename after each slide's PNG is in place, so a reader never sees a
slide whose map is half written.
"""

from __future__ import annotations

import json
from pathlib import Path

from mil.errors import MilError

MANIFEST = "seg.json"
FORMAT = "featstore-seg-slides/1"
#: class colours by id (0 is background; ids past the list cycle through it from 1): distinct hues
#: that stay apart on H&E's pinks and purples
PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
           (128, 0, 0), (0, 0, 128), (128, 128, 0), (255, 225, 25))


def class_color(cid: int) -> tuple[int, int, int]:
    """The colour of class *cid* (:data:`PALETTE`)."""
    return PALETTE[0] if cid == 0 else PALETTE[1 + (int(cid) - 1) % (len(PALETTE) - 1)]


def read_manifest(folder: str | Path) -> dict:
    """``seg.json`` of a class-map folder; MilError (one line) when it is not one."""
    path = Path(folder) / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise MilError(f"{folder}: no {MANIFEST}; make the folder with `mil seg predict-slides --out {folder}`") \
            from None
    except (OSError, ValueError) as exc:
        raise MilError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MilError(f"{path}: not a `mil seg predict-slides` manifest (format {FORMAT} expected)")
    return doc


def write_manifest(folder: str | Path, doc: dict) -> Path:
    """Replace ``seg.json`` atomically (a temporary name, then a rename)."""
    from mil.run import write_json

    path = Path(folder) / MANIFEST
    write_json(path, doc)
    return path


__all__ = ["FORMAT", "MANIFEST", "PALETTE", "class_color", "read_manifest", "write_manifest"]
