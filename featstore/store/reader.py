"""The read API of a store: what mil, analysis and the study use. It honours completion flags.

A slide whose tiling is not complete, or a features array whose ``complete`` attribute is not
true, does not exist here. A reader has no writer methods; calling one (``record_failure``,
``begin_features``, ...) raises :class:`StoreReadOnlyError` naming how to open for writing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from featstore.errors import StoreError, StoreKeyError, StoreReadOnlyError
from featstore.store._layout import FAILURES, SLIDES, FeatureKey, features_path, preview
from featstore.store.catalog import Catalog, SlideEntry


def _weights_match(stored: str, requested: str) -> bool:
    """A stored weights tag answers a requested one: equal, or "random" for "random-s0"."""
    from featstore.tags import WeightsTag

    return stored == requested or WeightsTag.parse(stored).matches(requested)


class StoreReader:
    """A featstore cohort store opened for reading. Use :func:`featstore.store.open_store`."""

    mode = "r"
    #: the writer's own methods: calling one on a reader says "read-only" (featstore.store.writer
    #: fills it when it defines StoreWriter, so the reader never imports the writer)
    writer_methods: frozenset[str] = frozenset()

    def __init__(self, root: zarr.Group, path: str):
        self._root = root
        self.path = str(path)
        self._keys_cache: list[FeatureKey] | None = None  # for resolve_key; cleared by refresh()
        self._catalog: Catalog | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, slides={len(self.slide_ids())})"

    def __getattr__(self, name: str) -> Any:
        if name in type(self).writer_methods:
            raise StoreReadOnlyError(f"{self.path} is open read-only; open_store(path, mode='a') to write")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def local_path(self) -> Path | None:
        """The store's directory when it lives on the local filesystem, else None."""
        p = self.path.removeprefix("file://")
        return None if "://" in p else Path(p)

    # ------------------------------------------------------------------ groups
    def _entries(self) -> dict[str, SlideEntry]:
        """The store-wide listing (consolidated snapshot + change markers, see catalog.py)."""
        if self._catalog is None:
            self._catalog = Catalog(self._root)
        return self._catalog.entries()

    def _slide(self, slide_id: str) -> zarr.Group:
        # a slide's own metadata, never a snapshot's: one read, always current
        try:
            g = self._root[f"{SLIDES}/{slide_id}"]
        except KeyError:
            g = None
        if g is None or not g.attrs.get("tiling_complete", False):
            raise StoreKeyError(f"{self.path}: no slide {slide_id!r} (known: {preview(self.slide_ids())})")
        return g

    def _feature_arrays(self, slide: zarr.Group) -> Iterator[tuple[FeatureKey, Any]]:
        try:
            feats = slide["features"]
        except KeyError:
            return
        for _, arr in feats.arrays():
            a = arr.attrs
            if a.get("complete", False):
                yield FeatureKey(a["encoder"], a["weights"], int(a["minus"])), arr

    def _features_array(self, slide_id: str, key: FeatureKey):
        # one metadata read: a complete features array implies a complete tiling (it is only
        # ever created after the slide's tiling flag), so the slide group need not be opened
        try:
            arr = self._root[features_path(slide_id, key)]
        except KeyError:
            arr = None
        if arr is None or not arr.attrs.get("complete", False):
            self._slide(slide_id)  # an unknown slide gets its own message
            raise StoreKeyError(f"{self.path}: slide {slide_id!r} has no complete features for {key}")
        return arr

    # ------------------------------------------------------------------ store level
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
        return sorted(sid for sid, e in self._entries().items() if e.complete)

    def encoders(self) -> list[FeatureKey]:
        """Every (encoder, weights, minus) with complete features for at least one slide."""
        found: set[FeatureKey] = set()
        for e in self._entries().values():
            if e.complete:
                found.update(e.arrays)
        return sorted(found)

    def coverage(self) -> dict[str, tuple[int | None, list[FeatureKey]]]:
        """slide_id -> (tiles, complete feature keys) for every slide, from one listing.

        What `featstore ls` shows; on a consolidated store it costs one read however many slides."""
        return {sid: (e.n_tiles, sorted(e.arrays)) for sid, e in sorted(self._entries().items()) if e.complete}

    @property
    def consolidated(self) -> bool:
        """True when the store's listing comes from a consolidated snapshot (``featstore consolidate``)."""
        self._entries()
        return bool(self._catalog.consolidated)

    def failures(self) -> dict[str, str]:
        """slide_id -> reason for every slide whose last attempt failed."""
        try:
            grp = self._root[FAILURES]
        except KeyError:
            return {}
        return {name: g.attrs.get("reason", "") for name, g in grp.groups()}

    def refresh(self) -> None:
        """Forget cached listings (call after another process wrote to the store)."""
        self._keys_cache = None

    # ------------------------------------------------------------------ keys
    def _stored_tags(self, encoder: str, minus: int) -> list[str]:
        return sorted({k.weights for k in self._keys_cache or [] if k.encoder == encoder and k.minus == int(minus)})

    def resolve_key(self, encoder: str, minus: int, weights: str | None = None) -> FeatureKey:
        """Fill in ``weights`` when exactly one weights tag is stored for (encoder, minus).

        A requested tag that names a family ("random") finds its one stored member ("random-s0");
        a weights file (a fine-tuned ``encoder.pt``, a pretrain checkpoint) finds its own tag.
        """
        if weights is not None:
            from featstore.tags import requested_tag

            weights = requested_tag(weights)
        if self._keys_cache is None:
            self._keys_cache = self.encoders()
        tags = self._stored_tags(encoder, minus)
        if not tags or (weights is not None and weights not in tags):
            self._keys_cache = self.encoders()  # the cached listing may predate another writer
            tags = self._stored_tags(encoder, minus)
        if weights is not None:
            if weights not in tags:
                matching = [t for t in tags if _weights_match(t, weights)]
                if len(matching) == 1:
                    return FeatureKey(encoder, matching[0], int(minus))
            return FeatureKey(encoder, weights, int(minus))
        if len(tags) == 1:
            return FeatureKey(encoder, tags[0], int(minus))
        if not tags:
            have = ", ".join(str(k) for k in self.encoders()) or "none"
            raise StoreKeyError(f"{self.path}: no features for {encoder} minus{minus} (stored: {have})")
        raise StoreError(
            f"{self.path}: {encoder} minus{minus} is stored with several weights ({', '.join(tags)}); choose one "
            "with --weights (weights= in Python)"
        )

    def matching_keys(self, encoder: str, weights: str | None = None) -> list[FeatureKey]:
        """The complete feature sets of *encoder* whose weights answer *weights* as
        :meth:`resolve_key` reads it (``random`` finds ``random-s0``, a file its tag; None: any)."""
        if weights is not None:
            from featstore.tags import requested_tag

            weights = requested_tag(weights)
        return [k for k in self.encoders()
                if k.encoder == encoder and (weights is None or _weights_match(k.weights, weights))]

    def has_tiling(self, slide_id: str) -> bool:
        """True when the slide's tiling (coords, tissue) is complete."""
        try:
            self._slide(slide_id)
        except StoreKeyError:
            return False
        return True

    def has_features(self, slide_id: str, encoder: str, minus: int, weights: str | None = None) -> bool:
        """True when the slide has complete features for the key."""
        if weights is not None:  # answer from this slide alone: no store-wide listing
            try:
                g = self._slide(slide_id)
            except StoreKeyError:
                return False
            return any(k.encoder == encoder and k.minus == int(minus) and _weights_match(k.weights, weights)
                       for k, _ in self._feature_arrays(g))
        try:
            key = self.resolve_key(encoder, minus, weights)
            self._features_array(slide_id, key)
        except StoreError:
            return False
        return True

    # ------------------------------------------------------------------ slide data
    def features(self, slide_id: str, encoder: str, minus: int, weights: str | None = None) -> np.ndarray:
        """(N, D) float16 embeddings of one slide, rows aligned with :meth:`coords`."""
        return self._features_array(slide_id, self.resolve_key(encoder, minus, weights))[:]

    def coords(self, slide_id: str) -> np.ndarray:
        """(N, 2) int32 level-0 (x, y) top-left corners of the slide's patches."""
        return self._slide(slide_id)["coords"][:]

    def tissue(self, slide_id: str) -> np.ndarray:
        """(N,) float32 tissue fraction per patch."""
        return self._slide(slide_id)["tissue"][:]

    def qc(self, slide_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-tile QC of a slide tiled with ``--qc flag|drop``: (N, 3) measures (sharpness, density,
        background; featstore.tileqc.MEASURES) and (N,) uint8 flag bits (featstore.tileqc.FLAGS);
        None when the slide was tiled without QC."""
        g = self._slide(slide_id)
        if "qc" not in g:
            return None
        return g["qc"][:], g["qc_flags"][:]

    def slide_info(self, slide_id: str) -> dict:
        """Source path, file fingerprint, slide mpp, tiling config, patch size in level-0 px."""
        return dict(self._slide(slide_id).attrs)

    def provenance(self, slide_id: str, encoder: str, minus: int, weights: str | None = None) -> dict:
        """Provenance of one features array (encoder, weights sha256, level, preprocessing, ...)."""
        arr = self._features_array(slide_id, self.resolve_key(encoder, minus, weights))
        return dict(arr.attrs.get("provenance", {}))

    def n_tiles(self, slide_id: str) -> int:
        """Number of patches of the slide (rows of each of its features arrays)."""
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
