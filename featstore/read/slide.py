"""A thin reader over OpenSlide: every format OpenSlide opens (and OME-TIFF), regions at a target size.

Only reading lives here (no masks, no tiling, no plotting). Errors name the file and say what
is wrong. OpenSlide errors are sticky (after one failed read every call on the handle fails),
so a failed read reopens the handle before raising.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from featstore.core.errors import ConfigError
from featstore.errors import MissingMppError, SlideFormatError, SlideNotFoundError, SlideReadError

log = logging.getLogger(__name__)

_FINGERPRINT_BYTES = 1 << 20
_THUMB_BLOCK = 4096  # a level larger than this squared is read for a thumbnail block by block
_RESOLUTION_UNITS_UM = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}


def composite_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (H, W, 4) uint8 -> RGB with transparent areas (outside the scan) painted white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    # OpenSlide returns premultiplied-free RGB with alpha; blend on white
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


_RESIZE_FILTERS = {
    "nearest": Image.NEAREST, "box": Image.BOX, "bilinear": Image.BILINEAR,
    "hamming": Image.HAMMING, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
}


def resize_filter(interpolation: str) -> int:
    """The PIL resampling filter of an encoder's ``interpolation`` (timm / torchvision names).

    PIL scales each filter's support by the shrink factor (antialiasing), as
    ``torchvision.transforms.v2.functional.resize(..., antialias=True)`` does.
    """
    try:
        return _RESIZE_FILTERS[str(interpolation).lower()]
    except KeyError:
        raise ConfigError(
            f"interpolation {interpolation!r}: use one of {', '.join(_RESIZE_FILTERS)}") from None


def center_crop(rgb, out_size: int):
    """The centre *out_size*² of a square HWC patch (array or tensor), at torchvision
    ``CenterCrop``'s offset; the patch itself when it already has that size."""
    full = rgb.shape[0]
    if full == out_size:
        return rgb
    top = int(round((full - out_size) / 2.0))
    return rgb[top:top + out_size, top:top + out_size]


#: Level-0 microns per pixel a slide can have (100x oil ≈ 0.05, a 1.25x scan ≈ 8); outside it the
#: value is a unit mistake and would tile a 256 px slide into tens of thousands of patches.
MPP_RANGE = (0.01, 100.0)


def plausible_mpp(mpp: float) -> bool:
    """True when *mpp* is a finite level-0 microns per pixel inside :data:`MPP_RANGE`."""
    return math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def open_handle(path: str | Path):
    """An OpenSlide handle of *path*, or for an OME-TIFF (its pyramid in SubIFDs, which OpenSlide does
    not list) the same API over tiffslide (:class:`featstore.read.ome.OmeTiff`)."""
    from featstore.read.ome import OmeTiff, is_ome_tiff

    return OmeTiff(path) if is_ome_tiff(path) else openslide.OpenSlide(str(path))


class Slide:
    """One whole-slide image. ``mpp`` overrides (or supplies) the file's microns per pixel.

    Handles are safe to share between threads for reading (OpenSlide is thread-safe), but the
    extractor gives each reader thread its own handle so a reopen never races another read.
    """

    reader = "openslide"   # which reader :meth:`read_patch` uses (featstore.read.native.NativeSlide: "native")

    def __init__(self, path: str | Path, mpp: float | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise SlideNotFoundError(f"{self.path}: no such slide file")
        if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
            raise MissingMppError(f"{self.path}: --slide-mpp must be a positive number, got {mpp}")
        if mpp is not None and not plausible_mpp(mpp):
            raise MissingMppError(f"{self.path}: --slide-mpp {mpp:g} µm/px is outside the plausible "
                                  f"{MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} µm/px of a slide's level 0")
        self._mpp_override = mpp
        self._lock = threading.Lock()
        self._osr = self._open()

    def _open(self) -> openslide.OpenSlide:
        try:
            return open_handle(self.path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideFormatError(
                f"{self.path}: not a slide OpenSlide can read (unsupported format, or a corrupt/truncated file)"
            ) from None
        except openslide.OpenSlideError as exc:
            raise SlideFormatError(f"{self.path}: OpenSlide cannot open it ({exc})") from None
        except OSError as exc:
            raise SlideFormatError(f"{self.path}: cannot open ({exc})") from None

    # ------------------------------------------------------------------ geometry
    @property
    def vendor(self) -> str:
        return str(self._osr.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown"))

    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(self._osr.dimensions)

    @property
    def level_count(self) -> int:
        return int(self._osr.level_count)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(d) for d in self._osr.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._osr.level_downsamples)

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    def file_mpp(self) -> float | None:
        """Microns per pixel recorded in the file (OpenSlide's mpp, else the TIFF resolution)."""
        props = self._osr.properties
        vals = []
        for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
            try:
                v = float(props[key])
            except (KeyError, ValueError):
                continue
            if v > 0 and math.isfinite(v):
                vals.append(v)
        if vals:
            return float(np.mean(vals))
        try:
            res = float(props["tiff.XResolution"])
            unit = props.get("tiff.ResolutionUnit", "").lower()
        except (KeyError, ValueError):
            return None
        if res > 0 and unit in _RESOLUTION_UNITS_UM:
            return _RESOLUTION_UNITS_UM[unit] / res
        return None

    @property
    def mpp(self) -> float:
        """Microns per level-0 pixel: the override, else the file's; an error if neither."""
        if self._mpp_override is not None:
            return float(self._mpp_override)
        mpp = self.file_mpp()
        if mpp is None:
            raise MissingMppError(f"{self.path}: no microns-per-pixel in the file; pass --slide-mpp")
        if not plausible_mpp(mpp):
            raise MissingMppError(f"{self.path}: the file records {mpp:g} µm/px, outside the plausible "
                                  f"{MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} µm/px of a slide's level 0; "
                                  "pass --slide-mpp with the true value")
        return mpp

    # ------------------------------------------------------------------ reading
    def read_region(self, xy0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) uint8 RGB of *size* pixels at *level*, top-left at level-0 *xy0*; background white."""
        try:
            img = self._osr.read_region((int(xy0[0]), int(xy0[1])), int(level), (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as exc:
            self._reopen()
            raise SlideReadError(
                f"{self.path}: unreadable region at level {level}, ({xy0[0]}, {xy0[1]}) size {size} ({exc})"
            ) from None
        return composite_white(np.asarray(img))

    def _reopen(self) -> None:
        with self._lock:
            try:
                self._osr.close()
            except openslide.OpenSlideError:
                pass
            self._osr = self._open()

    def best_level(self, downsample: float) -> int:
        """The deepest level whose downsample does not exceed *downsample* (1 % tolerance)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.01:
                best = i
        return best

    def read_patch(self, xy0: tuple[int, int], size0: int, out_size: int,
                   interpolation: str = "bilinear", resize_size: int | None = None) -> np.ndarray:
        """A square of side *size0* level-0 px at *xy0*, read from the best level, as out_size² RGB.

        The resize is PIL's antialiased one with the filter the encoder's weights were trained
        with (*interpolation*: bilinear, bicubic, ...; see :func:`resize_filter`). With
        *resize_size* (> out_size) the square is resized to it and its centre out_size² kept,
        as torchvision ``Resize(resize_size)`` + ``CenterCrop(out_size)`` (e.g. Prov-GigaPath).
        """
        resample = resize_filter(interpolation)
        full = max(out_size, int(resize_size or out_size))
        level = self.best_level(size0 / full)
        ds = self.level_downsamples[level]
        side = max(1, int(round(size0 / ds)))
        rgb = self.read_region(xy0, level, (side, side))
        if side != full:
            rgb = np.asarray(Image.fromarray(rgb).resize((full, full), resample))
        return np.ascontiguousarray(center_crop(rgb, out_size))

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """RGB thumbnail whose longer side is at most *max_size*, and its downsample vs level 0."""
        w, h = self.dimensions
        scale = max(w, h) / max_size
        if scale <= 1:
            tw, th = w, h
        else:
            tw, th = max(1, int(round(w / scale))), max(1, int(round(h / scale)))
        level = self.best_level(min(w / tw, h / th))
        lw, lh = self.level_dimensions[level]
        if lw * lh <= _THUMB_BLOCK**2:
            rgb = self.read_region((0, 0), level, (lw, lh))
            if (lw, lh) != (tw, th):
                rgb = np.asarray(Image.fromarray(rgb).resize((tw, th), Image.BILINEAR))
            return rgb, w / tw
        return self._thumbnail_blocks(level, (tw, th)), w / tw

    def _thumbnail_blocks(self, level: int, size: tuple[int, int]) -> np.ndarray:
        """Thumbnail of a level too big to read at once (e.g. a single-level 50k² scan).

        The level is read in blocks of ``_THUMB_BLOCK``² pixels, each shrunk and pasted, so
        memory stays at one block whatever the slide's size.
        """
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        tw, th = size
        sx, sy = tw / lw, th / lh
        out = Image.new("RGB", (tw, th), (255, 255, 255))
        for by in range(0, lh, _THUMB_BLOCK):
            for bx in range(0, lw, _THUMB_BLOCK):
                bw, bh = min(_THUMB_BLOCK, lw - bx), min(_THUMB_BLOCK, lh - by)
                x0, y0 = int(round(bx * sx)), int(round(by * sy))
                x1, y1 = int(round((bx + bw) * sx)), int(round((by + bh) * sy))
                if x1 <= x0 or y1 <= y0:
                    continue
                block = self.read_region((int(bx * ds), int(by * ds)), level, (bw, bh))
                out.paste(Image.fromarray(block).resize((x1 - x0, y1 - y0), Image.BILINEAR), (x0, y0))
        return np.asarray(out)

    def fingerprint(self) -> dict:
        """File size and sha256 of its first and last MiB: detects a changed or swapped file cheaply."""
        size = self.path.stat().st_size if self.path.is_file() else 0
        h = hashlib.sha256()
        if self.path.is_file():
            with self.path.open("rb") as fh:
                h.update(fh.read(_FINGERPRINT_BYTES))
                if size > _FINGERPRINT_BYTES:
                    fh.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
                    h.update(fh.read(_FINGERPRINT_BYTES))
        return {"size": int(size), "partial_sha256": h.hexdigest()}

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]}, levels={self.level_count})"
