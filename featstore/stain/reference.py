"""Fit a stain normaliser to a reference: one image (a reference tile) or a whole slide, from
which tissue tiles are sampled at the store's tiling. `featstore extract --stain macenko
--stain-reference REF` and `featstore stain` call :func:`fit_normaliser`.

A slide reference is tiled like any slide (:func:`featstore.tiling.tile_slide`, the same tissue
mask and patch size), and ``tiles`` patches with the most tissue are kept, read at the
encoder's input size. With fewer tissue patches than that all of them are used; with none the fit
fails naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featstore.errors import StainError
from featstore.stain.normalisers import StainNormaliser, get_normaliser
from featstore.tiling import TilingConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _is_slide(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path)) is not None
    except Exception:  # noqa: BLE001 -- unreadable by OpenSlide: treat it as an image
        return False


def reference_tiles(reference: str | Path, *, tiles: int = 32, tiling: TilingConfig | None = None,
                    input_size: int = 224, slide_mpp: float | None = None,
                    interpolation: str = "bilinear") -> list[np.ndarray]:
    """RGB uint8 tiles of *reference*: the image itself, or up to *tiles* tissue patches of a slide
    (most tissue first, ties in grid order), each *input_size* px."""
    from featstore.read.images import load_rgb
    from featstore.read.slide import Slide
    from featstore.tiling import tile_slide

    path = Path(reference)
    if not path.is_file():
        raise StainError(f"{path}: stain reference not found (give an image or a slide file)")
    if not _is_slide(path):
        try:
            return [np.asarray(load_rgb(path))]
        except Exception as exc:  # noqa: BLE001 -- any decoder error is a bad reference
            raise StainError(f"{path}: cannot read the stain reference image ({exc})") from None
    cfg = tiling or TilingConfig()
    with Slide(path, mpp=slide_mpp) as slide:
        grid = tile_slide(slide, cfg)
        if not len(grid):
            raise StainError(f"{path}: no tissue patch in the stain reference slide at {cfg.patch_size} px, "
                             f"{cfg.mpp} µm/px")
        order = np.argsort(-grid.tissue, kind="stable")[:max(1, int(tiles))]
        return [slide.read_patch((int(x), int(y)), grid.size0, input_size, interpolation)
                for x, y in grid.coords[np.sort(order)]]


def fit_normaliser(method: str, reference: str | Path | None, *, tiles: int = 32,
                   tiling: TilingConfig | None = None, input_size: int = 224,
                   slide_mpp: float | None = None, interpolation: str = "bilinear") -> StainNormaliser:
    """The *method* normaliser (``macenko`` | ``reinhard`` | ``none``) fitted to *reference*;
    ``none`` needs no reference."""
    norm = get_normaliser(method)
    if method == "none":
        return norm.fit(None)
    if reference is None:
        raise StainError(f"--stain {method} needs --stain-reference (a reference tile image or a slide)")
    imgs = reference_tiles(reference, tiles=tiles, tiling=tiling, input_size=input_size, slide_mpp=slide_mpp,
                           interpolation=interpolation)
    desc = f"{Path(reference).name}" + (f" ({len(imgs)} tissue tiles)" if len(imgs) > 1 else "")
    return norm.fit(imgs if len(imgs) > 1 else imgs[0], source=desc)


__all__ = ["fit_normaliser", "reference_tiles"]
