"""The tiles of a pretraining run: the store's tile counts and fingerprint (what a resumed run
checks); the tiles themselves are read by the shared :class:`featstore.train.feed.TileFeed`."""

from __future__ import annotations

import hashlib
import json

from featstore.errors import PretrainError


def tile_counts(store) -> dict[str, int]:
    """{slide_id: tiles} of every tiled slide; :class:`PretrainError` when there are none."""
    counts = {s: int(store.n_tiles(s)) for s in store.slide_ids() if store.has_tiling(s)}
    if not any(counts.values()):
        raise PretrainError(f"{store.path}: the store holds no tiles; run `featstore extract` on the slides "
                            "first (it tiles them), then pretrain on the store")
    return counts


def store_fingerprint(store, counts: dict[str, int]) -> str:
    """A short hash of the store's tiling and every slide's file fingerprint and tile count."""
    doc = {"tiling": store.tiling,
           "slides": [[s, store.slide_info(s).get("fingerprint"), counts[s]] for s in sorted(counts)]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


__all__ = ["store_fingerprint", "tile_counts"]
