"""The feature store: one Zarr v3 group per cohort, written slide by slide, read by everyone.

Layout (documented in docs/store-format.md)::

    cohort.zarr/                         attrs: featstore (format, version, tiling config)
      slides/<slide_id>/                 attrs: source, fingerprint, slide_mpp, size0, n_tiles, tiling_complete
        coords      (N, 2) int32         level-0 (x, y) of each patch's top-left corner
        tissue      (N,)   float32       tissue fraction per patch
        features/<key>  (N, D) float16   attrs: encoder, weights, minus, dim, provenance, complete
      failures/<slide_id>/               attrs: reason, source, time

Readers honour the ``complete`` flags: a slide whose tiling is not complete, or a features array
whose ``complete`` attribute is not true, does not exist for the read API. The flag is written
last, after every row, so a crash never exposes half-written data; a rerun deletes and redoes it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import zarr

from featstore.errors import StoreError, StoreKeyError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20  # ~1 MiB feature chunks
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class FeatureKey(NamedTuple):
    """One set of embeddings: encoder architecture, weights tag, truncation level."""

    encoder: str
    weights: str
    minus: int

    @property
    def path(self) -> str:
        """The array name under ``features/`` (safe for any Zarr store)."""
        return f"{safe_key(self.encoder)}__{safe_key(self.weights)}__minus{self.minus}"

    def __str__(self) -> str:
        return f"{self.encoder}:{self.weights}:minus{self.minus}"


def safe_key(text: str) -> str:
    """Map arbitrary text to a string usable as a Zarr key on every store backend."""
    out = _SAFE.sub("_", str(text)).strip("._")
    if not out:
        raise StoreError(f"{text!r} leaves nothing usable as a store key; rename it")
    return out


def safe_slide_id(name: str) -> str:
    """A slide id from a file name or CSV cell: no separators, no '..', only [A-Za-z0-9._-]."""
    return safe_key(str(name).replace("..", "_"))


def rows_per_chunk(dim: int, itemsize: int = 2) -> int:
    """Rows of a (N, dim) array that make a ~1 MiB chunk."""
    return max(1, CHUNK_BYTES // max(1, dim * itemsize))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class FeatureWriter:
    """Appends rows to one features array in chunk-aligned blocks; ``finish`` marks it complete.

    Rows are buffered until a whole chunk is ready so every write replaces whole chunks (no
    read-modify-write), which keeps memory flat and concurrent writers on disjoint slides safe.
    """

    array: Any
    n_rows: int
    _buf: list[np.ndarray]
    _buffered: int = 0
    _written: int = 0

    def write(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.array.shape[1]:
            raise StoreError(f"features of shape {rows.shape} do not fit array {self.array.shape}")
        self._buf.append(rows.astype(np.float16, copy=False))
        self._buffered += len(rows)
        chunk = self.array.chunks[0]
        if self._buffered >= chunk:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._buf:
            return
        data = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        chunk = self.array.chunks[0]
        take = len(data) if final else (len(data) // chunk) * chunk
        if self._written + take > self.n_rows:
            raise StoreError(f"{self.array.path}: more rows written than the slide's {self.n_rows} tiles")
        if take:
            self.array[self._written:self._written + take] = data[:take]
            self._written += take
        rest = data[take:]
        self._buf = [rest] if len(rest) else []
        self._buffered = len(rest)

    def finish(self) -> None:
        """Write the remaining rows, then the ``complete`` flag (last, so readers never see less)."""
        self._flush(final=True)
        if self._written != self.n_rows:
            raise StoreError(
                f"{self.array.path}: {self._written} rows written, expected {self.n_rows}; not marked complete"
            )
        self.array.attrs["complete"] = True


class SlideLock:
    """An exclusive claim on one slide of a local store (a lock file with a heartbeat).

    The file is created with O_EXCL, so of two processes exactly one wins. The owner touches it
    every ``heartbeat`` seconds; a lock whose file is older than ``stale_after`` (its owner died)
    is taken over. Remote stores rely on disjoint work lists instead (see docs/scale-out.md).
    """

    def __init__(self, path: Path, stale_after: float = 120.0, heartbeat: float = 15.0):
        self.path = path
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._is_stale():
                    return False
                log.warning("taking over stale lock %s", self.path)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{socket.gethostname()} {os.getpid()} {_now()}\n")
            self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lock-{self.path.stem}")
            self._thread.start()
            return True
        return False

    def _is_stale(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
            owner = self.path.read_text().split()
        except (FileNotFoundError, OSError):
            return True
        if len(owner) >= 2 and owner[0] == socket.gethostname():
            try:
                os.kill(int(owner[1]), 0)
            except ProcessLookupError:
                return True  # owner process on this host is gone
            except (PermissionError, ValueError):
                pass
        return age > self.stale_after

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "SlideLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _NullLock:
    """Lock stand-in for stores without a local filesystem (work is partitioned instead)."""

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class Store:
    """A featstore cohort store. Use :func:`open_store`; read methods honour completion flags."""

    def __init__(self, root: zarr.Group, path: str, mode: str):
        self._root = root
        self.path = str(path)
        self.mode = mode
        self._keys_cache: list[FeatureKey] | None = None  # for resolve_key; cleared by every write

    # ------------------------------------------------------------------ helpers
    def __repr__(self) -> str:
        return f"Store({self.path!r}, slides={len(self.slide_ids())})"

    @property
    def local_path(self) -> Path | None:
        """The store's directory when it lives on the local filesystem, else None."""
        p = self.path
        if p.startswith("file://"):
            p = p[len("file://"):]
        if "://" in p:
            return None
        return Path(p)

    def _slides(self) -> zarr.Group | None:
        try:
            return self._root["slides"]
        except KeyError:
            return None

    def _slide(self, slide_id: str) -> zarr.Group:
        grp = self._slides()
        try:
            g = grp[slide_id] if grp is not None else None
        except KeyError:
            g = None
        if g is None or not g.attrs.get("tiling_complete", False):
            raise StoreKeyError(f"{self.path}: no slide {slide_id!r} (known: {_preview(self.slide_ids())})")
        return g

    def _writable(self) -> None:
        self._keys_cache = None
        if self.mode == "r":
            raise StoreError(f"{self.path} is open read-only; open_store(path, mode='a') to write")

    # ------------------------------------------------------------------ read API
    @property
    def attrs(self) -> dict:
        """Store-level attributes (format, tiling config)."""
        return dict(self._root.attrs.get("featstore", {}))

    @property
    def tiling(self) -> dict | None:
        """The tiling config shared by every slide of the store (None before the first slide)."""
        return self.attrs.get("tiling")

    def slide_ids(self) -> list[str]:
        """Slides whose tiling is complete, sorted."""
        grp = self._slides()
        if grp is None:
            return []
        return sorted(name for name, g in grp.groups() if g.attrs.get("tiling_complete", False))

    def _feature_arrays(self, slide: zarr.Group) -> Iterator[tuple[FeatureKey, Any]]:
        try:
            feats = slide["features"]
        except KeyError:
            return
        for _, arr in feats.arrays():
            a = arr.attrs
            if a.get("complete", False):
                yield FeatureKey(a["encoder"], a["weights"], int(a["minus"])), arr

    def encoders(self) -> list[FeatureKey]:
        """Every (encoder, weights, minus) with complete features for at least one slide."""
        found: set[FeatureKey] = set()
        grp = self._slides()
        if grp is None:
            return []
        for _, g in grp.groups():
            if g.attrs.get("tiling_complete", False):
                found.update(k for k, _ in self._feature_arrays(g))
        return sorted(found)

    def resolve_key(self, encoder: str, minus: int, weights: str | None = None) -> FeatureKey:
        """Fill in ``weights`` when exactly one weights tag is stored for (encoder, minus)."""
        def tags_now() -> list[str]:
            return sorted({k.weights for k in self._keys_cache or [] if k.encoder == encoder and k.minus == int(minus)})

        if self._keys_cache is None:
            self._keys_cache = self.encoders()
        tags = tags_now()
        if not tags or (weights is not None and weights not in tags):
            self._keys_cache = self.encoders()  # the cached listing may predate another writer
            tags = tags_now()
        if weights is not None:
            # "random" finds "random-s0" (seeded random weights are tagged with their seed)
            if weights not in tags:
                seeded = [t for t in tags if t.startswith(f"{weights}-s")]
                if len(seeded) == 1:
                    return FeatureKey(encoder, seeded[0], int(minus))
            return FeatureKey(encoder, weights, int(minus))
        if len(tags) == 1:
            return FeatureKey(encoder, tags[0], int(minus))
        if not tags:
            have = ", ".join(str(k) for k in self.encoders()) or "none"
            raise StoreKeyError(f"{self.path}: no features for {encoder} minus{minus} (stored: {have})")
        raise StoreError(
            f"{self.path}: {encoder} minus{minus} is stored with several weights ({', '.join(tags)}); pass weights="
        )

    def _features_array(self, slide_id: str, key: FeatureKey):
        # one metadata read: a complete features array implies a complete tiling (it is only
        # ever created after the slide's tiling flag), so the slide group need not be opened
        try:
            arr = self._root[f"slides/{slide_id}/features/{key.path}"]
        except KeyError:
            arr = None
        if arr is None or not arr.attrs.get("complete", False):
            self._slide(slide_id)  # an unknown slide gets its own message
            raise StoreKeyError(f"{self.path}: slide {slide_id!r} has no complete features for {key}")
        return arr

    def has_features(self, slide_id: str, encoder: str, minus: int, weights: str | None = None) -> bool:
        """True when the slide has complete features for the key."""
        if weights is not None:  # answer from this slide alone: no store-wide listing
            try:
                g = self._slide(slide_id)
            except StoreKeyError:
                return False
            return any(k.encoder == encoder and k.minus == int(minus)
                       and (k.weights == weights or k.weights.startswith(f"{weights}-s"))
                       for k, _ in self._feature_arrays(g))
        try:
            key = self.resolve_key(encoder, minus, weights)
            self._features_array(slide_id, key)
        except StoreError:
            return False
        return True

    def refresh(self) -> None:
        """Forget cached listings (call after another process wrote to the store)."""
        self._keys_cache = None

    def features(self, slide_id: str, encoder: str, minus: int, weights: str | None = None) -> np.ndarray:
        """(N, D) float16 embeddings of one slide, rows aligned with :meth:`coords`."""
        return self._features_array(slide_id, self.resolve_key(encoder, minus, weights))[:]

    def coords(self, slide_id: str) -> np.ndarray:
        """(N, 2) int32 level-0 (x, y) top-left corners of the slide's patches."""
        return self._slide(slide_id)["coords"][:]

    def tissue(self, slide_id: str) -> np.ndarray:
        """(N,) float32 tissue fraction per patch."""
        return self._slide(slide_id)["tissue"][:]

    def slide_info(self, slide_id: str) -> dict:
        """Source path, file fingerprint, slide mpp, tiling config, patch size in level-0 px."""
        return dict(self._slide(slide_id).attrs)

    def provenance(self, slide_id: str, encoder: str, minus: int, weights: str | None = None) -> dict:
        """Provenance of one features array (encoder, weights sha256, level, preprocessing, ...)."""
        arr = self._features_array(slide_id, self.resolve_key(encoder, minus, weights))
        return dict(arr.attrs.get("provenance", {}))

    def n_tiles(self, slide_id: str) -> int:
        return int(self._slide(slide_id)["coords"].shape[0])

    def as_dask(self, encoder: str, minus: int, weights: str | None = None, slide_ids: list[str] | None = None):
        """A dask array of every slide's rows for one key, and slide -> (start, stop) offsets."""
        import dask.array as da

        key = self.resolve_key(encoder, minus, weights)
        parts, offsets, start = [], {}, 0
        for sid in slide_ids or self.slide_ids():
            try:
                arr = self._features_array(sid, key)
            except StoreKeyError:
                if slide_ids is not None:
                    raise
                continue
            parts.append(da.from_zarr(arr))
            offsets[sid] = (start, start + arr.shape[0])
            start += arr.shape[0]
        if not parts:
            raise StoreKeyError(f"{self.path}: no slide has complete features for {key}")
        return da.concatenate(parts, axis=0), offsets

    def failures(self) -> dict[str, str]:
        """slide_id -> reason for every slide whose last attempt failed."""
        try:
            grp = self._root["failures"]
        except KeyError:
            return {}
        return {name: g.attrs.get("reason", "") for name, g in grp.groups()}

    # ------------------------------------------------------------------ write API (extractor, importers)
    def set_tiling(self, tiling: dict) -> None:
        """Record the store's tiling config; a different tiling for an existing store is an error."""
        self._writable()
        meta = self.attrs
        if meta.get("tiling") is not None and meta["tiling"] != tiling:
            raise StoreError(
                f"{self.path} was tiled with {meta['tiling']}; this run asks for {tiling}. "
                "Use the same tiling options or a new store"
            )
        if meta.get("tiling") != tiling:
            meta["tiling"] = tiling
            self._root.attrs["featstore"] = meta

    def has_tiling(self, slide_id: str) -> bool:
        try:
            self._slide(slide_id)
        except StoreKeyError:
            return False
        return True

    def write_tiling(self, slide_id: str, coords: np.ndarray, tissue: np.ndarray, info: dict) -> None:
        """Write a slide's coords and tissue fractions, then mark its tiling complete."""
        self._writable()
        coords = np.asarray(coords, dtype=np.int32).reshape(-1, 2)
        tissue = np.asarray(tissue, dtype=np.float32).reshape(-1)
        if len(coords) != len(tissue):
            raise StoreError(f"{slide_id}: {len(coords)} coords but {len(tissue)} tissue values")
        slides = self._root.require_group("slides")
        if slide_id in slides:
            del slides[slide_id]
        g = slides.create_group(slide_id)
        n = max(1, len(coords))
        g.create_array("coords", shape=coords.shape, dtype="int32", chunks=(min(n, 1 << 16), 2),
                       compressors=None, fill_value=0)[:] = coords
        g.create_array("tissue", shape=tissue.shape, dtype="float32", chunks=(min(n, 1 << 16),),
                       compressors=None, fill_value=0)[:] = tissue
        g.attrs.update({**info, "n_tiles": int(len(coords)), "created": _now()})
        g.attrs["tiling_complete"] = True

    def begin_features(self, slide_id: str, key: FeatureKey, dim: int, provenance: dict) -> FeatureWriter:
        """Create (or recreate, if partial) a features array; fill it through the returned writer."""
        self._writable()
        g = self._slide(slide_id)
        n = int(g["coords"].shape[0])
        feats = g.require_group("features")
        if key.path in feats:
            del feats[key.path]
        arr = feats.create_array(
            key.path, shape=(n, int(dim)), dtype="float16",
            chunks=(min(max(n, 1), rows_per_chunk(dim)), int(dim)), compressors=None, fill_value=0,
        )
        arr.attrs.update({
            "encoder": key.encoder, "weights": key.weights, "minus": int(key.minus), "dim": int(dim),
            "provenance": provenance, "complete": False,
        })
        return FeatureWriter(arr, n, [])

    def write_features(self, slide_id: str, key: FeatureKey, features: np.ndarray, provenance: dict) -> None:
        """Write a whole (N, D) features array at once (importers, tests)."""
        features = np.asarray(features)
        w = self.begin_features(slide_id, key, features.shape[1], provenance)
        w.write(features)
        w.finish()

    def delete_features(self, slide_id: str, key: FeatureKey) -> None:
        self._writable()
        g = self._slides()[slide_id]
        if "features" in g and key.path in g["features"]:
            del g["features"][key.path]

    def record_failure(self, slide_id: str, reason: str, source: str | None = None) -> None:
        """Log a failed slide with its reason (replaces an earlier record)."""
        self._writable()
        grp = self._root.require_group("failures")
        if slide_id in grp:
            del grp[slide_id]
        grp.create_group(slide_id, attributes={"reason": reason, "source": source or "", "time": _now()})

    def clear_failure(self, slide_id: str) -> None:
        self._writable()
        try:
            grp = self._root["failures"]
        except KeyError:
            return
        if slide_id in grp:
            del grp[slide_id]

    def lock(self, slide_id: str, stale_after: float = 120.0):
        """A claim on one slide: a :class:`SlideLock` on local stores; a no-op lock elsewhere."""
        local = self.local_path
        if local is None:
            return _NullLock()
        return SlideLock(local / ".locks" / f"{slide_id}.lock", stale_after=stale_after)


def _preview(items: list[str], n: int = 5) -> str:
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items)} in all)" if len(items) > n else "") if items else "none"


def open_store(path: str | os.PathLike, mode: str = "r", storage_options: dict | None = None) -> Store:
    """Open a feature store.

    mode "r": read only, the store must exist; "a": read/write, created if missing.
    ``path`` may be a local directory or any fsspec URL (``s3://bucket/cohort.zarr``) with
    ``storage_options`` passed to fsspec.
    """
    from featstore import __version__

    if mode not in ("r", "a"):
        raise StoreError(f"mode must be 'r' or 'a', not {mode!r}")
    spath = str(path)
    is_local = "://" not in spath or spath.startswith("file://")
    if mode == "r" and is_local and not Path(spath.removeprefix("file://")).exists():
        raise StoreError(f"{spath}: no such store (run `featstore extract ... --store {spath}` first)")
    kwargs = {}
    if not is_local:  # listing caches would hide slides other processes wrote
        kwargs = {"storage_options": {"use_listings_cache": False, **(storage_options or {})}}
    try:
        root = zarr.open_group(store=spath, mode=mode, zarr_format=3, **kwargs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(f"{spath}: not a featstore store ({exc})") from None
    except (ValueError, zarr.errors.NodeTypeValidationError) as exc:
        raise StoreError(f"{spath}: cannot open as a Zarr v3 group ({exc})") from None
    meta = root.attrs.get("featstore")
    if meta is None:
        if mode == "r":
            raise StoreError(f"{spath}: a Zarr group but not a featstore store (no 'featstore' attribute)")
        root.attrs["featstore"] = {"format": FORMAT_VERSION, "version": __version__, "created": _now(), "tiling": None}
    elif int(meta.get("format", 0)) > FORMAT_VERSION:
        raise StoreError(f"{spath}: store format {meta.get('format')} is newer than this featstore; upgrade it")
    if mode == "a":  # created up front so concurrent writers never race to create them
        for name in ("slides", "failures"):
            root.require_group(name)
    return Store(root, spath, mode)
