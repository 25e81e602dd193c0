"""The feature store: one Zarr v3 group per cohort, written slide by slide, read by everyone.

Layout (documented in docs/store-format.md)::

    cohort.zarr/                         attrs: featstore (format, version, tiling config)
      slides/<slide_id>/                 attrs: source, fingerprint, slide_mpp, size0, n_tiles, tiling_complete
        coords      (N, 2) int32         level-0 (x, y) of each patch's top-left corner
        tissue      (N,)   float32       tissue fraction per patch
        qc          (N, 3) float32       --qc flag|drop only: sharpness, density, background (featstore.tileqc)
        qc_flags    (N,)   uint8         --qc flag|drop only: bits 1 blur, 2 dark, 4 background
        features/<key>  (N, D) float16   attrs: encoder, weights, minus, dim, provenance, complete
      failures/<slide_id>/               attrs: reason, source, time

Two sides: :func:`open_store` (mode "r") returns a :class:`StoreReader`, the read API that mil,
analysis and the study use; it honours the ``complete`` flags and has no writer methods.
``open_store(path, mode="a")`` / :func:`open_store_writer` return a :class:`StoreWriter` (the
read API plus tiling, features, failure log and slide locks), used only by the extractor and the
h5 importer. ``Store`` names the read API, so ``isinstance(x, Store)`` accepts either side.
"""

from featstore.store._layout import (CHUNK_BYTES, FORMAT_VERSION, FeatureKey, rows_per_chunk, safe_key,
                                     safe_slide_id)
from featstore.store._open import open_store, open_store_writer
from featstore.store.lock import NullLock, SlideLock
from featstore.store.reader import StoreReader, StoreReadOnlyError
from featstore.store.writer import FeatureWriter, StoreWriter

#: Any open store (reader or writer); the type of what :func:`open_store` returns.
Store = StoreReader

__all__ = [
    "CHUNK_BYTES", "FORMAT_VERSION", "FeatureKey", "FeatureWriter", "NullLock", "SlideLock", "Store",
    "StoreReadOnlyError", "StoreReader", "StoreWriter", "open_store", "open_store_writer", "rows_per_chunk",
    "safe_key", "safe_slide_id",
]
