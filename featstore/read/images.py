"""Image-folder cohorts: plain image files (tiles, crops, patches) as pseudo-slides of a store.

``featstore extract --images DIR`` (ImageFolder layout ``DIR/<class>/**/*.png``) or
``--images FILE.csv`` (``path,label[,split][,group]``) turns the images into *shards* of at
most ``shard_size`` images; one shard is one ``slides/<id>`` group of the store, its coords
``(i, 0)`` for image ``i`` and its ``slide_info["images"]`` the image rows kept, so features
row ``i`` is ``images[i]`` (docs/images.md). :class:`ImageShard` reads a shard the way
:class:`featstore.read.slide.Slide` reads a slide, so the one extractor and the one
:class:`~featstore.read.tilesource.TileSource` serve both; :func:`image_table` is the read side.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from featstore.core.errors import first_line
from featstore.cohort import SlideRef
from featstore.errors import FeatstoreError, SlideNotFoundError, SlideReadError
from featstore.read.slide import composite_white, resize_filter
from featstore.store import safe_key, safe_slide_id

log = logging.getLogger(__name__)

#: Files an image folder is searched for (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_SHARD_SIZE = 1024
#: ``slide_info["kind"]`` and the store tiling's ``kind`` of an image cohort.
KIND = "images"
_CSV_COLUMNS = ("path", "label")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA", "P")


# ---------------------------------------------------------------------------- cohort
@dataclass(frozen=True)
class ImageRow:
    """One image of the cohort: its path (relative to the root, or absolute), label, split, group."""

    path: str
    label: str
    split: str = ""
    group: str = ""

    def file(self, root: str | Path) -> Path:
        """The image file (an absolute ``path`` stays as it is)."""
        return Path(root) / self.path

    def key(self) -> tuple[str, str, str]:
        """The sort key of the cohort: split, then label, then path."""
        return (self.split, self.label, self.path)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ImageRow":
        return cls(str(d["path"]), str(d["label"]), str(d.get("split") or ""), str(d.get("group") or ""))


@dataclass(frozen=True)
class ImageShardRef(SlideRef):
    """A shard to extract: a :class:`SlideRef` whose ``path`` is the cohort's root folder."""

    images: tuple[ImageRow, ...] = ()
    shard_size: int = DEFAULT_SHARD_SIZE


def images_tiling(shard_size: int) -> dict:
    """``{"kind": "images", "shard_size": N}``: what ``store.set_tiling`` records for images."""
    return {"kind": KIND, "shard_size": int(shard_size)}


def is_images_tiling(tiling: Mapping | None) -> bool:
    """True when a store's tiling record is that of an image cohort."""
    return bool(tiling) and tiling.get("kind") == KIND


def _is_image(p: Path, below: Path) -> bool:
    rel = p.relative_to(below).parts
    return p.suffix.lower() in IMAGE_SUFFIXES and not any(s.startswith(".") for s in rel) and p.is_file()


def _from_folder(root: Path) -> list[ImageRow]:
    """ImageFolder: ``root/<class>/**/<image>``; hidden and non-image files are ignored."""
    rows: list[ImageRow] = []
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for d in classes:
        found = sorted(p for p in d.rglob("*") if _is_image(p, d))
        if not found:
            log.warning("%s: class folder holds no image (%s); skipped", d, ", ".join(IMAGE_SUFFIXES))
            continue
        rows += [ImageRow(p.relative_to(root).as_posix(), d.name) for p in found]
    if not rows:
        raise FeatstoreError(f"{root}: no class folder holds images (expected {root}/<class>/*.png|jpg|tif|bmp)")
    return rows


def _csv_row(path: Path, line: int, row: Mapping) -> ImageRow:
    vals = {k: (row.get(k) or "").strip() for k in ("path", "label", "split", "group")}
    if not vals["path"] or not vals["label"]:
        raise FeatstoreError(f"{path}:{line}: empty {'path' if not vals['path'] else 'label'}")
    return ImageRow(vals["path"], vals["label"], vals["split"], vals["group"])


def _from_csv(path: Path) -> list[ImageRow]:
    """``path,label[,split][,group]``; paths relative to the CSV's folder unless absolute."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = cols
        if not set(_CSV_COLUMNS) <= set(cols):
            raise FeatstoreError(f"{path}: an image list CSV needs columns path,label[,split][,group] (found {cols})")
        rows, seen = [], {}
        for line, raw in enumerate(reader, start=2):
            r = _csv_row(path, line, raw)
            if r.path in seen:
                raise FeatstoreError(f"{path}:{line}: {r.path} is listed twice (first on line {seen[r.path]})")
            seen[r.path] = line
            rows.append(r)
    if not rows:
        raise FeatstoreError(f"{path}: the image list is empty")
    if not any(r.file(path.parent).is_file() for r in rows):
        raise FeatstoreError(f"{path}: none of its {len(rows)} image files exists (e.g. {rows[0].file(path.parent)}); "
                             "paths are relative to the CSV's folder")
    return rows


def _shard_ids(rows: Sequence[ImageRow], shard_size: int) -> list[tuple[str, list[ImageRow]]]:
    """(shard id, rows) per split, each split cut into runs of *shard_size* rows."""
    by_split: dict[str, list[ImageRow]] = {}
    for r in rows:
        by_split.setdefault(r.split, []).append(r)
    names: dict[str, str] = {}
    out = []
    for split, part in by_split.items():
        name = safe_key(split or "all")
        if name in names:
            raise FeatstoreError(f"splits {names[name]!r} and {split!r} give the same shard name {name!r}; rename one")
        names[name] = split
        for k, start in enumerate(range(0, len(part), shard_size)):
            out.append((safe_slide_id(f"images-{name}-{k:05d}"), part[start:start + shard_size]))
    return out


def discover_images(source: str | Path, shard_size: int = DEFAULT_SHARD_SIZE) -> list[ImageShardRef]:
    """The shards of an image folder or CSV: rows sorted by (split, label, path), then cut.

    Deterministic: the same folder always gives the same shards, so a rerun resumes them.
    """
    if int(shard_size) < 1:
        raise FeatstoreError(f"--shard-size must be >= 1, got {shard_size}")
    p = Path(source).expanduser()
    if p.is_dir():
        root, rows = p.resolve(), _from_folder(p)
    elif p.is_file() and p.suffix.lower() == ".csv":
        root, rows = p.resolve().parent, _from_csv(p)
    elif not p.exists():
        raise SlideNotFoundError(f"{p}: no such image folder or CSV")
    else:
        raise FeatstoreError(f"{p}: --images takes a folder (<class>/<image>) or a CSV with path,label")
    rows = sorted(rows, key=ImageRow.key)
    return [ImageShardRef(sid, root, images=tuple(part), shard_size=int(shard_size))
            for sid, part in _shard_ids(rows, int(shard_size))]


# ---------------------------------------------------------------------------- decoding
def _scale8(a: np.ndarray) -> np.ndarray:
    """Any numeric array -> uint8: 16-bit (and wider integers, clipped to 16 bits) x 255/65535,
    floats in [0, 1] x 255 (else clipped to [0, 255]), booleans to 0/255."""
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "b":
        return a.astype(np.uint8) * 255
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64))
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    maxv = 255 if a.dtype.itemsize == 1 else 65535
    a = np.clip(a.astype(np.int64), 0, maxv)
    return ((a * 255 + maxv // 2) // maxv).astype(np.uint8)


def array_to_rgb(a: np.ndarray) -> Image.Image:
    """A decoded pixel array (H, W), (H, W, C) or planar (C, H, W) -> 8-bit RGB, alpha over white."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4) and a.shape[0] in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (2, 3, 4)):
        raise ValueError(f"unsupported pixel layout {a.shape}")
    a = _scale8(a)
    if a.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a), "L").convert("RGB")
    if a.shape[-1] == 2:   # gray + alpha
        a = np.concatenate([a[..., :1]] * 3 + [a[..., 1:]], axis=-1)
    if a.shape[-1] == 4:
        return Image.fromarray(composite_white(np.ascontiguousarray(a)))
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit/int/float scaled (not clipped), alpha and palette
    transparency composited over white, grayscale/CMYK/YCbCr converted by PIL."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        return array_to_rgb(np.asarray(img))
    if img.mode in _ALPHA or "transparency" in img.info:
        return Image.fromarray(composite_white(np.asarray(img.convert("RGBA"))))
    return img.convert("RGB")


def _pil_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()   # decode fully now: a truncated file fails here, not halfway through a batch
        out = to_rgb(im)
        return out.copy() if out is im else out   # the file closes with the block


def load_rgb(path: str | Path) -> Image.Image:
    """Decode one image file to 8-bit RGB; TIFFs PIL cannot read go through tifffile.

    Raises :class:`SlideReadError` naming the file and the reason (missing, empty, corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise SlideReadError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise SlideReadError(f"{path}: empty file (0 bytes)")
    try:
        img = _pil_rgb(path)
    except Exception as exc:  # noqa: BLE001 -- any decoder error means this image is unreadable
        img = _tiff_fallback(path, exc)
    if img.width == 0 or img.height == 0:
        raise SlideReadError(f"{path}: empty image ({img.width}x{img.height})")
    return img


def _tiff_fallback(path: Path, exc: Exception) -> Image.Image:
    reason = first_line(exc)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            return array_to_rgb(tifffile.imread(path, key=0))
        except Exception as exc2:  # noqa: BLE001
            reason = f"{reason}; tifffile: {first_line(exc2)}"
    raise SlideReadError(f"{path}: unreadable image ({reason})") from None


def fit_image(img: Image.Image, out_size: int, interpolation: str = "bilinear",
              resize_size: int | None = None) -> np.ndarray:
    """(out_size, out_size, 3) uint8: shorter side resized to *resize_size* (else *out_size*),
    centre crop of *out_size*², as torchvision ``Resize(short)`` + ``CenterCrop(out_size)``.

    The new long side is ``int(short * long / short_side)`` and the crop offset
    ``round((side - out_size) / 2)``, torchvision's rounding; the filter is PIL's antialiased
    one of the encoder's *interpolation* (:func:`featstore.read.slide.resize_filter`).
    """
    short = max(int(out_size), int(resize_size or out_size))
    w, h = img.size
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resize_filter(interpolation))
    top, left = int(round((nh - out_size) / 2.0)), int(round((nw - out_size) / 2.0))
    rgb = np.asarray(img)[top:top + out_size, left:left + out_size]
    return np.ascontiguousarray(rgb)


# ---------------------------------------------------------------------------- the shard
def image_failure_id(row: ImageRow) -> str:
    """The failure-log id of one image: ``image_<path>`` made a safe store key."""
    return safe_key(f"image:{row.path}")


class ImageShard:
    """A shard of images read like a :class:`~featstore.read.slide.Slide`: patch ``(i, 0)`` is image ``i``.

    *images* are the rows patches index; *skipped* the shard's rows that could not be decoded
    (they count in the fingerprint, so the shard's identity is the files it was made from).
    """

    reader = KIND
    vendor = KIND

    def __init__(self, root: str | Path, images: Sequence[ImageRow], skipped: Sequence[ImageRow] = ()):
        self.path = Path(root)
        self.images = tuple(images)
        self.skipped = tuple(skipped)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(number of images, 1): the extent of the coords ``(i, 0)``."""
        return (len(self.images), 1)

    def file(self, i: int) -> Path:
        return self.images[i].file(self.path)

    def fingerprint(self) -> dict:
        """Image count, total bytes and sha256 over each (relative path, size): a changed,
        added or removed file changes it (a same-size edit does not; docs/images.md)."""
        h, total = hashlib.sha256(), 0
        for r in sorted(self.images + self.skipped, key=lambda r: r.path):
            f = r.file(self.path)
            size = f.stat().st_size if f.is_file() else -1
            total += max(size, 0)
            h.update(f"{r.path}\0{size}\n".encode())
        return {"n_images": len(self.images) + len(self.skipped), "size": total, "sha256": h.hexdigest()}

    def load(self, i: int) -> Image.Image:
        """Image *i* decoded to 8-bit RGB at full size."""
        return load_rgb(self.file(i))

    def read_patch(self, xy0: tuple[int, int], size0: int, out_size: int,
                   interpolation: str = "bilinear", resize_size: int | None = None) -> np.ndarray:
        """Image ``xy0[0]`` as (out_size, out_size, 3) uint8 (see :func:`fit_image`); *size0* is unused."""
        i = int(xy0[0])
        if not 0 <= i < len(self.images):
            raise SlideReadError(f"{self.path}: no image {i} in this shard of {len(self.images)}")
        return fit_image(self.load(i), out_size, interpolation, resize_size)

    def check(self) -> tuple[list[ImageRow], dict[ImageRow, str]]:
        """Decode every image once: (rows readable, {row: reason} of those that are not)."""
        kept, bad = [], {}
        for i, row in enumerate(self.images):
            try:
                self.load(i)
                kept.append(row)
            except SlideReadError as exc:
                bad[row] = first_line(exc)
        return kept, bad

    def close(self) -> None:
        pass

    def __enter__(self) -> "ImageShard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageShard({str(self.path)!r}, {len(self.images)} images)"


def shard_info(shard: ImageShard, kept: Sequence[ImageRow], bad: Mapping[ImageRow, str], shard_size: int) -> dict:
    """The ``slide_info`` of a tiled shard: root, fingerprint, the images kept (row i = features
    row i) and the ones skipped with their reasons; slide-only fields are neutral (size0 0)."""
    return {
        "kind": KIND, "source": str(shard.path), "root": str(shard.path), "fingerprint": shard.fingerprint(),
        "slide_mpp": None, "size0": 0, "tiling": images_tiling(shard_size),
        "dimensions": [len(kept), 1], "vendor": KIND,
        "images": [r.to_dict() for r in kept],
        "skipped": [{**r.to_dict(), "reason": reason} for r, reason in bad.items()],
    }


def is_image_shard(info: Mapping) -> bool:
    """True when a ``slide_info`` is that of an image shard."""
    return info.get("kind") == KIND


def shard_rows(info: Mapping) -> tuple[list[ImageRow], list[ImageRow]]:
    """(images kept, images skipped) recorded in an image shard's ``slide_info``."""
    return ([ImageRow.from_dict(d) for d in info.get("images", [])],
            [ImageRow.from_dict(d) for d in info.get("skipped", [])])


def stored_shard(info: Mapping, root: str | Path | None = None) -> ImageShard:
    """The :class:`ImageShard` a ``slide_info`` describes (its recorded root unless *root*)."""
    kept, skipped = shard_rows(info)
    return ImageShard(root or info["root"], kept, skipped)


def skipped_failures(info: Mapping) -> dict[str, str]:
    """{failure id: reason} of the images a stored shard skipped (re-reported when it is resumed)."""
    return {image_failure_id(ImageRow.from_dict(d)): str(d.get("reason", "")) for d in info.get("skipped", [])}


def provenance_fields(info: Mapping) -> dict:
    """What a features array of an image shard records in place of the slide tiling and slide."""
    return {
        "tiling": {**info["tiling"], "root": info["root"]},
        "images": {"kind": KIND, "root": info["root"], "source": info["source"],
                   "fingerprint": info["fingerprint"], "n_images": len(info.get("images", []))},
    }


RESIZE_NOTE = "ImageShard.read_patch: 8-bit RGB, shorter side PIL antialiased resize, centre crop"


# ---------------------------------------------------------------------------- reading
@dataclass(frozen=True, eq=False)
class ImageTable:
    """Every image of a store's image shards, row by row (sorted shard ids, then row order)."""

    slide_ids: np.ndarray    # (N,) str: the shard of each row
    rows: np.ndarray         # (N,) int64: row in that shard's features
    paths: np.ndarray        # (N,) str: path as listed (relative to the root, or absolute)
    labels: np.ndarray       # (N,) str
    splits: np.ndarray       # (N,) str, "" when absent
    groups: np.ndarray       # (N,) str, "" when absent
    classes: list[str] = field(default_factory=list)   # sorted unique labels
    y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # (N,) codes into classes

    def __len__(self) -> int:
        return len(self.rows)

    def features(self, store, encoder: str, minus: int, weights: str | None = None) -> np.ndarray:
        """(N, D) float32 embeddings in table order (each shard's ``store.features`` rows)."""
        parts = []
        for sid in dict.fromkeys(self.slide_ids.tolist()):
            sel = self.slide_ids == sid
            parts.append(np.asarray(store.features(sid, encoder, minus, weights))[self.rows[sel]])
        if not parts:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)


def _image_shard_ids(store) -> list[str]:
    return [s for s in store.slide_ids() if is_image_shard(store.slide_info(s))]


def is_image_store(store) -> bool:
    """True when *store* holds an image cohort (its tiling record, or any image shard)."""
    return is_images_tiling(store.tiling) or bool(_image_shard_ids(store))


def image_table(store, slide_ids: Sequence[str] | None = None) -> ImageTable:
    """The images of *store*'s image shards (or of *slide_ids*), aligned row by row with
    their features; :class:`FeatstoreError` when the store holds no image shard."""
    shards = _image_shard_ids(store)
    if slide_ids is not None:
        other = [s for s in slide_ids if s not in shards]
        if other:
            raise FeatstoreError(f"{store.path}: not image shards: {', '.join(other[:5])}")
        shards = sorted(slide_ids)
    if not shards:
        raise FeatstoreError(f"{store.path}: holds no image shards (extract with `featstore extract --images`)")
    cols: dict[str, list] = {k: [] for k in ("slide_ids", "rows", "paths", "labels", "splits", "groups")}
    for sid in shards:
        kept, _ = shard_rows(store.slide_info(sid))
        for i, r in enumerate(kept):
            for k, v in zip(cols, (sid, i, r.path, r.label, r.split, r.group)):
                cols[k].append(v)
    arrays = {k: np.asarray(v, dtype=np.int64 if k == "rows" else str) for k, v in cols.items()}
    classes, y = np.unique(arrays["labels"], return_inverse=True)
    return ImageTable(**arrays, classes=[str(c) for c in classes], y=y.astype(np.int64))


__all__ = [
    "DEFAULT_SHARD_SIZE", "IMAGE_SUFFIXES", "ImageRow", "ImageShard", "ImageShardRef", "ImageTable",
    "array_to_rgb", "discover_images", "fit_image", "image_failure_id", "image_table", "images_tiling",
    "is_image_shard", "is_image_store", "is_images_tiling", "load_rgb", "to_rgb",
]
