"""Labels CSV validation, patient-grouped stratified splits, bags from a real store."""

from __future__ import annotations

import numpy as np
import pytest

from featstore.store import open_store
from mil.data import load_bags, make_splits
from featstore.core.errors import LabelsError
from featstore.core.labels import match_store, read_labels

from .conftest import KEY, planted_bags, write_labels, write_store


def _labels(tmp_path, n=60, n_patients=20, classes=("neg", "pos"), **extra):
    rng = np.random.default_rng(0)
    pat_class = {f"p{i:02d}": classes[i % len(classes)] for i in range(n_patients)}
    pats = [f"p{i % n_patients:02d}" for i in range(n)]
    rows = [{"slide_id": f"s{i:03d}", "label": pat_class[p], "patient_id": p} for i, p in enumerate(pats)]
    for k, v in extra.items():
        for r, val in zip(rows, v):
            r[k] = val
    rng.shuffle(rows)
    return read_labels(write_labels(tmp_path / "l.csv", rows))


@pytest.mark.parametrize("text, message", [
    ("slide,label\na,1\n", "missing column(s) slide_id"),
    ("slide_id,label,hospital\na,1,x\nb,0,y\n", "unknown column(s) hospital"),
    ("slide_id,label\na,1\nb,\nc,0\nd,NaN\n", "empty/NaN label on line(s) 3, 5"),
    ("slide_id,label\na,1\nb,1\n", "only one class ('1')"),
    ("slide_id,label\na,1\na,0\n", "duplicate slide_id(s) a"),
    ("slide_id,label,split\na,1,train\nb,0,dev\n", "split must be train/val/test; bad value on line(s) 3"),
    ("slide_id,label\n", "no rows"),
])
def test_bad_labels_give_one_line_messages(tmp_path, text, message):
    p = tmp_path / "labels.csv"
    p.write_text(text)
    with pytest.raises(LabelsError) as exc:
        read_labels(p)
    assert message in str(exc.value) and str(p) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_labels_file(tmp_path):
    with pytest.raises(LabelsError, match="does not exist"):
        read_labels(tmp_path / "nope.csv")


def test_classes_sorted_numerically_and_strings(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("slide_id,label\na,10\nb,2\nc,1\n")
    lab = read_labels(p)
    assert lab.classes == ("1", "2", "10") and lab.y.tolist() == [2, 1, 0]
    assert lab.patients == ("a", "b", "c")        # no patient_id: each slide its own patient
    p.write_text("slide_id,label\na,tumor\nb,normal\n")
    assert read_labels(p).classes == ("normal", "tumor")


def test_slides_missing_from_store_listed_or_skipped(tmp_path, caplog):
    lab = _labels(tmp_path, n=30)
    have = list(lab.slide_ids[:25])
    with pytest.raises(LabelsError, match=r"5 slide\(s\) of .* have no features in S: .*--allow-missing"):
        match_store(lab, have, store_name="S")
    kept = match_store(lab, have, allow_missing=True, store_name="S")
    assert len(kept) == 25 and set(kept.slide_ids) == set(have)
    assert "skipping 5 slide(s)" in caplog.text


@pytest.mark.parametrize("folds", [None, 3, 5])
def test_patient_grouping_never_leaks_and_folds_are_stratified(tmp_path, folds):
    lab = _labels(tmp_path, n=90, n_patients=30)
    splits = make_splits(lab, folds=folds, seed=3)
    assert [s.name for s in splits] == (["test"] if folds is None else [f"fold{i}" for i in range(folds)])
    p = np.array(lab.patients)
    for s in splits:
        parts = [set(p[s.train]), set(p[s.val]), set(p[s.test])]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert len(s.val) > 0
        for part in (s.train, s.val, s.test):
            assert set(lab.y[part].tolist()) == {0, 1}
    if folds:  # every slide is tested exactly once
        tested = np.concatenate([s.test for s in splits])
        assert sorted(tested.tolist()) == list(range(len(lab)))


def test_train_fraction_keeps_both_classes_and_fixed_val_test(tmp_path):
    lab = _labels(tmp_path, n=60, n_patients=30)
    full = make_splits(lab, folds=3, seed=0)
    for frac in (0.5, 0.1, 0.01):
        small = make_splits(lab, folds=3, seed=0, train_fraction=frac)
        for a, b in zip(full, small):
            assert set(lab.y[b.train].tolist()) == {0, 1}
            assert set(b.train) <= set(a.train)
            np.testing.assert_array_equal(a.val, b.val)
            np.testing.assert_array_equal(a.test, b.test)
            assert len(set(np.array(lab.patients)[b.train])) >= 2
    half = make_splits(lab, folds=3, seed=0, train_fraction=0.5)
    assert all(abs(len(h.train) - len(f.train) / 2) <= 3 for h, f in zip(half, full))


def test_split_column_and_fold_column(tmp_path):
    n = 24
    split = ["train"] * 12 + ["val"] * 4 + ["test"] * 8
    rows = [{"slide_id": f"s{i}", "label": i % 2, "split": split[i]} for i in range(n)]
    lab = read_labels(write_labels(tmp_path / "a.csv", rows))
    (s,) = make_splits(lab)
    assert s.name == "test" and len(s.train) == 12 and len(s.val) == 4 and len(s.test) == 8
    with pytest.raises(LabelsError, match="has a 'split' column and --folds 3 was given"):
        make_splits(lab, folds=3)
    rows = [{"slide_id": f"s{i}", "label": i % 2, "fold": i % 3} for i in range(n)]
    folds = make_splits(read_labels(write_labels(tmp_path / "b.csv", rows)))
    assert [f.name for f in folds] == ["fold0", "fold1", "fold2"]
    rows = [{"slide_id": f"s{i}", "label": i % 2, "patient_id": "p0" if i < 2 else f"p{i}",
             "split": "train" if i != 1 else "test"} for i in range(n)]
    rows[-1]["split"] = "test"
    with pytest.raises(LabelsError, match=r"patient\(s\) p0 have slides in more than one"):
        make_splits(read_labels(write_labels(tmp_path / "c.csv", rows)))


def test_too_few_patients_for_folds(tmp_path):
    lab = _labels(tmp_path, n=12, n_patients=4)
    with pytest.raises(LabelsError, match="4 patient"):
        make_splits(lab, folds=5)


def test_bags_from_store_cached_or_streamed(tmp_path):
    bags, _ = planted_bags(6, dim=8, seed=2)
    st = open_store(write_store(tmp_path / "s.zarr", bags))
    for cache in ("float32", "float16", "none"):
        b = load_bags(st, list(bags), KEY, cache=cache)
        assert b.cache == cache and b.dim == 8
        got = dict(b.iterate(list(bags)[::-1]))
        for sid, x in bags.items():
            np.testing.assert_array_equal(got[sid].numpy(), x.astype(np.float16).astype(np.float32))
    assert load_bags(st, list(bags), KEY, max_cache_bytes=10).cache == "none"
    assert load_bags(st, list(bags), KEY, max_cache_bytes=1 << 30).cache == "float32"


def test_features_of_wrong_dim_are_reported(tmp_path):
    bags, _ = planted_bags(4, dim=8, seed=2)
    path = write_store(tmp_path / "s.zarr", bags)
    st = open_store(path, mode="a")
    st.write_features("s002", KEY, np.zeros((len(bags["s002"]), 5)), {})
    with pytest.raises(LabelsError, match=r"wrong shape .* 1 slide\(s\): s002 \("):
        load_bags(open_store(path), list(bags), KEY)
    with pytest.raises(LabelsError, match="8-d but the model expects 16-d"):
        load_bags(open_store(path), ["s000"], KEY, expected_dim=16)
