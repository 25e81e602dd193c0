"""Site-aware splits: the site column, leave-one-site-out, site-preserved K-fold (MILP) and the run record."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featstore.cli import mil_app
from mil.data import _check_no_leak, assign_sites, fold_balance, make_splits
from featstore.core.errors import LabelsError
from mil.errors import MilError
from featstore.core.labels import read_labels
from mil.metrics import fold_metrics

from .conftest import write_labels

# 6 sites of 4 patients (2 slides each), class counts per site deliberately uneven
SITE_PLAN = {"A": (6, 2), "B": (2, 6), "C": (4, 4), "D": (8, 0), "E": (2, 2), "F": (0, 8)}


def _rows(plan: dict[str, tuple[int, int]] = SITE_PLAN) -> list[dict]:
    """Slides ``<site>-<n>`` with (normal, tumor) counts per site; two slides per patient, one class each."""
    rows = []
    for site, (n0, n1) in plan.items():
        labels = ["normal"] * n0 + ["tumor"] * n1
        for j, lab in enumerate(labels):
            rows.append({"slide_id": f"{site}-{j}", "label": lab, "patient_id": f"{site}p{j // 2}", "site": site})
    return rows


def _labels(tmp_path, rows=None, name="labels.csv"):
    return read_labels(write_labels(tmp_path / name, rows or _rows()))


def _sides(labels, sp, attr):
    v = np.array(getattr(labels, attr))
    return set(v[np.concatenate([sp.train, sp.val])]), set(v[sp.test])


# ------------------------------------------------------------------------------ the site column
def test_site_column_is_parsed_and_kept_by_subset(tmp_path):
    labels = _labels(tmp_path)
    assert labels.site[:2] == ("A", "A") and len(set(labels.site)) == 6
    assert labels.subset([0, len(labels) - 1]).site == ("A", "F")
    plain = read_labels(write_labels(tmp_path / "plain.csv", [{k: r[k] for k in ("slide_id", "label")}
                                                               for r in _rows()]))
    assert plain.site is None


def test_empty_site_names_the_lines(tmp_path):
    rows = _rows()
    rows[2]["site"], rows[5]["site"] = "", "NA"
    with pytest.raises(LabelsError, match=r"empty site on line\(s\) 4, 7"):
        _labels(tmp_path, rows)


def test_a_patient_with_two_sites_is_named(tmp_path):
    rows = _rows()
    rows[1]["site"] = "B"   # Ap0's second slide
    with pytest.raises(LabelsError, match=r"patient\(s\) Ap0 \(A, B\) have slides from more than one site"):
        _labels(tmp_path, rows)


def test_site_modes_need_a_site_column(tmp_path):
    plain = read_labels(write_labels(tmp_path / "plain.csv", [{k: r[k] for k in ("slide_id", "label", "patient_id")}
                                                               for r in _rows()]))
    for mode in ("site", "site-preserved"):
        with pytest.raises(LabelsError, match=f"--split {mode} needs a 'site' column"):
            make_splits(plain, split=mode)


def test_site_split_refuses_a_fold_column_and_folds(tmp_path):
    rows = [{**r, "fold": str(i % 2)} for i, r in enumerate(_rows())]
    with pytest.raises(LabelsError, match="has a 'fold' column and --split site was given"):
        make_splits(_labels(tmp_path, rows), split="site")
    with pytest.raises(MilError, match="--folds 3 does not apply to --split site"):
        make_splits(_labels(tmp_path, name="l2.csv"), split="site", folds=3)
    with pytest.raises(MilError, match="--split 'hospital'"):
        make_splits(_labels(tmp_path, name="l3.csv"), split="hospital")


# --------------------------------------------------------------------------- leave-one-site-out
def test_leave_one_site_out_one_fold_per_site_no_leak(tmp_path):
    labels = _labels(tmp_path)
    splits = make_splits(labels, split="site", seed=3)
    assert [s.name for s in splits] == [f"site-{v}" for v in "ABCDEF"]
    for sp, site in zip(splits, "ABCDEF"):
        train_sites, test_sites = _sides(labels, sp, "site")
        assert test_sites == {site} and site not in train_sites
        train_p, test_p = _sides(labels, sp, "patients")
        assert not train_p & test_p
        assert not set(np.array(labels.patients)[sp.train]) & set(np.array(labels.patients)[sp.val])
        assert len(sp.val) > 0   # carved from the other sites' training patients
        assert sorted(np.concatenate([sp.train, sp.val, sp.test]).tolist()) == list(range(len(labels)))
        d = sp.to_dict(labels)
        assert d["sites"]["test"] == [site] and site not in d["sites"]["train"] + d["sites"]["val"]


def test_leave_one_site_out_with_one_class_left_for_training_is_one_line(tmp_path):
    labels = _labels(tmp_path, _rows({"A": (0, 4), "B": (4, 0), "C": (4, 0)}))
    with pytest.raises(LabelsError, match="fold site-A has training slides of one class only"):
        make_splits(labels, split="site")


def test_single_class_test_site_is_allowed_and_its_auc_is_null(tmp_path):
    labels = _labels(tmp_path)
    sp = {s.name: s for s in make_splits(labels, split="site")}["site-D"]   # D: 8 normal, 0 tumor
    y = labels.y[sp.test]
    assert set(y.tolist()) == {0}
    probs = np.tile([0.7, 0.3], (len(y), 1))
    m = fold_metrics(y, probs, n_boot=20)
    assert m["auc"] is None and m["auc_ci"] == [None, None] and m["n"] == len(y)


def test_leak_check_catches_a_site_on_both_sides(tmp_path):
    labels = _labels(tmp_path)
    sp = make_splits(labels, split="site")[0]
    # move one site-A patient (rows 0, 1) from test into training: patients stay apart, the site does not
    from mil.data import Split
    bad = Split(sp.name, np.sort(np.r_[sp.train, [0, 1]]), sp.val, sp.test[2:])
    with pytest.raises(LabelsError, match=r"site\(s\) A have slides in both training and test of fold site-A"):
        _check_no_leak([bad], labels, by_site=True)
    _check_no_leak([bad], labels)   # the patient rule alone holds


# ---------------------------------------------------------------------------- site-preserved
def _brute_force(counts: np.ndarray, k: int) -> float:
    return min(fold_balance(counts, np.array(a), k) for a in itertools.product(range(k), repeat=len(counts))
               if len(set(a)) == k)


def test_site_preserved_folds_keep_sites_whole_and_balance_like_brute_force(tmp_path):
    labels = _labels(tmp_path)
    splits = make_splits(labels, split="site-preserved", folds=3, seed=0)
    assert [s.name for s in splits] == ["fold0", "fold1", "fold2"]
    tested = [sorted(_sides(labels, sp, "site")[1]) for sp in splits]
    assert sorted(itertools.chain(*tested)) == list("ABCDEF")          # every site in exactly one fold
    for sp in splits:
        train_sites, test_sites = _sides(labels, sp, "site")
        assert test_sites and not train_sites & test_sites
        assert not _sides(labels, sp, "patients")[0] & _sides(labels, sp, "patients")[1]
    counts = np.array(list(SITE_PLAN.values()))
    fold_of = np.array([next(j for j, t in enumerate(tested) if s in t) for s in "ABCDEF"])
    assert fold_balance(counts, fold_of, 3) == pytest.approx(_brute_force(counts, 3))


@pytest.mark.parametrize("seed", range(4))
def test_assign_sites_matches_brute_force_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 12, size=(6, 2 + seed % 2))
    fold_of = assign_sites(counts, 3, seed=seed)
    assert sorted(set(fold_of.tolist())) == [0, 1, 2] and fold_of[0] == 0
    assert fold_balance(counts, fold_of, 3) == pytest.approx(_brute_force(counts, 3))


def test_site_preserved_is_deterministic_for_a_seed(tmp_path):
    labels = _labels(tmp_path)
    a, b = (make_splits(labels, split="site-preserved", seed=5) for _ in range(2))
    assert len(a) == 3   # default K
    for x, y in zip(a, b):
        assert x.name == y.name and all(np.array_equal(getattr(x, k), getattr(y, k)) for k in ("train", "val", "test"))


def test_fewer_sites_than_folds_is_an_error(tmp_path):
    labels = _labels(tmp_path, _rows({"A": (4, 4), "B": (4, 4), "C": (4, 4)}))
    with pytest.raises(LabelsError, match="3 sites cannot make 5 site-preserved folds; lower --folds"):
        make_splits(labels, split="site-preserved", folds=5)


# ------------------------------------------------------------------------- patient mode unchanged
@pytest.mark.parametrize("folds", [None, 3])
def test_split_patient_is_the_default_bit_for_bit(tmp_path, folds):
    labels = _labels(tmp_path)
    a = make_splits(labels, folds=folds, seed=2)
    b = make_splits(labels, folds=folds, seed=2, split="patient")
    plain = read_labels(write_labels(tmp_path / "plain.csv", [{k: r[k] for k in ("slide_id", "label", "patient_id")}
                                                               for r in _rows()]))
    c = make_splits(plain, folds=folds, seed=2)
    for x, y, z in zip(a, b, c):
        for k in ("train", "val", "test"):
            assert np.array_equal(getattr(x, k), getattr(y, k)) and np.array_equal(getattr(x, k), getattr(z, k))
    assert "sites" not in c[0].to_dict(plain) and "sites" in a[0].to_dict(labels)


# ----------------------------------------------------------------------------------- end to end
def test_mil_train_split_site_records_the_sites_per_fold(tmp_path, cohort):
    store, labels_path, _, _ = cohort
    with open(labels_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["site"] = "ABCD"[(int(r["patient_id"][1:]) // 2) % 4]
    labels = write_labels(tmp_path / "sited.csv", rows)
    out = tmp_path / "run"
    res = CliRunner().invoke(mil_app, ["train", "--store", store, "--encoder", "resnet18", "--minus", "1",
                                       "--labels", labels, "--out", str(out), "--split", "site",
                                       "--hidden", "16", "--attn-dim", "8", "--epochs", "2", "--threads", "1"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["split"] == "site" and cfg["fold_names"] == ["site-A", "site-B", "site-C", "site-D"]
    for site in "ABCD":
        sp = cfg["splits"][f"site-{site}"]
        assert sp["sites"]["test"] == [site]
        assert site not in sp["sites"]["train"] + sp["sites"]["val"]
        assert all(s in sp["test"] for s in (r["slide_id"] for r in rows if r["site"] == site))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["folds"]) == {"site-A", "site-B", "site-C", "site-D"}
