"""The built-in demo cohort: small labelled pyramidal TIFFs with H&E-like texture.

About half the slides are positive: they carry a few small lesion regions (violet stroma,
dense dark nuclei) covering a minority of their tissue patches, so most patches of a positive
slide look normal -- the multiple-instance setting attention MIL is for. Every slide, positive
or not, also carries benign look-alikes ("mimics": the lesion's violet stroma with normal
nuclei), so the colour alone does not give the label away: an encoder must see the nuclei,
which is where encoders, truncation levels and pre-training come apart. Some patients have two
slides (patient-grouped splits matter). Everything is deterministic for a seed.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from featstore.synth import he_image, smooth_noise, write_pyramid_tiff

log = logging.getLogger(__name__)

SLIDE_SIZE = (4096, 3072)   # level-0 px (width, height) at 0.5 µm/px
MPP = 0.5
_MAP_SCALE = 4              # texture maps are drawn at 1/4 resolution, then upsampled
LESION_STRENGTH = 0.28      # blend of lesion texture into normal tissue: subtle, so encoders and levels differ
LESION_RADIUS = (0.025, 0.045)  # lesion radius range, fraction of the slide's shorter side
MIMIC_STRENGTH = 0.35       # blend of the benign look-alike (violet stroma, normal nuclei)
MIMICS = (1, 3)             # look-alikes per slide (inclusive range), on every slide


def _tissue_map(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A few smooth tissue blobs covering roughly half of the slide (map resolution)."""
    h, w = shape
    noise = smooth_noise((h, w), scale=h / 3.0, rng=rng)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    r = np.sqrt(((yy - cy) / (0.45 * h)) ** 2 + ((xx - cx) / (0.42 * w)) ** 2)
    field = noise * 0.55 + (1 - np.clip(r, 0, 1.5) / 1.5) * 0.75
    thr = np.quantile(field, 0.5)
    tissue = ndimage.binary_opening(field > thr, iterations=2)
    return ndimage.gaussian_filter(tissue.astype(np.float32), 1.0)


def _lesions(rng: np.random.Generator, tissue: np.ndarray, n: int,
             radius: tuple[float, float] = (0.045, 0.075)) -> tuple[np.ndarray, list[list[int]]]:
    """*n* round lesions centred inside tissue; returns the map and their level-0 boxes."""
    h, w = tissue.shape
    lesion = np.zeros((h, w), np.float32)
    boxes = []
    ys, xs = np.nonzero(tissue > 0.9)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(n):
        i = rng.integers(len(ys))
        cy, cx = ys[i], xs[i]
        rad = rng.uniform(*radius) * min(h, w)
        blob = (((yy - cy) ** 2 + (xx - cx) ** 2) <= rad**2) & (tissue > 0.5)
        lesion = np.maximum(lesion, blob.astype(np.float32))
        s = _MAP_SCALE
        boxes.append([int((cx - rad) * s), int((cy - rad) * s), int((cx + rad) * s), int((cy + rad) * s)])
    return ndimage.gaussian_filter(lesion, 0.8), boxes


def make_demo_slide(path: Path, rng: np.random.Generator, positive: bool,
                    size: tuple[int, int] = SLIDE_SIZE, strength: float | None = None,
                    radius: tuple[float, float] = LESION_RADIUS, site: str | None = None,
                    mimic_strength: float | None = None, n_lesions: int | None = None) -> list[list[int]]:
    """Write one demo slide; returns its lesion boxes (level-0 x0, y0, x1, y1). *site* names a
    :data:`featstore.synth.SITE_MIXES` staining (another hospital's colours). *strength* and
    *mimic_strength* default to :data:`LESION_STRENGTH` and :data:`MIMIC_STRENGTH` (0: no mimics).
    *n_lesions* fixes how many lesions a positive slide carries (default 2-3): the lesion burden
    that sets a hazard or a score in the survival and regression cohorts."""
    strength = LESION_STRENGTH if strength is None else strength
    mimic_strength = MIMIC_STRENGTH if mimic_strength is None else mimic_strength
    w, h = size
    shape = (h // _MAP_SCALE, w // _MAP_SCALE)
    tissue = _tissue_map(rng, shape)
    lesion, boxes = (None, [])
    if positive:
        lesion, boxes = _lesions(rng, tissue, int(rng.integers(2, 4)) if n_lesions is None else n_lesions, radius)
        lesion = lesion * strength
    mimic = None
    if mimic_strength > 0:
        mimic, _ = _lesions(rng, tissue, int(rng.integers(MIMICS[0], MIMICS[1] + 1)), radius)
        if lesion is not None:
            mimic = np.where(lesion > 0, 0.0, mimic)      # a lesion stays a lesion where both fall
        mimic = mimic * mimic_strength
    rgb = he_image(tissue, (w, h), rng, lesion=lesion, mimic=mimic)
    if site is not None:
        from featstore.synth import restain

        rgb = restain(rgb, site)
    write_pyramid_tiff(path, rgb, mpp=MPP)
    return boxes


def make_demo_cohort(out_dir: str | Path, n_slides: int = 24, seed: int = 0,
                     progress: Callable[[int], None] | None = None) -> Path:
    """Write ``slides/demo_XX.tif``, ``labels.csv`` (slide_id,label,patient_id), ``lesions.json``."""
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(n_slides)])
    rng.shuffle(labels)
    rows, lesions = [], {}
    patient = 0
    for i in range(n_slides):
        sid = f"demo_{i:02d}"
        # every 6th slide shares the previous slide's patient when the labels agree
        if i > 0 and i % 6 == 5 and labels[i] == labels[i - 1]:
            pid = f"P{patient - 1:03d}"
        else:
            pid = f"P{patient:03d}"
            patient += 1
        boxes = make_demo_slide(out / "slides" / f"{sid}.tif", np.random.default_rng([seed, i]), bool(labels[i]))
        lesions[sid] = boxes
        if progress is not None:
            progress(1)
        rows.append({"slide_id": sid, "label": "tumor" if labels[i] else "normal", "patient_id": pid})
    with (out / "labels.csv").open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=["slide_id", "label", "patient_id"])
        wr.writeheader()
        wr.writerows(rows)
    (out / "lesions.json").write_text(json.dumps(lesions, indent=1))
    log.info("demo cohort: %d slides in %s", n_slides, out)
    return out / "labels.csv"
