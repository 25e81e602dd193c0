"""Messy slides with a known tissue mask: what real glass brings besides tissue.

Drawn at the resolution tissue masks are computed at (about 8 µm/px): a 2048 x 1536 image is a
16 x 12 mm slide, its pen strokes about 200 µm wide and its marker dots about 0.6 mm across.

:func:`messy_slide` draws two tissue sections (one partly faint, one with a fold and a blurred
patch) on glass, then pen ink in three colours (strokes over glass and tissue), marker dots and
air-bubble rims, and returns the RGB image with its truth: tissue that is not under ink. The
tissue-mask methods (:mod:`featstore.tiling`) are measured against it (docs/tiling.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from featstore.synth import BACKGROUND, he_image, smooth_noise

INKS = {"blue": (40, 70, 190), "green": (40, 140, 70), "black": (25, 25, 30)}


@dataclass
class MessySlide:
    """A messy slide at level 0: ``rgb`` (H, W, 3) uint8, ``tissue`` the truth (tissue not under
    ink), and the masks of what was drawn (``ink``, ``faint``, ``fold``, ``blur``)."""

    rgb: np.ndarray
    tissue: np.ndarray
    ink: np.ndarray
    faint: np.ndarray
    fold: np.ndarray
    blur: np.ndarray


def _sections(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Two irregular tissue sections side by side."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros(shape, bool)
    for cx in (0.28, 0.72):
        r = ((xx - cx * w) / (0.2 * w)) ** 2 + ((yy - 0.5 * h) / (0.36 * h)) ** 2
        out |= r + 0.35 * (smooth_noise(shape, 0.12 * min(h, w), rng) - 0.5) < 1.0
    return ndimage.binary_opening(out, np.ones((5, 5), bool))


def _draw(shape: tuple[int, int], draw_fn) -> np.ndarray:
    img = Image.new("L", (shape[1], shape[0]), 0)
    draw_fn(ImageDraw.Draw(img))
    return np.asarray(img) > 0


def messy_slide(rng: np.random.Generator, size: tuple[int, int] = (2048, 1536)) -> MessySlide:
    """One messy slide of *size* (width, height) px; see the module docstring."""
    w, h = size
    shape = (h, w)
    tissue = _sections(shape, rng)
    rgb = he_image(tissue.astype(np.float32), (w, h), rng).astype(np.float32)
    # faint: the upper third of the left section at a quarter of the stain
    faint = tissue & (np.arange(w)[None, :] < w // 2) & (np.arange(h)[:, None] < int(0.38 * h))
    glass = np.asarray(BACKGROUND, np.float32)
    rgb[faint] = glass + 0.28 * (rgb[faint] - glass)
    # a fold: a band of the right section, doubled tissue (darker, denser)
    band = np.abs((np.arange(h)[:, None] - 0.55 * h) - 0.35 * (np.arange(w)[None, :] - 0.72 * w)) < 0.03 * h
    fold = tissue & band & (np.arange(w)[None, :] > w // 2)
    rgb[fold] *= 0.62
    # a blurred patch (out of focus) in the right section
    blur = tissue & (((np.arange(w)[None, :] - 0.72 * w) ** 2 + (np.arange(h)[:, None] - 0.3 * h) ** 2)
                     < (0.1 * h) ** 2)
    soft = ndimage.gaussian_filter(rgb, sigma=(4, 4, 0))
    rgb[blur] = soft[blur]
    # air-bubble rims on glass (thin grey circles) and marker dots
    rims = _draw(shape, lambda d: [d.ellipse((x - r, y - r, x + r, y + r), outline=255, width=2)
                                   for x, y, r in ((0.5 * w, 0.12 * h, 0.05 * h), (0.52 * w, 0.88 * h, 0.04 * h))])
    rgb[rims] = (175, 178, 182)
    ink = np.zeros(shape, bool)
    for i, (name, colour) in enumerate(INKS.items()):
        # a stroke across glass and tissue, and a marker dot on glass
        x0, y0 = rng.uniform(0.05, 0.95) * w, (0.15 + 0.3 * i) * h
        pts = [(x0 + dx * w, y0 + 0.05 * h * np.sin(3 * dx + i)) for dx in np.linspace(-0.25, 0.25, 12)]
        stroke = _draw(shape, lambda d: d.line(pts, fill=255, width=max(6, h // 60), joint="curve"))
        r = max(8, h // 40)
        dot = _draw(shape, lambda d: d.ellipse((0.93 * w - r, (0.2 + 0.3 * i) * h - r,
                                                0.93 * w + r, (0.2 + 0.3 * i) * h + r), fill=255))
        mark = stroke | dot
        rgb[mark] = 0.15 * rgb[mark] + 0.85 * np.asarray(colour, np.float32)
        ink |= mark
    rgb = np.clip(rgb + rng.normal(0, 1.5, rgb.shape), 0, 255).astype(np.uint8)
    return MessySlide(rgb, tissue & ~ink, ink, faint, fold, blur)


#: Ruifrok & Johnston's optical-density vectors of haematoxylin and DAB
HAEMATOXYLIN, DAB = np.array([0.65, 0.70, 0.29]), np.array([0.27, 0.57, 0.78])


def ihc_view(rng: np.random.Generator, od_scale: float, dab: float,
             shape: tuple[int, int] = (600, 800)) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8, truth) of an IHC-like view at mask resolution: an ellipse of haematoxylin at
    optical density about *od_scale* (0.15 faint to 2 dense; blue-violet, the hue pen ink is found
    by) with DAB patches of density *dab*, on glass with sensor noise."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    truth = ((yy - shape[0] / 2) / (shape[0] * 0.37)) ** 2 + ((xx - shape[1] / 2) / (shape[1] * 0.4)) ** 2 < 1
    h = od_scale * (0.6 + 0.8 * smooth_noise(shape, shape[0] / 30, rng)) * truth
    d = dab * (smooth_noise(shape, shape[0] / 20, rng) > 0.6) * truth
    od = h[..., None] * HAEMATOXYLIN + d[..., None] * DAB
    return np.clip(255 * np.exp(-od) + rng.normal(0, 3, od.shape), 0, 255).astype(np.uint8), truth


__all__ = ["MessySlide", "messy_slide", "ihc_view", "INKS"]
