"""The tiles of a pretraining run: the store's coords read through the TileSource, prefetched.

Slides are never re-tiled: a run trains on the tiles extraction tiled, read at the store's
coords and resized to the encoder's input like every other reader of the toolkit.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from concurrent.futures import Future
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from featstore.errors import PretrainError
from featstore.tilesource import TileSource

Item = tuple[str, int]     # (slide_id, tile index in the store's coords)


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


class TileFeed:
    """Batches of uint8 (B, 3, S, S) tiles for lists of :data:`Item`, read by a thread pool
    (through *stain*, a :mod:`featstore.stain` normaliser, when given).

    Any trainer that samples (slide, tile) items uses it: pretraining, and the patch fine-tuner
    over image shards (an image is tile (i, 0) of its shard)."""

    def __init__(self, store, slide_ids: Sequence[str], preprocessing, *, slides=None, workers: int = 1,
                 pin: bool = False, stain=None):
        self.source = TileSource.from_store(store, list(slide_ids), preprocessing, slides=slides,
                                            workers=workers, pin=pin, stain=stain)
        self.coords = {s: store.coords(s) for s in slide_ids}
        self.size = self.source.input_size

    def read(self, items: Sequence[Item]) -> Tensor:
        """The tiles of *items*, in that order."""
        by_slide: dict[str, list[int]] = defaultdict(list)
        for pos, (sid, _) in enumerate(items):
            by_slide[sid].append(pos)
        out = np.empty((len(items), self.size, self.size, 3), np.uint8)
        for sid, positions in by_slide.items():
            idx = np.array([items[p][1] for p in positions])
            out[positions] = self.source.read_rgb(sid, self.coords[sid][idx])
        return self.source.stained(torch.from_numpy(out).permute(0, 3, 1, 2))

    def submit(self, items: Sequence[Item]) -> Future:
        """Start reading *items* on a reader thread."""
        return self.source.pool.submit(self.read, list(items))

    def close(self) -> None:
        self.source.close()


__all__ = ["Item", "TileFeed", "store_fingerprint", "tile_counts"]
