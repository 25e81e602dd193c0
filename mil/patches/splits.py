"""Train/val/test splits and nested training fractions of labelled patches.

Both are stratified by class and, when group ids are given (slide or patient of each patch),
grouped: a group is never on two sides of a split, and a training fraction takes whole groups.
Both are deterministic for a seed. The splitting itself is scikit-learn's
(:class:`~sklearn.model_selection.StratifiedShuffleSplit` without groups,
:class:`~sklearn.model_selection.StratifiedGroupKFold` with them); this module decides the
proportions, honours a given split column and refuses inputs that cannot give every class a
place in train and test.

Proportions: ``val`` and ``test`` are shares of all samples. The test split is carved first
(share ``test`` of the pool), then val out of the rest (share ``val / (1 - test)`` of it), so a
split carved out of a given train split keeps the train : val : test proportions of an
automatic one. With groups the shares are those of one fold of a ``round(1 / share)``-fold
StratifiedGroupKFold, i.e. quantised to 1/k and only as close as whole groups allow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit

from mil.patches.errors import PatchError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test", "testing": "test"}


# ------------------------------------------------------------------ input checks
def _labels(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) == 0:
        raise PatchError(f"labels must be a non-empty 1-D array of class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
            raise PatchError(f"labels must be integer class indices (0..C-1), got dtype {y.dtype}; "
                             "map class names to indices first")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise PatchError(f"labels must be class indices 0..C-1; found {int(y.min())}")
    return y


def _aligned(values, n: int, what: str) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values)
    if arr.ndim != 1 or len(arr) != n:
        raise PatchError(f"{what} has shape {arr.shape} but there are {n} labels; pass one {what} per patch")
    return arr


def normalise_splits(splits) -> np.ndarray:
    """Split names -> canonical ``train`` / ``val`` / ``test`` (case-insensitive; ``valid``,
    ``validation``, ``training``, ``testing`` accepted). Unknown or blank names are an error."""
    names = np.array([str(s).strip().lower() for s in np.asarray(splits, dtype=object)], dtype=object)
    bad = sorted({s for s in names.tolist() if s not in SPLIT_NAMES})
    if bad:
        raise PatchError(f"unknown split name(s) {bad[:5]}: use train, val (valid, validation) or test; "
                         "leave the whole split column out for an automatic split")
    return np.array([SPLIT_NAMES[s] for s in names.tolist()], dtype=object)


def _check_shares(val: float, test: float) -> None:
    if not (0 < test < 1 and 0 <= val < 1 and val + test < 1):
        raise PatchError(f"val={val} and test={test}: need 0 < test < 1, 0 <= val < 1 and val + test < 1 "
                         "(shares of all patches, e.g. val=0.15 test=0.2)")


def _check_groups_disjoint(out: dict[str, np.ndarray], groups: np.ndarray | None) -> None:
    if groups is None:
        return
    seen: dict[object, str] = {}
    for name in SPLITS:
        for g in np.unique(groups[out[name]]).tolist():
            if seen.setdefault(g, name) != name:
                raise PatchError(f"group {g!r} has patches in both {seen[g]} and {name}; a slide/patient "
                                 "must lie on one side only: fix the split column")


# ------------------------------------------------------------------ carving
def _carve(idx: np.ndarray, y: np.ndarray, groups: np.ndarray | None, share: float, seed: int,
           what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split *idx* into (rest, carved) with about *share* of it carved, stratified (and grouped)."""
    yy = y[idx]
    classes, counts = np.unique(yy, return_counts=True)
    if groups is None:
        few = classes[counts < 2]
        if len(few):
            raise PatchError(f"class(es) {few.tolist()} have fewer than 2 patches left for {what}: each "
                             f"class needs a patch on both sides; label more patches of them")
        n_carve = int(np.ceil(share * len(idx)))
        if n_carve < len(classes) or len(idx) - n_carve < len(classes):
            raise PatchError(f"{what}: {share:.3g} of {len(idx)} patches cannot hold all {len(classes)} "
                             "classes on both sides; change the share or label more patches")
        sss = StratifiedShuffleSplit(n_splits=1, test_size=n_carve, random_state=seed)
        rest, carved = next(sss.split(np.zeros(len(idx)), yy))
    else:
        gg = groups[idx]
        n_groups = [len(np.unique(gg[yy == c])) for c in classes]
        few = [int(c) for c, k in zip(classes, n_groups) if k < 2]
        if few:
            raise PatchError(f"class(es) {few} occur in fewer than 2 groups left for {what}: a class in one "
                             "slide/patient cannot be on both sides; add groups or drop the class")
        k = int(min(max(2, round(1 / share)), len(np.unique(gg))))
        sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        rest, carved = next(sgkf.split(np.zeros(len(idx)), yy, gg))
    return np.sort(idx[rest]), np.sort(idx[carved])


def _check_classes(out: dict[str, np.ndarray], y: np.ndarray) -> None:
    classes = np.unique(y)
    for name in ("train", "test"):
        missing = np.setdiff1d(classes, y[out[name]])
        if len(missing):
            raise PatchError(f"class(es) {missing.tolist()} have no patch in {name}; they are too rare for "
                             "this split: label more (or more groups of) them, or raise test")
    missing = np.setdiff1d(classes, y[out["val"]])
    if len(out["val"]) and len(missing):
        log.warning("class(es) %s have no patch in val (too rare); the val split cannot score them",
                    missing.tolist())


def _given(names: np.ndarray, y: np.ndarray, groups: np.ndarray | None, val: float, test: float,
           seed: int) -> dict[str, np.ndarray]:
    out = {s: np.flatnonzero(names == s) for s in SPLITS}
    if not len(out["train"]):
        raise PatchError("the split column names no train patch; mark some patches train "
                         "(val and test are carved from train when missing)")
    _check_groups_disjoint(out, groups)
    if not len(out["test"]):
        out["train"], out["test"] = _carve(out["train"], y, groups, test, seed, "the test split")
        log.info("no test patches given: carved %d of the train patches", len(out["test"]))
    if not len(out["val"]) and val > 0:
        out["train"], out["val"] = _carve(out["train"], y, groups, val / (1 - test), seed + 1, "the val split")
        log.info("no val patches given: carved %d of the train patches", len(out["val"]))
    return out


def split_indices(y, groups=None, splits=None, *, val: float = 0.15, test: float = 0.2,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices (sorted int64) of the ``train``, ``val`` and ``test`` patches.

    ``splits`` (one name per patch, see :func:`normalise_splits`), when given and non-empty, is
    honoured; a missing test, then a missing val split is carved out of its train rows (grouped
    and stratified, same proportions as an automatic split). Otherwise test, then val are carved
    out of all rows. ``groups`` (slide/patient ids) keep a group on one side. Deterministic for
    *seed*. Raises :class:`PatchError` when a class cannot be in both train and test.
    """
    y = _labels(y)
    groups = _aligned(groups, len(y), "group id")
    _check_shares(val, test)
    names = _aligned(splits, len(y), "split name") if splits is not None and len(splits) else None
    if names is not None:
        out = _given(normalise_splits(names), y, groups, val, test, seed)
    else:
        out = {}
        rest, out["test"] = _carve(np.arange(len(y)), y, groups, test, seed, "the test split")
        if val > 0:
            out["train"], out["val"] = _carve(rest, y, groups, val / (1 - test), seed + 1, "the val split")
        else:
            out["train"], out["val"] = rest, np.zeros(0, np.int64)
    out = {s: np.sort(np.asarray(out[s], np.int64)) for s in SPLITS}
    _check_groups_disjoint(out, groups)
    _check_classes(out, y)
    return out


# ------------------------------------------------------------------ nested fractions
def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fr = [float(f) for f in fractions]
    if not fr or any(not 0 < f <= 1 for f in fr):
        raise PatchError(f"fractions {list(fractions)} must each lie in (0, 1], e.g. 0.01,0.1,0.25,1")
    return fr


def _take(sizes: np.ndarray, target: float) -> int:
    """How many items of a seeded order to take: the prefix whose total size is closest to
    *target* (ties: the shorter), at least one. Non-decreasing in *target*, hence nested."""
    cum = np.cumsum(sizes)
    k = int(np.searchsorted(cum, target, side="left"))  # first prefix reaching the target
    if k >= len(cum):
        return len(cum)
    if k > 0 and target - cum[k - 1] <= cum[k] - target:
        return max(1, k)
    return k + 1


def _strata_of_groups(yy: np.ndarray, gg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group ids, majority class of each group (ties: lowest), patch count of each group)."""
    uniq, inv = np.unique(gg, return_inverse=True)
    n_cls = int(yy.max()) + 1
    table = np.zeros((len(uniq), n_cls), np.int64)
    np.add.at(table, (inv, yy), 1)
    return uniq, table.argmax(axis=1), table.sum(axis=1)


def _grouped_orders(yy: np.ndarray, gg: np.ndarray, rng: np.random.Generator):
    """Per stratum (majority class) the seeded order of its groups, and anchor groups of the
    classes that are the majority of no group (always taken, so every class is present)."""
    uniq, stratum, size = _strata_of_groups(yy, gg)
    orders = {int(c): rng.permutation(np.flatnonzero(stratum == c)) for c in np.unique(stratum)}
    anchors = []
    for c in np.unique(yy).tolist():
        if c not in orders:
            holders = np.flatnonzero(np.isin(uniq, np.unique(gg[yy == c])))
            anchors.append(int(rng.permutation(holders)[0]))
    return uniq, size, orders, anchors


def nested_fractions(train_idx, y, fractions: Sequence[float], *, groups=None,
                     seed: int = 0) -> dict[float, np.ndarray]:
    """Nested, stratified subsets of ``train_idx``, one per fraction (1.0 = all of it).

    Without groups each class's training patches are put in one seeded random order and a
    fraction f takes the first ``max(1, round(f * n_class))`` of each class. With groups each
    group's stratum is its majority class; each stratum's groups are put in a seeded random
    order and f takes the prefix of whole groups whose patch count is closest to f times the
    stratum's (at least one group); a class that is the majority of no group gets one seeded
    anchor group holding it, taken at every fraction. Orders depend only on the seed and the
    data, never on which fractions are asked, so a subset is the same in every call and the
    smaller fractions' subsets lie inside the larger ones. Values are sorted int64 indices into
    the same array as ``train_idx``.
    """
    train_idx = np.asarray(train_idx, np.int64)
    y = _labels(y)
    fr = _check_fractions(fractions)
    if len(train_idx) == 0:
        raise PatchError("train_idx is empty; nothing to take fractions of")
    yy = y[train_idx]
    rng = np.random.default_rng(seed)
    out: dict[float, np.ndarray] = {}
    if groups is None:
        orders = {c: train_idx[rng.permutation(np.flatnonzero(yy == c))] for c in np.unique(yy).tolist()}
        for f in fr:
            parts = [o[:max(1, int(np.floor(f * len(o) + 0.5)))] for o in orders.values()]
            out[f] = np.sort(np.concatenate(parts)) if f < 1 else np.sort(train_idx)
        return out
    gg = _aligned(groups, len(y), "group id")[train_idx]
    uniq, size, orders, anchors = _grouped_orders(yy, gg, rng)
    for f in fr:
        if f == 1:
            out[f] = np.sort(train_idx)
            continue
        chosen = list(anchors)
        for order in orders.values():
            chosen += order[:_take(size[order], f * size[order].sum())].tolist()
        out[f] = np.sort(train_idx[np.isin(gg, uniq[np.unique(chosen)])])
    return out


__all__ = ["SPLITS", "normalise_splits", "nested_fractions", "split_indices"]
