"""Run comparison on fake mil run directories written per the run-directory contract."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import stats as st
from typer.testing import CliRunner

from analysis.compare import compare_runs
from analysis.errors import AnalysisError


def _fold(auc):
    return {"auc": auc, "balanced_accuracy": auc - 0.1, "f1": auc - 0.2, "auc_ci": [auc - 0.05, auc + 0.05], "n": 20}


def _run(root, name, encoder, minus, seed, folds, kind="train", weights="imagenet", frozen=None, frac=None):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"kind": kind, "encoder": encoder, "weights": weights, "minus": minus, "model": "abmil",
           "seed": seed, "train_fraction": frac, "classes": ["a", "b"]}
    (d / "config.json").write_text(json.dumps(cfg))
    if folds is None:
        return d
    m = {"folds": {k: _fold(v) for k, v in folds.items()}}
    if frozen is not None:
        m["frozen"] = {"folds": {k: _fold(v) for k, v in frozen.items()}}
    (d / "metrics.json").write_text(json.dumps(m))
    return d


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    kfold = {0: (0.80, 0.84), 1: (0.82, 0.86), 2: (0.78, 0.83)}
    for s, (a, b) in kfold.items():
        _run(root, f"r18_m0_s{s}", "resnet18", 0, s, {"fold0": a, "fold1": b})
    for s, a in enumerate([0.88, 0.90, 0.91]):
        _run(root, f"r18_m1_s{s}", "resnet18", 1, s, {"test": a})
    for s, (a, f) in enumerate([(0.93, 0.88), (0.95, 0.90)]):
        _run(root, f"r18_m1_ft_s{s}", "resnet18", 1, s, {"test": a}, kind="finetune", frozen={"test": f})
    _run(root, "r18_m2_single", "resnet18", 2, 0, {"test": 0.7})
    _run(root, "unfinished", "resnet18", 3, 0, None)
    return root


def test_groups_and_numbers(runs):
    rows = compare_runs([runs], baseline="resnet18:imagenet:minus0")
    by = {(r.key.minus, r.key.kind): r for r in rows}
    assert set(by) == {(0, "train"), (1, "train"), (1, "finetune"), (1, "frozen"), (2, "train")}
    base = by[(0, "train")]
    base_vals = [0.80, 0.84, 0.82, 0.86, 0.78, 0.83]
    assert base.is_baseline and base.n == 6 and base.n_runs == 3
    assert base.mean["auc"] == pytest.approx(np.mean(base_vals))
    assert base.sd["auc"] == pytest.approx(np.std(base_vals, ddof=1))
    assert base.mean["f1"] == pytest.approx(np.mean(base_vals) - 0.2)
    m1 = by[(1, "train")]
    assert m1.n == 3 and m1.delta == pytest.approx(np.mean([0.88, 0.90, 0.91]) - np.mean(base_vals))
    assert m1.p == pytest.approx(st.ttest_ind([0.88, 0.90, 0.91], base_vals, equal_var=False).pvalue)
    half = st.t.ppf(0.975, 2) * np.std([0.88, 0.90, 0.91], ddof=1) / np.sqrt(3)
    assert m1.ci == pytest.approx((np.mean([0.88, 0.9, 0.91]) - half, np.mean([0.88, 0.9, 0.91]) + half))
    assert by[(1, "frozen")].mean["auc"] == pytest.approx(0.89)
    assert by[(1, "finetune")].mean["auc"] == pytest.approx(0.94)
    single = by[(2, "train")]  # one fold: bootstrap CI from metrics.json, no sd, no p
    assert single.n == 1 and single.ci == pytest.approx((0.65, 0.75)) and single.p is None
    assert np.isnan(single.sd["auc"])


def test_unit_run_averages_folds(runs):
    rows = compare_runs([runs], unit="run")
    base = next(r for r in rows if r.key.minus == 0)
    assert base.n == 3
    assert base.mean["auc"] == pytest.approx(np.mean([0.82, 0.84, 0.805]))
    assert all(r.delta is None for r in rows)


def test_baseline_errors(runs):
    with pytest.raises(AnalysisError, match="matches no group"):
        compare_runs([runs], baseline="densenet121:imagenet:minus0")
    with pytest.raises(AnalysisError, match="ENCODER:WEIGHTS:minusK"):
        compare_runs([runs], baseline="resnet18")
    rows = compare_runs([runs], baseline="resnet18:imagenet:minus1:frozen")
    assert next(r for r in rows if r.is_baseline).key.kind == "frozen"


def test_train_fraction_groups(tmp_path):
    for s in range(2):
        _run(tmp_path, f"f25_{s}", "resnet18", 0, s, {"test": 0.7 + s / 100}, frac=0.25)
        _run(tmp_path, f"f100_{s}", "resnet18", 0, s, {"test": 0.8 + s / 100}, frac=1.0)
    rows = compare_runs([tmp_path])
    assert [(r.key.train_fraction, r.n) for r in rows] == [(0.25, 2), (None, 2)]  # None = full training set


def test_outputs_and_cli(runs, tmp_path):
    from featstore.cli import mil_app

    out = tmp_path / "cmp"
    r = CliRunner().invoke(mil_app, ["compare", str(runs), "--out", str(out),
                                     "--baseline", "resnet18:imagenet:minus0"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert len(rows) == 5 and sum(int(x["baseline"]) for x in rows) == 1
    md = (out / "compare.md").read_text()
    assert "| resnet18 | imagenet | minus1 | finetune |" in md and "baseline" in md
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(mil_app, ["compare", str(tmp_path / "nope"), "--out", str(out)])
    assert bad.exit_code == 1 and "not a directory" in bad.output


def test_fold_without_auc_is_left_out(tmp_path):
    d = _run(tmp_path, "r", "resnet18", 0, 0, {"fold0": 0.8, "fold1": 0.9})
    m = json.loads((d / "metrics.json").read_text())
    m["folds"]["fold1"]["auc"] = None  # mil: single-class test fold
    (d / "metrics.json").write_text(json.dumps(m))
    (row,) = compare_runs([d])
    assert row.n == 1 and row.mean["auc"] == pytest.approx(0.8)


def test_broken_metrics_json_is_named(tmp_path):
    d = _run(tmp_path, "r", "resnet18", 0, 0, {"test": 0.8})
    (d / "metrics.json").write_text("{oops")
    with pytest.raises(AnalysisError, match="metrics.json: invalid JSON"):
        compare_runs([d])


def test_runs_with_the_same_folder_name_in_different_places_are_two_runs(tmp_path):
    a = _run(tmp_path / "cohortA", "r18_m0", "resnet18", 0, 0, {"test": 0.8})
    b = _run(tmp_path / "cohortB", "r18_m0", "resnet18", 0, 1, {"test": 0.9})
    (row,) = compare_runs([a, b])
    assert row.n == 2 and row.n_runs == 2
    assert row.runs == sorted([str(a), str(b)])  # full paths, so a study can open them


def test_notes_say_why_delta_or_p_is_blank_and_what_frozen_rows_are(runs, tmp_path):
    from analysis.compare import notes

    text = " ".join(notes(compare_runs([runs])))
    assert "Δ and p are blank: no baseline was given" in text and "'frozen' rows are each fine-tune's parent" in text
    rows = compare_runs([runs], baseline="resnet18:imagenet:minus0")
    assert any(r.delta is not None and r.p is None for r in rows)          # minus2 holds one fold
    assert "p is blank where a group or the baseline has fewer than 2 observations" in " ".join(notes(rows))
    from featstore.cli import mil_app

    out = CliRunner().invoke(mil_app, ["compare", str(runs), "--out", str(tmp_path / "c")]).stdout
    assert "no baseline was given" in out and "no baseline was given" in (tmp_path / "c" / "compare.md").read_text()
