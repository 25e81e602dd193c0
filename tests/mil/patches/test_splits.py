"""split_indices and nested_fractions: disjoint, covering, stratified, grouped, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from mil.patches.errors import PatchError
from mil.patches.splits import nested_fractions, normalise_splits, split_indices


def _labels(n=1000, seed=0):
    return np.random.default_rng(seed).choice(3, n, p=[0.5, 0.3, 0.2])


def _grouped(n_groups=80, seed=0):
    """Slides of 5-30 patches; each slide leans to one class (as tissue types do)."""
    rng = np.random.default_rng(seed)
    y, g = [], []
    for s in range(n_groups):
        size = int(rng.integers(5, 31))
        lean = s % 3
        p = np.full(3, 0.15)
        p[lean] = 0.7
        y += rng.choice(3, size, p=p).tolist()
        g += [f"slide{s}"] * size
    return np.array(y), np.array(g)


def _shares(y, idx):
    return np.bincount(y[idx], minlength=3) / len(idx)


def _check_partition(s, n):
    allidx = np.concatenate([s["train"], s["val"], s["test"]])
    assert len(allidx) == n and len(np.unique(allidx)) == n   # disjoint and covering
    for v in s.values():
        assert v.dtype == np.int64 and np.all(np.diff(v) > 0)


def test_stratified_split():
    y = _labels()
    s = split_indices(y, val=0.15, test=0.2, seed=3)
    _check_partition(s, len(y))
    assert len(s["test"]) == 200 and abs(len(s["val"]) - 150) <= 1
    for part in s.values():
        assert np.abs(_shares(y, part) - _shares(y, np.arange(len(y)))).max() < 0.01


def test_grouped_split_keeps_groups_on_one_side():
    y, g = _grouped()
    s = split_indices(y, g, val=0.15, test=0.2, seed=1)
    _check_partition(s, len(y))
    sides = [set(g[s[k]]) for k in ("train", "val", "test")]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    n = len(y)
    assert abs(len(s["test"]) / n - 0.2) < 0.06 and abs(len(s["val"]) / n - 0.15) < 0.06
    for part in s.values():
        assert np.abs(_shares(y, part) - _shares(y, np.arange(n))).max() < 0.08


def test_deterministic_for_a_seed():
    y, g = _grouped()
    for groups in (None, g):
        a = split_indices(y, groups, seed=5)
        b = split_indices(y, groups, seed=5)
        c = split_indices(y, groups, seed=6)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        assert not np.array_equal(a["test"], c["test"])


def test_a_given_split_column_is_honoured():
    y = _labels(300)
    names = np.array(["Train", "VALID", "test", "train", "Validation", "TEST"] * 50)
    s = split_indices(y, splits=names)
    assert np.array_equal(s["val"], np.flatnonzero(np.isin(np.arange(300) % 6, [1, 4])))
    assert np.array_equal(s["test"], np.flatnonzero(np.isin(np.arange(300) % 6, [2, 5])))


def test_missing_val_and_test_are_carved_from_train():
    y, g = _grouped()
    first = np.isin(g, [f"slide{i}" for i in range(60)])
    names = np.where(first, "train", "test")
    s = split_indices(y, g, names, val=0.15, test=0.2, seed=0)
    assert np.array_equal(s["test"], np.flatnonzero(~first))          # the given test is kept
    assert set(s["val"]) <= set(np.flatnonzero(first)) and len(s["val"]) > 0
    assert not set(g[s["val"]]) & set(g[s["train"]])
    only_train = split_indices(y, g, np.full(len(y), "train"), seed=0)
    assert np.array_equal(only_train["test"], split_indices(y, g, seed=0)["test"])   # = automatic split
    assert split_indices(y, splits=[])["test"].size == round(0.2 * len(y))       # empty column: automatic


def test_refusals():
    y = _labels(100)
    with pytest.raises(PatchError, match="unknown split name"):
        split_indices(y, splits=["train", "dev"] * 50)
    with pytest.raises(PatchError, match="both sides"):
        split_indices(np.r_[y, 3])                                     # class 3 has one patch
    y2, g2 = _grouped(30)
    y2[g2 == "slide0"] = 3                                             # class 3 in one slide only
    with pytest.raises(PatchError, match="fewer than 2 groups"):
        split_indices(y2, g2)
    names = np.where(np.arange(len(y2)) % 2, "train", "test")         # every slide on both sides
    with pytest.raises(PatchError, match="both train and test"):
        split_indices(y2, g2, names)
    with pytest.raises(PatchError, match="val \\+ test < 1"):
        split_indices(y, val=0.5, test=0.5)
    with pytest.raises(PatchError, match="one split name per patch"):
        split_indices(y, splits=["train"] * 3)
    with pytest.raises(PatchError, match="integer class indices"):
        split_indices(np.array(["a", "b"] * 10))
    assert normalise_splits(["Valid", " TRAINING ", "testing"]).tolist() == ["val", "train", "test"]


FRACTIONS = (0.01, 0.1, 0.25, 1.0)


def test_nested_fractions_are_nested_stratified_and_deterministic():
    y = _labels(3000)
    train = split_indices(y, seed=0)["train"]
    sub = nested_fractions(train, y, FRACTIONS, seed=2)
    assert list(sub) == list(FRACTIONS)
    assert np.array_equal(sub[1.0], train)
    for small, big in zip(FRACTIONS, FRACTIONS[1:]):
        assert set(sub[small]) <= set(sub[big]) and len(sub[small]) < len(sub[big])
    n_class = np.bincount(y[train], minlength=3)
    for f in FRACTIONS[:-1]:
        counts = np.bincount(y[sub[f]], minlength=3)
        assert np.array_equal(counts, np.maximum(1, np.floor(f * n_class + 0.5)).astype(int))
    again = nested_fractions(train, y, (0.25,), seed=2)[0.25]          # independent of the other fractions
    assert np.array_equal(again, sub[0.25])
    assert not np.array_equal(nested_fractions(train, y, (0.25,), seed=3)[0.25], sub[0.25])


def test_a_tiny_fraction_keeps_every_class():
    y = np.r_[np.zeros(500, int), np.ones(20, int), np.full(3, 2)]
    sub = nested_fractions(np.arange(len(y)), y, (0.01,))[0.01]
    assert np.bincount(y[sub]).tolist() == [5, 1, 1]


def test_grouped_fractions_take_whole_groups():
    y, g = _grouped(120)
    train = split_indices(y, g, seed=0)["train"]
    sub = nested_fractions(train, y, FRACTIONS, groups=g, seed=1)
    assert np.array_equal(sub[1.0], train)
    for f, idx in sub.items():
        taken = set(g[idx])
        whole = train[np.isin(g[train], list(taken))]
        assert np.array_equal(np.sort(whole), idx)                     # all train rows of a taken group
        assert set(y[idx]) == {0, 1, 2}
    for small, big in zip(FRACTIONS, FRACTIONS[1:]):
        assert set(sub[small]) <= set(sub[big])
    assert abs(len(sub[0.25]) / len(train) - 0.25) < 0.06
    again = nested_fractions(train, y, FRACTIONS, groups=g, seed=1)
    assert all(np.array_equal(sub[f], again[f]) for f in FRACTIONS)


def test_a_class_that_leads_no_group_is_still_present():
    y, g = _grouped(60)
    rare = np.flatnonzero(g == "slide7")[:2]
    y[rare] = 3                                                       # class 3: a minority in one slide
    sub = nested_fractions(np.arange(len(y)), y, (0.01, 0.1), groups=g, seed=0)
    assert 3 in set(y[sub[0.01]]) and set(sub[0.01]) <= set(sub[0.1])


def test_bad_fractions():
    y = _labels(100)
    for bad in ((0.0,), (1.5,), ()):
        with pytest.raises(PatchError, match=r"\(0, 1\]"):
            nested_fractions(np.arange(100), y, bad)
