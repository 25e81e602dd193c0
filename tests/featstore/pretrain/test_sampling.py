"""featstore.pretrain.sampling: balanced, nested, seeded subsets."""

from __future__ import annotations

from collections import Counter

import numpy as np

from featstore.pretrain.sampling import epoch_order, nested_order, split, subset_size


def test_every_tile_once_and_every_prefix_balanced():
    counts = {"a": 50, "b": 50, "c": 10}
    order = nested_order(counts, seed=3)
    assert len(order) == len(set(order)) == 110
    for n in (3, 9, 30):                                     # before "c" runs out: within one
        c = Counter(s for s, _ in order[:n])
        assert max(c.values()) - min(c.values()) <= 1 and len(c) == 3
    c = Counter(s for s, _ in order[:60])                    # "c" exhausted at 10, the others share
    assert c["c"] == 10 and abs(c["a"] - c["b"]) <= 1


def test_fractions_are_nested_and_the_seed_decides():
    order = nested_order({"a": 40, "b": 30}, seed=0)
    small, big = order[:subset_size(len(order), 0.1, None)], order[:subset_size(len(order), 0.5, None)]
    assert set(small) < set(big) and len(small) == 7 and len(big) == 35
    assert order == nested_order({"a": 40, "b": 30}, seed=0)
    assert order != nested_order({"a": 40, "b": 30}, seed=1)


def test_holdout_is_outside_the_pool_and_small():
    pool, held = split(nested_order({"a": 100}, seed=0), holdout=8)
    assert len(held) == 8 and not set(held) & set(pool)
    pool, held = split(nested_order({"a": 20}, seed=0), holdout=8)
    assert len(held) == 2                                      # at most a tenth of the tiles
    assert subset_size(5, None, 100) == 5 and subset_size(5, 0.01, None) == 1


def test_epoch_order_is_a_fixed_permutation_per_epoch():
    a, b = epoch_order(20, 0, 1), epoch_order(20, 0, 2)
    assert sorted(a) == list(range(20)) and not np.array_equal(a, b)
    assert np.array_equal(a, epoch_order(20, 0, 1))
