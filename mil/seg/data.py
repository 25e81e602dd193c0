"""Image/mask pairs for segmentation: discovery, exact mask reading, validation.

Layout: ``<root>/images/<name>.<png|jpg|jpeg|tif|tiff>`` and ``<root>/masks/<name>.<png|tif|tiff>``
(any two folders; pairs are matched by file stem). Images are decoded to 8-bit RGB by
:func:`featstore.read.images.load_rgb` (16-bit, alpha, palette handled there). Masks are read
exactly, never resampled or rescaled: 8- or 16-bit single channel (PNG ``L``/``I;16``/``P``
indices, TIFF), or RGB whose three channels are equal. A mask is one of three kinds:

- ``binary``: values {0, 1} or {0, 255} (mapped to 0/1);
- ``multiclass``: class indices 0..n_classes-1 (``n_classes`` required);
- ``instance``: 0 background, any positive integer one object (GlaS, MoNuSeg style).

A bad pair raises :class:`SegError` (one line: the file and the problem); :func:`load_dataset`
logs and skips it instead, so one broken file does not stop a cohort.

Whole slides with annotations (QuPath GeoJSON, label TIFFs): mil.seg.wsi.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from featstore.core.errors import CoreError, first_line
from featstore.read.images import load_rgb
from mil.seg.errors import SegError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
MASK_KINDS = ("binary", "multiclass", "instance")


@dataclass(frozen=True)
class SegPair:
    """One image file and its mask file; *name* is their common stem."""

    image: Path
    mask: Path
    name: str


# ------------------------------------------------------------------ discovery
def _by_stem(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """{stem: file} of the files in *folder* with one of *suffixes*; a stem held by two files
    (``a.png`` and ``a.tif``) is ambiguous: warned about and left out."""
    files: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes:
            files.setdefault(p.stem, []).append(p)
    out = {}
    for stem, paths in files.items():
        if len(paths) > 1:
            log.warning("skipped %s %s: several %s files share the name %r",
                        what, ", ".join(str(p) for p in paths), what, stem)
        else:
            out[stem] = paths[0]
    return out


def discover_pairs(images_dir: str | Path, masks_dir: str | Path | None = None) -> list[SegPair]:
    """Image/mask pairs of two folders, matched by stem, sorted by name.

    *masks_dir* defaults to the sibling folder ``masks`` of *images_dir*. An image without a mask,
    or a mask without an image, is logged (a warning naming the files) and skipped. Raises
    :class:`SegError` when a folder is missing or no pair matches.
    """
    images_dir = Path(images_dir)
    masks_dir = Path(masks_dir) if masks_dir is not None else images_dir.parent / "masks"
    for folder, what in ((images_dir, "images"), (masks_dir, "masks")):
        if not folder.is_dir():
            raise SegError(f"{folder}: no such {what} folder")
    images = _by_stem(images_dir, IMAGE_SUFFIXES, "image")
    masks = _by_stem(masks_dir, MASK_SUFFIXES, "mask")
    lonely_images = sorted(set(images) - set(masks))
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_images:
        log.warning("skipped %d image(s) without a mask in %s: %s", len(lonely_images), masks_dir,
                    ", ".join(str(images[s]) for s in lonely_images))
    if lonely_masks:
        log.warning("skipped %d mask(s) without an image in %s: %s", len(lonely_masks), images_dir,
                    ", ".join(str(masks[s]) for s in lonely_masks))
    pairs = [SegPair(images[s], masks[s], s) for s in sorted(set(images) & set(masks))]
    if not pairs:
        raise SegError(f"no image/mask pair in {images_dir} and {masks_dir} (matched by file name; "
                       f"images {'/'.join(IMAGE_SUFFIXES)}, masks {'/'.join(MASK_SUFFIXES)})")
    return pairs


# ------------------------------------------------------------------ reading
def _decode_mask(path: Path) -> np.ndarray:
    """The mask's pixel array as stored (PIL; TIFFs PIL cannot read through tifffile)."""
    if not path.is_file():
        raise SegError(f"{path}: no such mask file")
    if path.stat().st_size == 0:
        raise SegError(f"{path}: empty mask file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "1":
                return np.asarray(im, dtype=np.uint8)
            return np.array(im)   # P: palette indices, I;16: uint16, I: int32
    except Exception as exc:  # noqa: BLE001 -- any decoder error means this mask is unreadable
        reason = first_line(exc)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            return np.asarray(tifffile.imread(path, key=0))
        except Exception as exc:  # noqa: BLE001
            reason = f"{reason}; tifffile: {first_line(exc)}"
    raise SegError(f"{path}: unreadable mask ({reason})")


def _single_channel(a: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) integer labels from a decoded mask: RGB(A) only if its colour channels are equal."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] in (2, 3, 4):
        colour = a[..., :3] if a.shape[-1] >= 3 else a[..., :1]
        if not (colour == colour[..., :1]).all():
            raise SegError(f"{path}: colour mask (its RGB channels differ); save labels as one "
                           "8- or 16-bit channel (class index or object id per pixel)")
        a = colour[..., 0]
    if a.ndim != 2:
        raise SegError(f"{path}: mask has shape {a.shape}; expected (H, W) labels")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.all(np.mod(a, 1) == 0):
            raise SegError(f"{path}: float mask with non-integer values; store integer labels")
    elif a.dtype.kind not in "uib":
        raise SegError(f"{path}: mask dtype {a.dtype} is not an integer label type")
    return a.astype(np.int64)


def _values(m: np.ndarray, limit: int = 6) -> str:
    u = np.unique(m)
    return str(u[:limit].tolist())[:-1] + (", ...]" if len(u) > limit else "]")


def _validate(m: np.ndarray, path: Path, kind: str, n_classes: int | None) -> np.ndarray:
    """Kind-specific value checks; binary {0, 255} becomes {0, 1}."""
    if m.size and m.min() < 0:
        raise SegError(f"{path}: negative mask value {int(m.min())}; labels must be >= 0")
    if kind == "binary":
        u = set(np.unique(m).tolist())
        if u <= {0, 1}:
            return m
        if u <= {0, 255}:
            return (m > 0).astype(np.int64)
        raise SegError(f"{path}: binary mask has values {_values(m)}; expected {{0, 1}} or {{0, 255}} "
                       "(use mask_kind multiclass or instance for other labels)")
    if kind == "multiclass":
        if m.size and m.max() >= n_classes:
            bad = np.unique(m[m >= n_classes])
            raise SegError(f"{path}: mask value(s) {_values(bad)} >= n_classes={n_classes}")
    return m


def _check_kind(mask_kind: str, n_classes: int | None) -> None:
    if mask_kind not in MASK_KINDS:
        raise SegError(f"mask_kind {mask_kind!r} is not one of {list(MASK_KINDS)}")
    if mask_kind == "multiclass" and (n_classes is None or n_classes < 2):
        raise SegError(f"mask_kind multiclass needs n_classes >= 2 (background included), got {n_classes}")


def load_pair(pair: SegPair, *, mask_kind: str = "binary",
              n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(RGB (H, W, 3) uint8, labels (H, W) int64) of one pair, checked (module docstring).

    The mask must have the image's height and width. Raises :class:`SegError` naming the file
    and the problem: unreadable image or mask, size mismatch, colour mask, values not of
    *mask_kind* (multiclass: a value >= *n_classes*).
    """
    _check_kind(mask_kind, n_classes)
    try:
        image = np.array(load_rgb(pair.image), dtype=np.uint8)   # writable (torch.from_numpy)
    except CoreError as exc:   # featstore's SlideReadError already names the file
        raise SegError(first_line(exc)) from None
    mask = _single_channel(_decode_mask(pair.mask), pair.mask)
    if mask.shape != image.shape[:2]:
        raise SegError(f"{pair.mask}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                       f"{pair.image.name} is {image.shape[1]}x{image.shape[0]}")
    return image, _validate(mask, pair.mask, mask_kind, n_classes)


# ------------------------------------------------------------------ data sets
@dataclass
class SegData:
    """Loaded pairs: parallel lists ``images`` (H, W, 3) uint8, ``masks`` (H, W) int64 and
    ``names``; ``skipped`` {name: reason} of the pairs that failed to load."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    names: list[str]
    mask_kind: str = "binary"
    n_classes: int | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)


def load_dataset(pairs: Iterable[SegPair], *, mask_kind: str = "binary",
                 n_classes: int | None = None) -> SegData:
    """Every pair through :func:`load_pair`; a bad one is logged (one line, file + reason) and
    recorded in ``.skipped`` instead of stopping the load. Raises :class:`SegError` when no
    pair is given or none loads."""
    _check_kind(mask_kind, n_classes)
    data = SegData([], [], [], mask_kind=mask_kind, n_classes=n_classes)
    pairs = list(pairs)
    for pair in pairs:
        try:
            image, mask = load_pair(pair, mask_kind=mask_kind, n_classes=n_classes)
        except SegError as exc:
            log.warning("skipped pair %s: %s", pair.name, exc)
            data.skipped[pair.name] = str(exc)
            continue
        data.images.append(image)
        data.masks.append(mask)
        data.names.append(pair.name)
    if not data.names:
        first = next(iter(data.skipped.values()), "no pairs were given")
        raise SegError(f"no loadable image/mask pair out of {len(pairs)} (first problem: {first})")
    return data


def semantic(mask: np.ndarray, kind: str) -> np.ndarray:
    """The semantic target of a mask: instance ids -> binary foreground (``mask > 0``, int64);
    binary and multiclass masks are returned unchanged."""
    if kind not in MASK_KINDS:
        raise SegError(f"mask kind {kind!r} is not one of {list(MASK_KINDS)}")
    mask = np.asarray(mask)
    return (mask > 0).astype(np.int64) if kind == "instance" else mask


def semantic_masks(masks: Sequence[np.ndarray], kind: str) -> list[np.ndarray]:
    """:func:`semantic` of each mask."""
    return [semantic(m, kind) for m in masks]


__all__ = ["IMAGE_SUFFIXES", "MASK_KINDS", "MASK_SUFFIXES", "SegData", "SegPair", "discover_pairs",
           "load_dataset", "load_pair", "semantic", "semantic_masks"]
