"""Which tiles a pretraining run sees: balanced across slides, seeded, nested across fractions.

:func:`nested_order` lists every (slide, tile) of the store once, in rounds: each round takes
the next tile (in a seeded per-slide permutation) of every slide that has one left, slides in
a seeded order. Any prefix of that list is balanced (slides' counts differ by at most one until
small slides run out), and a smaller fraction's prefix is inside a larger one's, so the seed
studies' 10 % ⊂ 25 % ⊂ 50 % ⊂ 100 % ablation compares data amounts, not different tiles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def nested_order(counts: Mapping[str, int], seed: int) -> list[tuple[str, int]]:
    """Every (slide_id, tile index) once, in balanced rounds (see the module docstring)."""
    rng = np.random.default_rng([seed, 7919])
    slides = sorted(s for s, n in counts.items() if n > 0)
    perms = {s: rng.permutation(int(counts[s])) for s in slides}
    out: list[tuple[str, int]] = []
    for r in range(max((int(counts[s]) for s in slides), default=0)):
        for i in rng.permutation(len(slides)):
            s = slides[i]
            if r < len(perms[s]):
                out.append((s, int(perms[s][r])))
    return out


def split(order: list[tuple[str, int]], holdout: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(pool, held-out): the last *holdout* tiles of the order (at most a tenth) are held out."""
    k = min(int(holdout), len(order) // 10)
    return (order[:-k], order[-k:]) if k else (list(order), [])


def subset_size(pool: int, fraction: float | None, tiles: int | None) -> int:
    """Tiles of a subset: *tiles* (capped at the pool) or ``ceil(fraction * pool)``, at least 1."""
    n = int(tiles) if tiles is not None else int(math.ceil(float(fraction) * pool))
    return max(1, min(n, pool))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of a subset's *n* tiles in *epoch*: a permutation fixed by (seed, epoch), so a
    resumed run reads exactly the batches the interrupted one would have."""
    return np.random.default_rng([seed, 104729, epoch]).permutation(n)


__all__ = ["epoch_order", "nested_order", "split", "subset_size"]
