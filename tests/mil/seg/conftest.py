"""Fixtures of the segmentation tests: GeoJSON features as QuPath writes them and a small slide."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featstore.synth import write_pyramid_tiff
from mil.seg.annotations import Annotation


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(rings, name="Tumor", kind="Polygon", object_type="annotation", classification="dict"):
    props = {"objectType": object_type}
    if classification == "dict":
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    elif classification == "str":
        props["classification"] = name
    elif classification == "name":
        props["name"] = name
    return {"type": "Feature", "id": "9d1c4b6e-0000-4000-8000-000000000000",
            "geometry": {"type": kind, "coordinates": rings}, "properties": props}


def write_geojson(path, features, shape="collection"):
    doc = {"type": "FeatureCollection", "features": features} if shape == "collection" else features
    path.write_text(json.dumps(doc))
    return path


def rgb_noise(w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def slide(tmp_path):
    """A 512x384 slide at 0.5 mpp (lossless, 3 levels) and its pixels."""
    rgb = rgb_noise(512, 384)
    return write_pyramid_tiff(tmp_path / "case.tif", rgb, 0.5, tile=128, compression="deflate"), rgb


def ann(rings, name="Tumor"):
    return Annotation(tuple(tuple(np.asarray(r, float) for r in poly) for poly in rings), name)
