"""TileFeed: batches of tiles at a store's coords, read on a thread pool, for any trainer.

Pretraining and the patch fine-tuner (an image is tile (i, 0) of its shard) sample (slide, tile)
items and read them here, through the
:class:`~featstore.read.tilesource.TileSource`, resized to the encoder's input like every other
reader of the toolkit (slides are never re-tiled).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np
import torch
from torch import Tensor

from featstore.read.tilesource import TileSource

Item = tuple[str, int]     # (slide_id, tile index in the store's coords)


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


__all__ = ["Item", "TileFeed"]
