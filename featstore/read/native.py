"""The native-tile reader: patches assembled from the slide's own JPEG tiles.

OpenSlide's ``read_region`` decodes, composes (cairo, premultiplied ARGB) and converts every
region on its own, behind a lock per handle. Most scanners (Aperio SVS, generic tiled TIFF,
OME-TIFF, Philips TIFF) store each pyramid level as JPEG tiles; this reader fetches those
compressed tiles with ``os.pread`` (no lock), decodes each once into a cache shared by the
reader threads (:class:`TileCache`), and crops/resizes like :meth:`Slide.read_patch` does.

The container is parsed by tifffile (:func:`probe`): each OpenSlide level is matched to a
tiled 8-bit RGB/YCbCr JPEG page of the same size; anything else (JPEG 2000 SVS, NDPI, MRXS,
LZW/deflate tiles, ...) is declined with a reason and read through OpenSlide. Geometry, mpp
and properties still come from OpenSlide, so both readers tile a slide identically.

Colour: a page with photometric RGB is decoded as RGB (Aperio writes RGB streams with no
Adobe marker; libjpeg would otherwise take them for YCbCr), YCbCr pages as YCbCr, as libtiff
and OpenSlide do. Downscaling: when the patch's final resize shrinks by ≥ ``dct_min_final`` ×
2, 4 or 8, libjpeg's DCT-domain scaling does that share of it while decoding (see docs/readers.md).
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from featstore.errors import SlideReadError
from featstore.read.jpeg import complete, is_whole
from featstore.read.slide import Slide, center_crop, resize_filter

log = logging.getLogger(__name__)

READERS = ("auto", "openslide", "native")
DCT_SCALES = (8, 4, 2)            # libjpeg's DCT scaling denominators tried, coarsest first
_JPEG, _RGB, _YCBCR = 7, 2, 6     # TIFF Compression and Photometric codes
_DEFAULT_CACHE = 256 << 20
_WHITE = 255


@dataclass(frozen=True)
class NativeLevel:
    """One pyramid level's tiles: where each compressed tile lies in the file and how to decode it."""

    page: str                     # e.g. "page 0" / "series 0 level 2": for messages
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    tables: bytes | None
    rgb: bool                     # photometric RGB: the streams hold R, G, B (not YCbCr)

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_h)


@dataclass(frozen=True)
class NativeLayout:
    """The JPEG tiles of every OpenSlide level of one file."""

    path: Path
    levels: tuple[NativeLevel, ...]


def _candidates(tif) -> list[tuple[str, object]]:
    """Every image page of the file: top-level pages, then series levels (OME SubIFDs)."""
    seen, out = set(), []
    for i, page in enumerate(tif.pages):
        if hasattr(page, "offset") and page.offset not in seen:
            seen.add(page.offset)
            out.append((f"page {i}", page))
    for si, series in enumerate(tif.series):
        for li, level in enumerate(series.levels):
            page = level.keyframe
            if page is not None and page.offset not in seen:
                seen.add(page.offset)
                out.append((f"series {si} level {li}", page))
    return out


def _unfit(page) -> str | None:
    """Why *page* cannot be read natively, or None when it can."""
    if not page.is_tiled:
        return "stripped, not tiled"
    if int(page.compression) != _JPEG:
        name = getattr(page.compression, "name", str(page.compression))
        return f"{name} tiles, not JPEG"
    if int(page.photometric) not in (_RGB, _YCBCR):
        return f"photometric {getattr(page.photometric, 'name', page.photometric)}"
    if page.samplesperpixel != 3 or page.bitspersample != 8 or page.planarconfig != 1 or page.tiledepth > 1:
        return "not 8-bit interleaved RGB"
    return None


def probe(path: str | Path, level_dimensions: Sequence[tuple[int, int]]) -> NativeLayout | str:
    """The native layout of *path* whose levels have OpenSlide's *level_dimensions*, or why not.

    A string return is the reason the native reader declines the file (it is read through
    OpenSlide then); it never raises for an unsupported or unreadable file.
    """
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ndpi:
                return "Hamamatsu NDPI (tiles are JPEG strips with restart markers)"
            pages = _candidates(tif)
            levels = []
            for li, (w, h) in enumerate(level_dimensions):
                match = [(name, p) for name, p in pages if (p.imagewidth, p.imagelength) == (w, h)]
                if not match:
                    return f"level {li} ({w}x{h}) has no page of that size"
                why = {name: _unfit(p) for name, p in match}
                ok = [(name, p) for name, p in match if why[name] is None]
                if not ok:
                    return f"level {li} ({w}x{h}): {'; '.join(why.values())}"
                levels.append(_level(*ok[0]))
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as exc:
        return f"not a TIFF tifffile can parse ({type(exc).__name__}: {exc})"
    return NativeLayout(path, tuple(levels))


def _level(name: str, page) -> NativeLevel:
    tables = page.jpegtables
    return NativeLevel(
        page=name, width=int(page.imagewidth), height=int(page.imagelength),
        tile_w=int(page.tilewidth), tile_h=int(page.tilelength),
        offsets=tuple(int(o) for o in page.dataoffsets), counts=tuple(int(c) for c in page.databytecounts),
        tables=bytes(tables) if tables is not None else None, rgb=int(page.photometric) == _RGB)


class TileCache:
    """Decoded tiles shared by a :class:`TileSource`'s reader threads, bounded in bytes (LRU).

    A tile two threads ask for at once is decoded once: the second waits for the first. Also
    memoises each file's :class:`NativeLayout` (or the reason it has none), so a slide is
    probed once per run and an ``auto`` fallback is announced once.
    """

    def __init__(self, max_bytes: int = _DEFAULT_CACHE):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.decodes = 0
        self.hits = 0
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._pending: dict[Hashable, threading.Event] = {}
        self._layouts: dict[Path, NativeLayout | str] = {}
        self._lock = threading.Lock()

    def layout(self, path: Path, level_dimensions: Sequence[tuple[int, int]]) -> NativeLayout | str:
        """:func:`probe` of *path*, once per file."""
        with self._lock:
            if path in self._layouts:
                return self._layouts[path]
        found = probe(path, level_dimensions)
        with self._lock:
            return self._layouts.setdefault(path, found)

    def _hit(self, key: Hashable):
        """The cached value or None; a hit is counted and refreshed. Call with the lock held."""
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return hit

    def peek(self, key: Hashable):
        """The cached value of *key* or None (a hit refreshes it)."""
        with self._lock:
            return self._hit(key)

    def get(self, key: Hashable, make: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached value of *key*, made with *make* on a miss (once, however many threads ask)."""
        while True:
            with self._lock:
                hit = self._hit(key)
                if hit is not None:
                    return hit
                event = self._pending.get(key)
                owner = event is None
                if owner:
                    event = self._pending[key] = threading.Event()
            if owner:
                break
            event.wait()        # another thread decodes it; take its result (or retry on its failure)
        try:
            value = make()
            with self._lock:
                self.decodes += 1
                self._items[key] = value
                self.nbytes += value.nbytes
                while self.nbytes > self.max_bytes and len(self._items) > 1:
                    _, old = self._items.popitem(last=False)
                    self.nbytes -= old.nbytes
            return value
        finally:
            with self._lock:
                self._pending.pop(key, None)
            event.set()


def dct_scale(shrink: float, min_final: float) -> int:
    """The DCT scaling denominator for a patch shrunk *shrink*× from the level read.

    The largest of 8, 4, 2 that still leaves a final resize of at least *min_final*×, else 1
    (``min_final=inf`` turns DCT scaling off; 1 lets it do the whole shrink when it can).
    """
    for s in DCT_SCALES:
        if shrink / s >= min_final * 0.999:
            return s
    return 1


@dataclass(frozen=True)
class PatchPlan:
    """One patch's read: *level* decoded at 1/*scale*, canvas [y0:y1, x0:x1] of it, then the
    canvas's float *box* resized to *full*² (skipped when the box is the canvas at that size)."""

    level: int
    scale: int
    x0: int
    y0: int
    x1: int
    y1: int
    box: tuple[float, float, float, float]
    full: int

    @property
    def is_crop(self) -> bool:
        return (self.x1 - self.x0, self.y1 - self.y0) == (self.full, self.full) and \
            max(abs(v) for v in self.box[:2]) < 1e-6


def _tiles_in(x0: int, y0: int, x1: int, y1: int, tw: int, th: int) -> list[tuple[int, int]]:
    if x1 <= x0 or y1 <= y0:
        return []
    return [(c, r) for r in range(y0 // th, -(-y1 // th)) for c in range(x0 // tw, -(-x1 // tw))]


_TORCH_RESIZE = {"bilinear": "bilinear", "bicubic": "bicubic"}
_SNAP = 0.02    # px: a box edge closer than this to a pixel edge is taken as on it (such a shift
                # moves a pixel by at most 2 % of the difference to its neighbour)


def resize_box(canvas: np.ndarray, box: tuple[float, float, float, float], full: int, interpolation: str,
               resample: int) -> np.ndarray:
    """*canvas*'s *box* resized to *full*², antialiased like PIL.

    An integral box with a bilinear/bicubic filter goes through torch's uint8 antialiased
    interpolation (its AVX2 path: within 1 grey level of PIL's, 3-6x faster); a fractional box
    through PIL's ``resize(box=...)``, which interpolates the sub-pixel offset as OpenSlide does.
    """
    snapped = [round(v) if abs(v - round(v)) < _SNAP else None for v in box]
    mode = _TORCH_RESIZE.get(str(interpolation).lower())
    if mode is None or None in snapped:
        return np.asarray(Image.fromarray(canvas).resize((full, full), resample, box=box))
    import torch
    import torch.nn.functional as F

    x0, y0, x1, y1 = snapped
    t = torch.from_numpy(np.ascontiguousarray(canvas[y0:y1, x0:x1])).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=(full, full), mode=mode, antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


class NativeSlide(Slide):
    """A :class:`Slide` whose :meth:`read_patch` decodes the file's JPEG tiles itself.

    Geometry, mpp, thumbnails and :meth:`read_region` stay OpenSlide's; only patch reading,
    the hot path of extraction, is native. *cache* is shared between handles (threads).
    """

    reader = "native"

    def __init__(self, path: str | Path, mpp: float | None = None, *, layout: NativeLayout | None = None,
                 cache: TileCache | None = None, dct_min_final: float = 2.0):
        super().__init__(path, mpp)
        self.cache = cache if cache is not None else TileCache()
        found = layout if layout is not None else self.cache.layout(self.path, self.level_dimensions)
        if isinstance(found, str):
            self.close()
            raise SlideReadError(f"{self.path}: the native reader cannot read it ({found}); use --reader openslide")
        self.layout = found
        self.dct_min_final = float(dct_min_final)
        self._fd = os.open(self.path, os.O_RDONLY)

    # ------------------------------------------------------------------ tiles
    def _raw(self, level: int, index: int) -> bytes:
        lv = self.layout.levels[level]
        return os.pread(self._fd, lv.counts[index], lv.offsets[index])

    def _decode(self, level: int, col: int, row: int, scale: int) -> np.ndarray:
        """Tile (col, row) of *level* as (tile_h/scale, tile_w/scale, 3) RGB; white where absent."""
        lv = self.layout.levels[level]
        index = row * lv.cols + col
        shape = (-(-lv.tile_h // scale), -(-lv.tile_w // scale), 3)
        if index >= len(lv.counts) or lv.counts[index] == 0:   # sparse tile (Philips): background
            return np.full(shape, _WHITE, np.uint8)
        data = self._raw(level, index)
        where = f"{self.path}: corrupt JPEG tile ({col}, {row}) of level {level} ({lv.page})"
        if not is_whole(data):
            raise SlideReadError(f"{where}: the stream is cut off (no end-of-image marker)")
        try:
            rgb = self._jpeg(lv, data, scale)
        except Exception as exc:  # noqa: BLE001 -- any decoder failure names the tile
            raise SlideReadError(f"{where}: {exc}") from None
        if rgb.shape != shape:
            raise SlideReadError(f"{where}: decoded to {rgb.shape[1]}x{rgb.shape[0]}, expected "
                                 f"{shape[1]}x{shape[0]}")
        return rgb

    @staticmethod
    def _jpeg(lv: NativeLevel, data: bytes, scale: int) -> np.ndarray:
        if scale == 1:
            import imagecodecs

            space = {"colorspace": 2, "outcolorspace": 2} if lv.rgb else {}
            return np.asarray(imagecodecs.jpeg8_decode(data, tables=lv.tables, **space))
        im = Image.open(io.BytesIO(complete(data, lv.tables, lv.rgb)))
        im.draft("RGB", (-(-lv.tile_w // scale), -(-lv.tile_h // scale)))
        return np.asarray(im.convert("RGB"))

    def tile(self, level: int, col: int, row: int, scale: int = 1) -> np.ndarray:
        """Decoded tile, through the shared cache."""
        return self.cache.get((self.path, level, col, row, scale), lambda: self._decode(level, col, row, scale))

    def region(self, level: int, scale: int, x0: int, y0: int, x1: int, y1: int, *,
               tile: Callable[[int, int], object] | None = None, out=None):
        """Pixels [y0:y1, x0:x1] of *level* decoded at 1/*scale*; white outside the level.

        *tile* (col, row) -> HWC tile and *out* (a white HWC array or tensor) let the device
        path (:mod:`featstore.read.devicedecode`) assemble torch tensors with the same code.
        """
        lv = self.layout.levels[level]
        tw, th = lv.tile_w // scale, lv.tile_h // scale
        lw, lh = lv.width // scale, lv.height // scale   # a pixel half over the edge would blend in padding
        tile = tile or (lambda col, row: self.tile(level, col, row, scale))
        if out is None:
            out = np.full((y1 - y0, x1 - x0, 3), _WHITE, np.uint8)
        vx0, vy0, vx1, vy1 = max(x0, 0), max(y0, 0), min(x1, lw), min(y1, lh)
        for col, row in _tiles_in(vx0, vy0, vx1, vy1, tw, th):
            t = tile(col, row)
            tx, ty = col * tw, row * th
            ax0, ay0 = max(vx0, tx), max(vy0, ty)
            ax1, ay1 = min(vx1, tx + tw), min(vy1, ty + th)
            out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] = t[ay0 - ty:ay1 - ty, ax0 - tx:ax1 - tx]
        return out

    def tiles_of(self, plan: "PatchPlan") -> list[tuple[int, int]]:
        """(col, row) of every tile *plan*'s canvas needs."""
        lv = self.layout.levels[plan.level]
        tw, th = lv.tile_w // plan.scale, lv.tile_h // plan.scale
        lw, lh = lv.width // plan.scale, lv.height // plan.scale
        return _tiles_in(max(plan.x0, 0), max(plan.y0, 0), min(plan.x1, lw), min(plan.y1, lh), tw, th)

    # ------------------------------------------------------------------ patches
    def plan(self, xy0: tuple[int, int], size0: int, full: int, dct: bool = True) -> "PatchPlan":
        """Where a patch comes from: the level :meth:`Slide.read_patch` would read, the DCT
        scale (when *dct*), the integer canvas to assemble and the float box to resize."""
        level = self.best_level(size0 / full)
        ds = self.level_downsamples[level]
        side = max(1, int(round(size0 / ds)))
        scale = dct_scale(side / full, self.dct_min_final) if dct else 1
        bx, by, bs = xy0[0] / ds / scale, xy0[1] / ds / scale, side / scale
        cx, cy = math.floor(bx + 1e-6), math.floor(by + 1e-6)
        return PatchPlan(level, scale, cx, cy, math.ceil(bx + bs - 1e-6), math.ceil(by + bs - 1e-6),
                         (bx - cx, by - cy, bx - cx + bs, by - cy + bs), full)

    def read_patch(self, xy0: tuple[int, int], size0: int, out_size: int,
                   interpolation: str = "bilinear", resize_size: int | None = None) -> np.ndarray:
        """As :meth:`Slide.read_patch`, from the file's JPEG tiles (same level, same resize)."""
        resample = resize_filter(interpolation)
        full = max(out_size, int(resize_size or out_size))
        p = self.plan(xy0, size0, full)
        canvas = self.region(p.level, p.scale, p.x0, p.y0, p.x1, p.y1)
        if p.is_crop:
            rgb = canvas
        else:
            rgb = resize_box(canvas, p.box, full, interpolation, resample)
        return np.ascontiguousarray(center_crop(rgb, out_size))

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)
        super().close()


def open_slide(path: str | Path, mpp: float | None = None, *, reader: str = "openslide",
               cache: TileCache | None = None, dct_min_final: float = 2.0) -> Slide:
    """A :class:`NativeSlide` or an OpenSlide :class:`Slide` of *path*, by *reader*.

    ``auto`` reads natively when :func:`probe` accepts the file, else through OpenSlide (and
    logs why, once per file when *cache* is shared); ``native`` raises when it cannot.
    """
    if reader not in READERS:
        from featstore.core.errors import ConfigError

        raise ConfigError(f"--reader {reader!r}: use one of {', '.join(READERS)}")
    slide = Slide(path, mpp)
    if reader == "openslide":
        return slide
    cache = cache if cache is not None else TileCache()
    found = cache.layout(slide.path, slide.level_dimensions)
    if isinstance(found, str):
        if reader == "native":
            slide.close()
            raise SlideReadError(f"{slide.path}: the native reader cannot read it ({found}); use --reader auto")
        _announce(slide.path, found)
        return slide
    slide.close()
    return NativeSlide(path, mpp, layout=found, cache=cache, dct_min_final=dct_min_final)


_announced: set[Path] = set()
_announced_lock = threading.Lock()


def _announce(path: Path, reason: str) -> None:
    with _announced_lock:
        if path in _announced:
            return
        _announced.add(path)
    log.warning("%s: read through OpenSlide (native reader: %s)", path, reason)


def reader_of(slide: Slide) -> str:
    """``"native"`` or ``"openslide"``: which reader *slide* reads patches with."""
    return getattr(slide, "reader", "openslide")


__all__ = ["DCT_SCALES", "NativeLayout", "NativeLevel", "NativeSlide", "PatchPlan", "READERS", "TileCache",
           "dct_scale",
           "open_slide", "probe", "reader_of"]
