"""Turn the SLIDES arguments (files, directories, globs, a CSV) into a checked list of slides."""

from __future__ import annotations

import csv
import glob
import logging
from dataclasses import dataclass
from pathlib import Path

from featstore.errors import FeatstoreError, SlideNotFoundError
from featstore.store import safe_slide_id

#: File endings OpenSlide opens (a directory is searched for these).
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi", ".dcm",
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideRef:
    """A slide to process: its safe id (the store key) and its file.

    An image shard is the subclass :class:`featstore.read.images.ImageShardRef` (``path`` is the
    image root, ``images`` its rows); the extractor reads either through one loop.
    """

    slide_id: str
    path: Path
    mpp: float | None = None   # this slide's microns per pixel, over its file's (a slide list's mpp column)


def slide_stem(path: Path) -> str:
    """A slide file's id stem: its name without the extension, and without ``.ome`` for an OME-TIFF."""
    from featstore.read.ome import is_ome_tiff

    return path.name[: path.name.lower().rindex(".ome.")] if is_ome_tiff(path) else path.stem


def _row_mpp(path: Path, line: int, text: str) -> float | None:
    """A slide list's optional ``mpp`` cell: empty for the file's own, else a plausible µm/px."""
    from featstore.read.slide import MPP_RANGE, plausible_mpp

    text = (text or "").strip()
    if not text:
        return None
    try:
        mpp = float(text)
    except ValueError:
        mpp = float("nan")
    if not plausible_mpp(mpp):
        raise FeatstoreError(f"{path}:{line}: mpp {text!r} is not a plausible microns per pixel "
                             f"({MPP_RANGE[0]}-{MPP_RANGE[1]}); leave it empty to use the file's own")
    return mpp


def _from_csv(path: Path) -> list[SlideRef]:
    """``slide_id,path[,mpp]``: an ``mpp`` column gives a slide its microns per pixel (a scanner
    that wrote none, or a wrong one); an empty cell keeps the file's."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if not {"slide_id", "path"} <= cols:
            raise FeatstoreError(f"{path}: a slide list CSV needs columns slide_id,path (found {sorted(cols)})")
        refs = []
        for i, row in enumerate(reader, start=2):
            if not (row.get("slide_id") or "").strip() or not (row.get("path") or "").strip():
                raise FeatstoreError(f"{path}:{i}: empty slide_id or path")
            p = Path(row["path"].strip()).expanduser()
            if not p.is_absolute():
                p = path.parent / p
            refs.append(SlideRef(safe_slide_id(row["slide_id"].strip()), p, _row_mpp(path, i, row.get("mpp"))))
    return refs


def _from_dir(path: Path) -> list[SlideRef]:
    """Every slide file under *path*; a folder of DICOM files is one slide (a DICOM WSI series
    stores each level, label and overview in a file of its own), named after the folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    refs, dicom_dirs = [], set()
    for p in files:
        if p.suffix.lower() == ".dcm":
            if p.parent not in dicom_dirs:
                dicom_dirs.add(p.parent)
                refs.append(_dicom_ref(p))
            continue
        refs.append(SlideRef(safe_slide_id(slide_stem(p)), p))
    return refs


def _dicom_ref(path: Path) -> SlideRef:
    """A DICOM WSI series through any of its files (OpenSlide 4 finds the rest in the same folder):
    named after the folder, since the files are named by their instance UIDs."""
    return SlideRef(safe_slide_id(path.parent.name), path)


def discover_slides(inputs: list[str | Path]) -> list[SlideRef]:
    """Expand files, directories, globs and ``slide_id,path`` CSVs into slides.

    Ids come from file stems (or the CSV) made safe for Zarr keys. Two slides with the same
    id are an error before any work starts. A named file that does not exist is an error;
    a directory or glob that matches nothing is an error too (a typo should not run nothing).
    """
    refs: list[SlideRef] = []
    for item in inputs:
        s = str(item)
        p = Path(s).expanduser()
        if p.is_dir():
            found = _from_dir(p)
            if not found:
                raise FeatstoreError(f"{p}: directory holds no slide files ({', '.join(SLIDE_SUFFIXES)})")
            refs.extend(found)
        elif p.suffix.lower() == ".csv" and p.is_file():
            refs.extend(_from_csv(p))
        elif p.exists():
            refs.append(_dicom_ref(p) if p.suffix.lower() == ".dcm" else SlideRef(safe_slide_id(slide_stem(p)), p))
        elif any(ch in s for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(s, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise FeatstoreError(f"{s}: pattern matches no file")
            refs.extend(SlideRef(safe_slide_id(slide_stem(m)), m) for m in matches)
        else:
            raise SlideNotFoundError(f"{p}: no such file or directory")
    seen: dict[str, Path] = {}
    for r in refs:
        if r.slide_id in seen and seen[r.slide_id].resolve() != r.path.resolve():
            raise FeatstoreError(
                f"slide id {r.slide_id!r} is used by both {seen[r.slide_id]} and {r.path}; "
                "rename one or list slides in a CSV with distinct slide_id values"
            )
        seen[r.slide_id] = r.path
    unique = list({r.slide_id: r for r in refs}.values())
    _warn_same_files(unique)
    return unique


def _warn_same_files(refs: list[SlideRef]) -> None:
    """Say which slides are one file under two ids (a symlink, a hard link): each is extracted
    under its own id, which doubles the work and the slide in every cohort table."""
    import os

    by_file: dict[tuple[int, int] | str, list[SlideRef]] = {}
    for r in refs:
        try:
            st = os.stat(r.path)
            key: tuple[int, int] | str = (st.st_dev, st.st_ino)
        except OSError:
            key = str(r.path)
        by_file.setdefault(key, []).append(r)
    for same in by_file.values():
        if len(same) > 1:
            log.warning("slides %s are one file (%s): each is extracted under its own id; remove the extra "
                        "link or list the slides in a CSV if that is not intended",
                        ", ".join(r.slide_id for r in same), os.path.realpath(same[0].path))
