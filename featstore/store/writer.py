"""The write side of a store, used only by the extractor and the h5 importer (and test fixtures).

Crash safety: each slide's tiling and each features array carries a completion flag written
last, after every row, so a crash never exposes half-written data to a reader; a rerun deletes
the partial array and redoes it. Rows go in chunk-aligned blocks (no read-modify-write).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import zarr

from featstore.errors import StoreError
from featstore.store._layout import FAILURES, FORMAT_VERSION, SLIDES, FeatureKey, now, rows_per_chunk
from featstore.store.catalog import Markers
from featstore.store.lock import NullLock, SlideLock
from featstore.store.reader import StoreReader


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
    on_complete: Callable[[], None] | None = None  # the store's change marker, after the flag

    def write(self, rows: np.ndarray) -> None:
        """Buffer *rows* (n, D); whole chunks are written as soon as they are full."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.array.shape[1]:
            raise StoreError(f"features of shape {rows.shape} do not fit array {self.array.shape}")
        self._buf.append(rows.astype(np.float16, copy=False))
        self._buffered += len(rows)
        if self._buffered >= self.array.chunks[0]:
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
        if self.on_complete is not None:
            self.on_complete()


class StoreWriter(StoreReader):
    """A store opened for writing: the read API plus tiling, features, failures and slide locks.

    Open it with ``open_store(path, mode="a")`` or :func:`featstore.store.open_store_writer`.
    Every write forgets the cached key listing, so reads through the writer see its own writes.
    """

    mode = "a"

    def set_tiling(self, tiling: dict) -> None:
        """Record the store's tiling config; a different tiling for an existing store is an error."""
        self.refresh()
        meta = self.attrs
        if meta.get("tiling") is not None and meta["tiling"] != tiling:
            raise StoreError(
                f"{self.path} was tiled with {meta['tiling']}; this run asks for {tiling}. "
                "Use the same tiling options or a new store"
            )
        if meta.get("tiling") != tiling:
            meta["tiling"] = tiling
            self._root.attrs["featstore"] = meta

    def write_tiling(self, slide_id: str, coords: np.ndarray, tissue: np.ndarray, info: dict,
                     qc: np.ndarray | None = None, qc_flags: np.ndarray | None = None) -> None:
        """Write a slide's coords and tissue fractions (and per-tile QC measures and flags, if
        measured), then mark its tiling complete."""
        self.refresh()
        coords = np.asarray(coords, dtype=np.int32).reshape(-1, 2)
        tissue = np.asarray(tissue, dtype=np.float32).reshape(-1)
        if len(coords) != len(tissue):
            raise StoreError(f"{slide_id}: {len(coords)} coords but {len(tissue)} tissue values")
        token = self._markers.open(slide_id)
        # opened by path, never through the slides group: its consolidated view is a snapshot
        g = zarr.open_group(store=self._root.store, path=f"{SLIDES}/{slide_id}", mode="w", zarr_format=3)
        n = max(1, len(coords))
        g.create_array("coords", shape=coords.shape, dtype="int32", chunks=(min(n, 1 << 16), 2),
                       compressors=None, fill_value=0)[:] = coords
        g.create_array("tissue", shape=tissue.shape, dtype="float32", chunks=(min(n, 1 << 16),),
                       compressors=None, fill_value=0)[:] = tissue
        if qc is not None:
            g.create_array("qc", shape=(len(coords), 3), dtype="float32", chunks=(min(n, 1 << 16), 3),
                           compressors=None, fill_value=0)[:] = np.asarray(qc, np.float32).reshape(-1, 3)
            g.create_array("qc_flags", shape=(len(coords),), dtype="uint8", chunks=(min(n, 1 << 16),),
                           compressors=None, fill_value=0)[:] = np.asarray(qc_flags, np.uint8).reshape(-1)
        g.attrs.update({**info, "n_tiles": int(len(coords)), "created": now()})
        g.attrs["tiling_complete"] = True
        self._markers.done(slide_id, token)

    def begin_features(self, slide_id: str, key: FeatureKey, dim: int, provenance: dict) -> FeatureWriter:
        """Create (or recreate, if partial) a features array; fill it through the returned writer."""
        self.refresh()
        g = self._slide(slide_id)
        n = int(g["coords"].shape[0])
        token = self._markers.open(slide_id)
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
        return FeatureWriter(arr, n, [], on_complete=lambda: self._markers.done(slide_id, token))

    def write_features(self, slide_id: str, key: FeatureKey, features: np.ndarray, provenance: dict) -> None:
        """Write a whole (N, D) features array at once (importers, tests)."""
        features = np.asarray(features)
        w = self.begin_features(slide_id, key, features.shape[1], provenance)
        w.write(features)
        w.finish()

    def delete_features(self, slide_id: str, key: FeatureKey) -> None:
        """Remove one features array of a slide (an aborted, partial write)."""
        self.refresh()
        try:
            g = self._root[f"{SLIDES}/{slide_id}"]
        except KeyError:
            return
        if "features" in g and key.path in g["features"]:
            token = self._markers.open(slide_id)
            del g["features"][key.path]
            self._markers.done(slide_id, token)

    def record_failure(self, slide_id: str, reason: str, source: str | None = None) -> None:
        """Log a failed slide with its reason (replaces an earlier record)."""
        self.refresh()
        grp = self._root.require_group(FAILURES)
        if slide_id in grp:
            del grp[slide_id]
        grp.create_group(slide_id, attributes={"reason": reason, "source": source or "", "time": now()})

    def clear_failure(self, slide_id: str) -> None:
        """Drop a slide's failure record (after it succeeded)."""
        self.refresh()
        try:
            grp = self._root[FAILURES]
        except KeyError:
            return
        if slide_id in grp:
            del grp[slide_id]

    @property
    def _markers(self) -> Markers:
        return Markers(self._root.store)

    def consolidate(self, wait: float = 600.0) -> tuple[int, int]:
        """Write the consolidated listing of ``slides`` (what makes opening a big store fast).

        ``featstore extract`` and ``import-h5`` call it when they finish; it is always safe (change
        markers keep a snapshot honest) and may be run again at any time. On a local store one
        consolidation runs at a time (others wait up to *wait* s). Returns (slides, markers removed)."""
        from featstore.store.catalog import consolidate

        lock = self.lock("_consolidate", stale_after=max(wait, 120.0))
        deadline = time.monotonic() + wait
        while not lock.acquire():
            if time.monotonic() > deadline:
                raise StoreError(f"{self.path}: another process has been consolidating for over {wait:.0f} s; "
                                 "rerun `featstore consolidate` later")
            time.sleep(0.2)
        try:
            meta = self.attrs
            if int(meta.get("format", 1)) < FORMAT_VERSION:  # older featstores must not write without markers
                self._root.attrs["featstore"] = {**meta, "format": FORMAT_VERSION}
            out = consolidate(self._root)
        finally:
            lock.release()
        self.refresh()
        return out

    def lock(self, slide_id: str, stale_after: float = 120.0) -> SlideLock | NullLock:
        """A claim on one slide: a :class:`SlideLock` on local stores; a no-op lock elsewhere."""
        local = self.local_path
        if local is None:
            return NullLock()
        return SlideLock(local / ".locks" / f"{slide_id}.lock", stale_after=stale_after)


StoreReader.writer_methods = frozenset(name for name, value in vars(StoreWriter).items()
                                       if not name.startswith("_") and callable(value))
