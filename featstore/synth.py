"""Synthetic slides: pyramidal TIFFs that OpenSlide reads, and H&E-like texture.

Used by the tests (slides of known geometry written on the fly) and by the demo cohort. The
TIFF layout follows ../shared/FACTS.md: every level is a page of the main IFD chain (not
SubIFDs), RGB, tiled, reduced levels marked ``subfiletype=1``, resolution in CENTIMETER so
OpenSlide reports ``openslide.mpp-x/y``. ``vendor="aperio"`` writes an Aperio
ImageDescription instead, so OpenSlide detects the ``aperio`` format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

log = logging.getLogger(__name__)

# Colours (RGB) of the synthetic stain: white glass, eosin-pink stroma, haematoxylin nuclei.
BACKGROUND = (243.0, 242.0, 245.0)
STROMA = (236.0, 164.0, 200.0)
NUCLEUS = (96.0, 58.0, 148.0)
LESION_STROMA = (196.0, 132.0, 206.0)
LESION_NUCLEUS = (62.0, 22.0, 104.0)

_COMPRESSIONS = {"jpeg": {"level": 85}, "deflate": {"level": 6}, "lzw": None, "zstd": None, "none": None}


def _aperio_description(width: int, height: int, tile: int, mpp: float | None) -> str:
    """An ImageDescription that makes OpenSlide detect the Aperio format."""
    desc = f"Aperio Image Library v12.0.15\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q=85"
    if mpp is not None:
        desc += f"|AppMag = {max(1, round(10.0 / mpp))}|MPP = {mpp:.6g}"
    return desc


def pyramid_levels(rgb: np.ndarray, levels: int | None, tile: int, factor: int = 2) -> list[np.ndarray]:
    """Level 0 and successive *factor*x box-filtered reductions (until the level fits one tile)."""
    out = [rgb]
    img = Image.fromarray(rgb)
    while (levels is None and max(img.size) > tile) or (levels is not None and len(out) < levels):
        if min(img.size) < factor:
            break
        img = img.reduce(factor)
        out.append(np.asarray(img))
    return out


def write_pyramid_tiff(path: str | Path, rgb: np.ndarray, mpp: float | None, *, tile: int = 256,
                       compression: str = "jpeg", levels: int | None = None,
                       vendor: str = "generic", jpeg_tables: bool = False, factor: int = 2) -> Path:
    """Write *rgb* (H, W, 3) uint8 as a tiled pyramidal TIFF OpenSlide reads; returns the path.

    ``mpp=None`` writes no resolution (OpenSlide then reports no mpp). ``levels=None`` halves
    until a level fits in one tile, each *factor* (2; Aperio scanners write 4) times smaller. ``vendor`` is ``"generic"`` (generic-tiff) or ``"aperio"``.
    ``jpeg_tables`` writes JPEG tiles the way Aperio scanners do (see :func:`svs_tiles`):
    one shared ``JPEGTables`` tag, RGB streams without an Adobe marker, photometric RGB.
    """
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"write_pyramid_tiff: expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if vendor not in ("generic", "aperio"):
        raise ValueError(f"write_pyramid_tiff: vendor must be 'generic' or 'aperio', got {vendor!r}")
    if compression not in _COMPRESSIONS:
        raise ValueError(f"write_pyramid_tiff: compression must be one of {sorted(_COMPRESSIONS)}")
    if tile % 16:
        raise ValueError(f"write_pyramid_tiff: tile must be a multiple of 16, got {tile}")
    path = Path(path)
    height, width = rgb.shape[:2]
    pyramid = pyramid_levels(rgb, levels, tile, factor)
    codec = None if compression == "none" else compression
    kw: dict = dict(photometric="rgb", tile=(tile, tile), compression=codec,
                    compressionargs=_COMPRESSIONS[compression], metadata=None)
    bigtiff = sum(a.nbytes for a in pyramid) > 2**31
    if jpeg_tables and compression != "jpeg":
        raise ValueError("write_pyramid_tiff: jpeg_tables needs compression='jpeg'")
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for i, level in enumerate(pyramid):
            page_kw = dict(kw)
            data = level
            if jpeg_tables:
                tables, tiles = svs_tiles(level, tile, _COMPRESSIONS["jpeg"]["level"])
                data = iter(tiles)
                page_kw.update(shape=level.shape, dtype=np.uint8, jpegtables=tables, subsampling=(1, 1),
                               compressionargs={"outcolorspace": "RGB"})
            if vendor == "aperio":
                if i == 0:
                    page_kw["description"] = _aperio_description(width, height, tile, mpp)
                else:
                    page_kw["description"] = f"Aperio Image Library v12.0.15\n{width}x{height} -> {level.shape[1]}x{level.shape[0]}"
            else:
                if mpp is not None:
                    ds = width / level.shape[1]
                    res = 1e4 / (mpp * ds)
                    page_kw.update(resolution=(res, res), resolutionunit="CENTIMETER")
                if i > 0:
                    page_kw["subfiletype"] = 1
            tw.write(data, **page_kw)
    log.debug("wrote %s: %dx%d, %d levels, mpp=%s, vendor=%s", path, width, height, len(pyramid), mpp, vendor)
    return path


def write_ome_tiff(path: str | Path, rgb: np.ndarray, mpp: float | None, *, tile: int = 256,
                   compression: str = "jpeg", levels: int | None = None, unit: str = "µm") -> Path:
    """Write *rgb* as a pyramidal OME-TIFF the way Bio-Formats' bfconvert does: the full image in
    the first IFD, the reduced levels in its SubIFDs, the resolution only in the OME-XML
    (``PhysicalSizeX/Y`` in *unit*: µm or nm), no TIFF resolution tags."""
    rgb = np.ascontiguousarray(rgb)
    pyramid = pyramid_levels(rgb, levels, tile)
    codec = None if compression == "none" else compression
    kw: dict = dict(photometric="rgb", tile=(tile, tile), compression=codec, compressionargs=_COMPRESSIONS[compression])
    meta: dict = {"axes": "YXS"}
    if mpp is not None:
        size = mpp * (1000.0 if unit == "nm" else 1.0)
        meta.update(PhysicalSizeX=size, PhysicalSizeY=size, PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=sum(a.nbytes for a in pyramid) > 2**31, ome=True) as tw:
        tw.write(pyramid[0], subifds=len(pyramid) - 1, metadata=meta, **kw)
        for level in pyramid[1:]:
            tw.write(level, subfiletype=1, **kw)
    return path


def svs_tiles(level: np.ndarray, tile: int, quality: int) -> tuple[bytes, list[bytes]]:
    """(JPEGTables, abbreviated tiles in row-major order) of *level*, as an Aperio writer does.

    Each tile is an RGB-colour-space JPEG (no YCbCr transform) with component ids 0, 1, 2 and
    no Adobe marker, so only the TIFF's photometric RGB says how to decode it; edge tiles are
    padded with white to the full tile size.
    """
    import imagecodecs

    from featstore.read.jpeg import split_tables

    h, w = level.shape[:2]
    tables, tiles = None, []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            part = level[y:y + tile, x:x + tile]
            block[:part.shape[0], :part.shape[1]] = part
            full = imagecodecs.jpeg8_encode(block, level=quality, colorspace="RGB", outcolorspace="RGB")
            t, stream = split_tables(bytes(full), component_ids=b"\x00\x01\x02")
            if tables is not None and t != tables:
                raise ValueError("svs_tiles: the encoder changed its tables between tiles")
            tables = t
            tiles.append(stream)
    return tables, tiles


# ---------------------------------------------------------------------------------------------
# H&E-like texture


def smooth_noise(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in [0, 1] of *shape*, with features about *scale* px across."""
    h, w = shape
    gh, gw = max(2, int(np.ceil(h / scale)) + 2), max(2, int(np.ceil(w / scale)) + 2)
    grid = rng.random((gh, gw), dtype=np.float32)
    img = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC,
                                                 box=(0.5, 0.5, gw - 1.5, gh - 1.5))
    arr = np.asarray(img, dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo + 1e-6)


def nuclei_field(shape: tuple[int, int], density: float, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Soft round blobs (float32 in [0, 1]) at random positions, *density* blobs per pixel."""
    h, w = shape
    n = rng.poisson(density * h * w)
    canvas = np.zeros((h, w), np.float32)
    ys = rng.integers(0, h, n)
    xs = rng.integers(0, w, n)
    canvas[ys, xs] = rng.uniform(0.7, 1.3, n).astype(np.float32)
    blobs = ndimage.gaussian_filter(canvas, sigma=radius, truncate=2.5)
    peak = 1.0 / (2 * np.pi * radius**2)  # height of one isolated unit blob
    return np.clip(blobs / (0.45 * peak), 0.0, 1.0)


def render_he(tissue: np.ndarray, rng: np.random.Generator, *, lesion: np.ndarray | None = None,
              nucleus_radius: float = 1.2, mimic: np.ndarray | None = None) -> np.ndarray:
    """Colour a tissue map (H, W) in [0, 1] as H&E-like RGB uint8 at the map's resolution.

    Stroma is pink with fibrous streaks, nuclei are purple blobs; where *lesion* is set the
    stroma turns violet and nuclei become denser, larger and darker. Where *mimic* is set the
    stroma turns the lesion's violet but the nuclei stay normal (a benign look-alike: colour
    alone cannot tell it from a lesion). Background is near-white.
    """
    h, w = tissue.shape
    fibres = smooth_noise((h, w), 6.0, rng) * 0.6 + smooth_noise((h, w), 40.0, rng) * 0.4
    nuc = nuclei_field((h, w), 0.012, nucleus_radius, rng)
    stroma = np.asarray(STROMA, np.float32) * (0.9 + 0.16 * fibres[..., None])
    nucleus = np.asarray(NUCLEUS, np.float32)
    img = stroma * (1 - nuc[..., None]) + nucleus * nuc[..., None]
    if lesion is not None and lesion.any():
        dense = nuclei_field((h, w), 0.05, nucleus_radius * 1.4, rng)
        lstroma = np.asarray(LESION_STROMA, np.float32) * (0.85 + 0.2 * fibres[..., None])
        limg = lstroma * (1 - dense[..., None]) + np.asarray(LESION_NUCLEUS, np.float32) * dense[..., None]
        lw = lesion.astype(np.float32)[..., None]
        img = img * (1 - lw) + limg * lw
    if mimic is not None and mimic.any():
        mstroma = np.asarray(LESION_STROMA, np.float32) * (0.85 + 0.2 * fibres[..., None])
        mimg = mstroma * (1 - nuc[..., None]) + nucleus * nuc[..., None]
        mw = mimic.astype(np.float32)[..., None]
        img = img * (1 - mw) + mimg * mw
    t = np.clip(tissue, 0.0, 1.0).astype(np.float32)[..., None]
    img = img * t + np.asarray(BACKGROUND, np.float32) * (1 - t)
    return np.clip(img, 8, 247).astype(np.uint8)  # head-room for add_grain


def upsample(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an RGB uint8 image to *size* (width, height); a writable array."""
    return np.array(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def add_grain(rgb: np.ndarray, rng: np.random.Generator, amplitude: int = 8, tile: int = 509) -> np.ndarray:
    """Add fine pixel noise in place, cheaply (one random tile repeated; odd period hides it).

    Input values must lie in [amplitude, 255 - amplitude] (``render_he`` guarantees
    [8, 247]) so that the uint8 arithmetic cannot wrap.
    """
    h, w = rgb.shape[:2]
    noise = rng.integers(0, 2 * amplitude + 1, (tile, tile, 1), dtype=np.uint8)
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = rgb[y:y + tile, x:x + tile]
            block += noise[: block.shape[0], : block.shape[1]]
    rgb -= np.uint8(amplitude)
    return rgb


def he_image(tissue: np.ndarray, size: tuple[int, int], rng: np.random.Generator, *,
             lesion: np.ndarray | None = None, grain: bool = True, mimic: np.ndarray | None = None) -> np.ndarray:
    """H&E-like RGB (H, W, 3) uint8 of *size* (width, height) from low-res tissue/lesion maps.

    The maps may be coarser than *size* (e.g. 1/4): texture is drawn at map resolution and
    upsampled bilinearly, which keeps a 20-Mpx slide to a fraction of a second.
    """
    small = render_he(tissue, rng, lesion=lesion, mimic=mimic)
    big = upsample(small, size) if (small.shape[1], small.shape[0]) != tuple(size) else small.copy()
    return add_grain(big, rng) if grain else big


#: Optical-density mixes that stand for another site's staining and scanner (``restain``):
#: "site-b" has more and bluer haematoxylin and a weaker, more orange eosin.
SITE_MIXES: dict[str, np.ndarray] = {
    "site-b": np.array([[1.05, 0.00, 0.10], [0.05, 0.80, 0.00], [0.30, 0.10, 1.30]], np.float32),
}


def restain(rgb: np.ndarray, mix: str | np.ndarray) -> np.ndarray:
    """*rgb* re-coloured as another site would stain it: each pixel's optical density (per RGB
    channel, ``-ln((v + 1) / 256)``) is mixed by a 3x3 matrix (a :data:`SITE_MIXES` name or an
    array), so the stain vectors turn and white stays white. uint8 in, uint8 out."""
    m = SITE_MIXES[mix] if isinstance(mix, str) else np.asarray(mix, np.float32)
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    out = 256.0 * np.exp(-(od @ m.T)) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def rectangles_slide(size: tuple[int, int], rects: list[tuple[int, int, int, int]], seed: int = 0,
                     texture: Callable[..., np.ndarray] | None = None) -> np.ndarray:
    """White (H, W, 3) uint8 image of *size* (width, height) with H&E-like tissue in *rects*.

    Rectangles are (x0, y0, x1, y1) in pixels, end exclusive. Edges are sharp, so tissue
    geometry is known exactly (used by the tiling tests).
    """
    w, h = size
    rng = np.random.default_rng(seed)
    tex = (texture or he_image)(np.ones((max(1, h // 4), max(1, w // 4)), np.float32), (w, h), rng)
    out = np.empty((h, w, 3), np.uint8)
    out[:] = np.asarray(BACKGROUND, np.uint8)
    for x0, y0, x1, y1 in rects:
        out[y0:y1, x0:x1] = tex[y0:y1, x0:x1]
    return out


# ---------------------------------------------------------------------------------------------
# Synthetic glands (segmentation): H&E-like image + exact instance mask


@dataclass(frozen=True)
class StainStyle:
    """The colours (RGB) of one stain look: a scanner / site / staining protocol.

    ``stroma`` eosin-pink connective tissue, ``nucleus`` haematoxylin, ``epithelium`` the
    cytoplasm of the gland rim between its nuclei, ``lumen`` the pale inside of a gland.
    """

    stroma: tuple[float, float, float]
    nucleus: tuple[float, float, float]
    epithelium: tuple[float, float, float]
    lumen: tuple[float, float, float]


# Styles by name. "he" is the default palette of this module (STROMA, NUCLEUS); "he-dark" is a
# second site: darker, bluer haematoxylin and a more saturated, purplish eosin; "he-faded" a third,
# harsher one: under-stained, faded haematoxylin on a yellowish, low-contrast scan, where the rim of
# nuclei is barely darker than the stroma (out-of-domain tests).
STAIN_STYLES: dict[str, StainStyle] = {
    "he": StainStyle(stroma=STROMA, nucleus=NUCLEUS, epithelium=(200.0, 130.0, 190.0),
                     lumen=(244.0, 236.0, 242.0)),
    "he-dark": StainStyle(stroma=(206.0, 112.0, 170.0), nucleus=(48.0, 30.0, 112.0),
                          epithelium=(160.0, 96.0, 168.0), lumen=(228.0, 220.0, 236.0)),
    "he-faded": StainStyle(stroma=(226.0, 196.0, 170.0), nucleus=(160.0, 136.0, 150.0),
                           epithelium=(214.0, 184.0, 176.0), lumen=(240.0, 236.0, 214.0)),
}


def _gland_shape(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One irregular ellipse as (boolean mask of its bounding box, (x0, y0) of the box).

    Semi-axes scale with the image (about 5-22 % of its shorter side), the outline is an
    ellipse whose radius is modulated by three low harmonics of random phase (up to ~12 %).
    The box may reach past the image edge; the caller clips it.
    """
    side = min(w, h)
    a = rng.uniform(0.09, 0.22) * side
    b = a * rng.uniform(0.55, 1.0)
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    r = int(np.ceil(a * 1.15)) + 1
    x0, y0 = int(np.floor(cx)) - r, int(np.floor(cy)) - r
    yy, xx = np.mgrid[y0:y0 + 2 * r + 1, x0:x0 + 2 * r + 1].astype(np.float32)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / a
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / b
    theta = np.arctan2(v, u)
    wobble = sum(rng.uniform(0, 0.04) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return np.hypot(u, v) <= 1.0 + wobble, (x0, y0)


def _place(labels: np.ndarray, shape: np.ndarray, xy0: tuple[int, int], gid: int, gap: int) -> bool:
    """Paint *shape* into *labels* as *gid* unless it is cut by the edge to a sliver or comes
    within *gap* px of another gland (then nothing changes and False is returned)."""
    h, w = labels.shape
    x0, y0 = xy0
    sy0, sx0 = max(0, -y0), max(0, -x0)
    sy1, sx1 = min(shape.shape[0], h - y0), min(shape.shape[1], w - x0)
    if sy1 <= sy0 or sx1 <= sx0:
        return False
    part = shape[sy0:sy1, sx0:sx1]
    if part.sum() < 0.6 * shape.sum() or part.sum() < 20:
        return False   # mostly outside the image: a sliver is not a useful gland
    box = (slice(y0 + sy0, y0 + sy1), slice(x0 + sx0, x0 + sx1))
    near = ndimage.binary_dilation(part, iterations=gap) if gap else part
    if (labels[box][near] != 0).any():
        return False
    labels[box][part] = gid
    return True


def gland_labels(rng: np.random.Generator, size: tuple[int, int], n_glands: tuple[int, int] = (2, 5),
                 *, gap: int = 2, max_tries: int = 60) -> np.ndarray:
    """Instance map (H, W) uint16 of non-overlapping irregular ellipses, ids 1..n without gaps.

    The count is drawn uniformly from ``n_glands`` (inclusive); a gland that would overlap (or
    come within *gap* px of) another is rejected and redrawn, up to *max_tries* draws per gland,
    so a crowded image may hold fewer glands than drawn (never zero for sane sizes).
    """
    w, h = size
    lo, hi = n_glands
    if not 1 <= lo <= hi:
        raise ValueError(f"gland_image: n_glands must be (lo, hi) with 1 <= lo <= hi, got {n_glands}")
    labels = np.zeros((h, w), np.uint16)
    n, gid = int(rng.integers(lo, hi + 1)), 0
    for _ in range(n):
        for _ in range(max_tries):
            shape, xy0 = _gland_shape(rng, w, h)
            if _place(labels, shape, xy0, gid + 1, gap):
                gid += 1
                break
    return labels


def _style(style: str) -> StainStyle:
    try:
        return STAIN_STYLES[style]
    except KeyError:
        raise ValueError(f"gland_image: unknown style {style!r}; valid: {sorted(STAIN_STYLES)}") from None


def render_glands(labels: np.ndarray, rng: np.random.Generator, style: str = "he") -> np.ndarray:
    """Colour an instance map as H&E-like RGB uint8: fibrous pink stroma with sparse nuclei,
    each gland a rim (3-5.5 px) of crowded dark nuclei on purple cytoplasm around a pale lumen."""
    return _render_glands(labels, rng, style)[0]


#: Classes of a ``mask="parts"`` gland mask (a three-class semantic task).
GLAND_PARTS = {0: "stroma", 1: "epithelium (rim)", 2: "lumen"}


def _render_glands(labels: np.ndarray, rng: np.random.Generator, style: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, parts map uint8 of :data:`GLAND_PARTS`) of :func:`render_glands`."""
    st = _style(style)
    h, w = labels.shape
    inside = labels > 0
    depth = ndimage.distance_transform_edt(inside)          # px to the nearest non-gland pixel
    rim_px = rng.uniform(3.0, 5.5, int(labels.max()) + 1)
    rim = inside & (depth <= rim_px[labels])
    lumen = inside & ~rim
    fibres = smooth_noise((h, w), 5.0, rng) * 0.6 + smooth_noise((h, w), 30.0, rng) * 0.4
    sparse = nuclei_field((h, w), 0.006, 1.2, rng)
    crowded = nuclei_field((h, w), 0.12, 1.0, rng)
    nucleus = np.asarray(st.nucleus, np.float32)
    img = np.asarray(st.stroma, np.float32) * (0.9 + 0.16 * fibres[..., None])
    img = img * (1 - sparse[..., None]) + nucleus * sparse[..., None]
    epi = np.asarray(st.epithelium, np.float32) * (1 - crowded[..., None]) + nucleus * crowded[..., None]
    img[rim] = epi[rim]
    mucus = smooth_noise((h, w), 8.0, rng)[..., None]
    lum = np.asarray(st.lumen, np.float32) * (0.97 + 0.03 * mucus)
    img[lumen] = lum[lumen]
    parts = np.zeros((h, w), np.uint8)
    parts[rim], parts[lumen] = 1, 2
    return np.clip(img, 8, 247).astype(np.uint8), parts


def gland_image(rng: np.random.Generator, size: tuple[int, int] = (128, 128), *,
                n_glands: tuple[int, int] = (2, 5), style: str = "he",
                mask: str = "instance") -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like image with colon-gland-like objects and its exact instance mask.

    Returns (RGB (H, W, 3) uint8, instance mask (H, W) uint16: 0 stroma, 1..n one id per gland,
    the gland being rim + lumen) for *size* (width, height). Glands never overlap or touch
    (:func:`gland_labels`); *style* names a :data:`STAIN_STYLES` palette ("he", "he-dark").
    Used by the seg tests and as a toy segmentation data set; ~5 ms per 128x128 image.
    ``mask="parts"`` returns the three-class map of :data:`GLAND_PARTS` (stroma, rim, lumen)
    instead of the instance ids: a multi-class task on the same pixels (same draws for a seed).
    """
    _style(style)   # a bad name fails before any drawing
    if mask not in ("instance", "parts"):
        raise ValueError(f"gland_image: mask must be 'instance' or 'parts', got {mask!r}")
    labels = gland_labels(rng, size, n_glands)
    rgb, parts = _render_glands(labels, rng, style)
    return add_grain(rgb, rng, amplitude=6), (labels if mask == "instance" else parts)


def write_gland_dataset(out_dir: str | Path, n: int, *, seed: int = 0, size: tuple[int, int] = (128, 128),
                        style: str = "he", mask: str = "instance") -> Path:
    """Write *n* :func:`gland_image` pairs: ``images/gland_0000.png`` (RGB) and
    ``masks/gland_0000.png`` (16-bit grayscale instance mask); returns *out_dir*.

    Deterministic for *seed* (one generator drawn in order). The masks are PNG mode ``I;16``, so
    ids up to 65535 survive exactly (``mil.seg.data.load_pair(..., mask_kind="instance")`` reads them);
    ``mask="parts"`` writes the :data:`GLAND_PARTS` classes instead (``mask_kind="multiclass"``, 3).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        rgb, m = gland_image(rng, size, style=style, mask=mask)
        Image.fromarray(rgb, "RGB").save(out / "images" / f"gland_{i:04d}.png")
        Image.fromarray(m.astype(np.uint16)).save(out / "masks" / f"gland_{i:04d}.png")
    log.debug("wrote %d gland pairs to %s (seed %d, style %s)", n, out, seed, style)
    return out


def write_gland_slides(out_dir: str | Path, n: int, *, seed: int = 0, style: str = "he", grid: int = 4,
                       tile: int = 96, mpp: float = 0.5) -> tuple[Path, Path]:
    """Write *n* small pyramidal slides ``slides/case<i>.tiff`` (``grid`` x ``grid`` gland images
    of *tile* px at *mpp*) and their label TIFFs ``labels/case<i>.tif`` (the :data:`GLAND_PARTS`
    classes, uint8, same size): a whole-slide segmentation cohort for `mil seg train --slides`.
    Returns (slides folder, labels folder)."""
    import tifffile

    out = Path(out_dir)
    slides, labels = out / "slides", out / "labels"
    slides.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        tiles = [gland_image(rng, (tile, tile), style=style, mask="parts") for _ in range(grid * grid)]
        rows = range(grid)
        rgb = np.vstack([np.hstack([tiles[r * grid + c][0] for c in rows]) for r in rows])
        parts = np.vstack([np.hstack([tiles[r * grid + c][1] for c in rows]) for r in rows])
        write_pyramid_tiff(slides / f"case{i}.tiff", rgb, mpp, tile=128, compression="deflate")
        tifffile.imwrite(labels / f"case{i}.tif", parts.astype(np.uint8))
    return slides, labels
