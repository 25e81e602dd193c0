"""OME-TIFF slides: the pyramid in SubIFDs, the resolution in the OME-XML.

OpenSlide 4 opens an OME-TIFF as a generic TIFF: only the full-resolution image (the reduced
levels sit in SubIFDs, which it does not list) and no microns per pixel (OME keeps them in
``PhysicalSizeX/Y`` of its XML, not in the TIFF resolution tags). tiffslide (Bayer AG, BSD-3;
tifffile + zarr underneath) lists the SubIFD levels of the image series; :class:`OmeTiff` wraps
it in the part of OpenSlide's API that :class:`featstore.read.slide.Slide` and OpenSlide's
DeepZoomGenerator use, with OpenSlide's conventions (RGBA regions, transparent outside the image,
``openslide.mpp-x/y`` from the OME-XML, ``OpenSlideError`` on a failed read).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

OME_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.tf2", ".ome.tf8", ".ome.btf")
#: OME length units -> µm
_UNITS_UM = {"µm": 1.0, "um": 1.0, "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3,
             "millimeter": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4, "pm": 1e-6}


def is_ome_tiff(path: str | Path) -> bool:
    """True for a file named like an OME-TIFF (``*.ome.tif[f]``, as Bio-Formats and tifffile write them)."""
    return str(path).lower().endswith(OME_SUFFIXES)


def ome_mpp(xml: str) -> tuple[float | None, float | None]:
    """(x, y) microns per pixel of the first image's ``Pixels`` in an OME-XML string (None if absent)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, None
    out = []
    for axis in ("X", "Y"):
        try:
            v = float(pixels.get(f"PhysicalSize{axis}", "nan"))
        except ValueError:
            v = math.nan
        scale = _UNITS_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        out.append(v * scale if scale and math.isfinite(v) and v > 0 else None)
    return out[0], out[1]


class OmeTiff:
    """An OME-TIFF behind OpenSlide's reading API (levels from the SubIFDs, mpp from the OME-XML)."""

    def __init__(self, path: str | Path):
        import tiffslide

        self.path = Path(path)
        try:
            self._ts = tiffslide.TiffSlide(str(self.path))
        except Exception as exc:      # tiffslide/tifffile raise many types for a bad file
            raise openslide.OpenSlideError(f"not a readable OME-TIFF ({type(exc).__name__}: {exc})") from None
        self._levels = [self._ts.zarr_group[str(i)] for i in range(self._ts.level_count)]
        shape = self._levels[0].shape
        if len(shape) != 3 or shape[-1] not in (3, 4) or self._levels[0].dtype != np.uint8:
            axes = self._ts.properties.get("tiffslide.series-axes")
            raise openslide.OpenSlideError(
                f"an OME-TIFF of shape {shape} ({axes}, {self._levels[0].dtype}): featstore reads brightfield "
                "RGB(A) 8-bit images, not multi-channel fluorescence")
        props = {k: str(v) for k, v in self._ts.properties.items() if v is not None}
        mx, my = ome_mpp(self._ts.properties.get("tiff.ImageDescription") or "")
        if mx:
            props[openslide.PROPERTY_NAME_MPP_X] = str(mx)
            props[openslide.PROPERTY_NAME_MPP_Y] = str(my or mx)
        props[openslide.PROPERTY_NAME_VENDOR] = "ome-tiff"
        self.properties = props

    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(self._ts.dimensions)

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(a.shape[1]), int(a.shape[0])) for a in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        w0, h0 = self.level_dimensions[0]
        return tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample:
                best = i
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA *size* pixels at *level*, top-left at level-0 *location*; transparent outside the image."""
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        w, h = int(size[0]), int(size[1])
        lx, ly = int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds))
        out = np.zeros((h, w, 4), np.uint8)
        x0, y0, x1, y1 = max(0, lx), max(0, ly), min(lw, lx + w), min(lh, ly + h)
        if x1 > x0 and y1 > y0:
            try:
                arr = np.asarray(self._levels[level][y0:y1, x0:x1])
            except Exception as exc:
                raise openslide.OpenSlideError(f"{type(exc).__name__}: {exc}") from None
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx, :3] = arr[..., :3]
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx, 3] = arr[..., 3] if arr.shape[-1] == 4 else 255
        return Image.fromarray(out, "RGBA")

    def close(self) -> None:
        self._ts.close()
