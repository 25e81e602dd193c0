"""Interop with CLAM/TRIDENT-style per-slide .h5 feature files.

Those tools write one ``<slide>.h5`` per slide with ``features`` (N, D) or (1, N, D) and
``coords`` (N, 2) level-0 (x, y), and attributes on ``coords`` such as ``patch_size`` and
``patch_level`` (CLAM) or ``patch_size_level0`` (TRIDENT). Import makes them first-class store
features; export writes the same layout so the store's features feed those tools.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from featstore.errors import FeatstoreError
from featstore.store import FeatureKey, StoreReader, StoreWriter, safe_slide_id

log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def read_h5(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """features (N, D), coords (N, 2) int32 and the coords' attributes of one .h5 file."""
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise FeatstoreError(f"{path}: needs datasets 'features' and 'coords' (has {sorted(f.keys())})")
            feats = np.asarray(f["features"][()])
            coords = np.asarray(f["coords"][()])
            attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
            attrs.update({f"file.{k}": _plain(v) for k, v in f.attrs.items()})
    except OSError as exc:
        raise FeatstoreError(f"{path}: not a readable HDF5 file ({exc})") from None
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or len(feats) != len(coords):
        raise FeatstoreError(f"{path}: features {feats.shape} and coords {coords.shape} do not form (N, D) + (N, 2)")
    if feats.dtype.kind == "f":
        bad = ~np.isfinite(feats)
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            raise FeatstoreError(f"{path}: features of slide {path.stem!r} hold {int(bad.sum())} NaN/inf value(s) "
                                 f"in {len(rows)} row(s) (first row {int(rows[0])}); not imported")
    return feats, coords.astype(np.int32), attrs


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return v


def _size0(attrs: dict, default: int | None) -> int | None:
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    if "patch_size" in attrs and int(attrs.get("patch_level", 0)) == 0:
        return int(attrs["patch_size"])
    return default


def import_h5(files: list[Path], store: StoreWriter, encoder: str, minus: int, weights: str = "imported",
              size0: int | None = None, slide_mpp: float | None = None,
              progress: Callable[[int], None] | None = None) -> ImportReport:
    """Import .h5 feature files as (encoder, weights, minus) features of a store.

    A slide already tiled in the store must have identical coords (the rows must mean the same
    tiles); otherwise its tiling is written from the file.
    """
    from featstore import __version__

    report = ImportReport()
    key = FeatureKey(encoder, weights, int(minus))
    for path in files:
        sid = safe_slide_id(path.stem)
        try:
            if store.has_features(sid, encoder, minus, weights):
                report.skipped.append(sid)
                continue
            feats, coords, attrs = read_h5(path)
            if store.has_tiling(sid):
                if not np.array_equal(store.coords(sid), coords):
                    raise FeatstoreError(f"{path}: coords differ from slide {sid!r} already in the store")
            else:
                info = {"source": str(path), "fingerprint": None, "slide_mpp": slide_mpp,
                        "size0": _size0(attrs, size0), "tiling": {"imported_from": "h5", **{
                            k: attrs[k] for k in ("patch_size", "patch_level", "patch_size_level0") if k in attrs}}}
                store.write_tiling(sid, coords, np.full(len(coords), np.nan, np.float32), info)
            prov = {"encoder": encoder, "weights": weights, "weights_sha256": None, "minus": int(minus),
                    "dim": int(feats.shape[1]), "imported_from": str(path), "h5_attrs": attrs,
                    "featstore_version": __version__}
            if "file.featstore_provenance" in attrs:
                prov["original"] = json.loads(attrs["file.featstore_provenance"])
            store.write_features(sid, key, feats, prov)
            store.clear_failure(sid)
            report.imported.append(sid)
        except FeatstoreError as exc:
            report.failed[sid] = str(exc)
            store.record_failure(sid, str(exc), str(path))
        finally:
            if progress is not None:
                progress(1)
    return report


def export_h5(store: StoreReader, out_dir: Path, encoder: str, minus: int, weights: str | None = None,
              slide_ids: list[str] | None = None, progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write ``<out_dir>/<slide_id>.h5`` (CLAM/TRIDENT layout) for every slide with the features."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = store.resolve_key(encoder, minus, weights)
    written = []
    for sid in slide_ids or store.slide_ids():
        if not store.has_features(sid, key.encoder, key.minus, key.weights):
            continue
        feats = store.features(sid, key.encoder, key.minus, key.weights).astype(np.float32)
        info = store.slide_info(sid)
        path = out_dir / f"{sid}.h5"
        tmp = path.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=feats)
            c = f.create_dataset("coords", data=store.coords(sid))
            size0 = info.get("size0")
            if size0 is not None:
                c.attrs["patch_size"] = int(size0)
                c.attrs["patch_size_level0"] = int(size0)
                c.attrs["patch_level"] = 0
            f.attrs["featstore_provenance"] = json.dumps(store.provenance(sid, key.encoder, key.minus, key.weights))
        tmp.replace(path)
        written.append(path)
        if progress is not None:
            progress(1)
    return written
