"""`mil train` on survival and regression labels: the task read from the columns, folds that
keep events in every test fold, metrics well above chance on bags whose lesion burden sets the
hazard and the score, the same numbers for a seed, and one line for every bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featstore.cli import mil_app
from featstore.core.labels import read_labels
from mil.data import make_splits
from featstore.core.errors import LabelsError
from tests.mil.conftest import burden_cohort, write_labels


# one worker builds the module's fixtures once (pyproject: --dist loadgroup), not each worker again
pytestmark = pytest.mark.xdist_group("endpoints")

@pytest.fixture(scope="module")
def burden(tmp_path_factory):
    """(store, survival labels, regression labels, burden) of 64 slides."""
    tmp = tmp_path_factory.mktemp("burden")
    store, rows, burden = burden_cohort(tmp / "b.zarr", 64, seed=0)
    surv = write_labels(tmp / "surv.csv", [{k: r[k] for k in ("slide_id", "patient_id", "time", "event")}
                                           for r in rows])
    reg = write_labels(tmp / "reg.csv", [{"slide_id": r["slide_id"], "patient_id": r["patient_id"],
                                          "label": r["score"]} for r in rows])
    return store, surv, reg, burden


def _train(store, labels, out, *extra):
    return CliRunner().invoke(mil_app, ["train", "--store", store, "--labels", labels, "--encoder", "resnet18",
                                        "--minus", "1", "--folds", "4", "--epochs", "12", "--out", str(out),
                                        *extra])


@pytest.fixture(scope="module")
def runs(burden, tmp_path_factory):
    """Runs trained once and read by several tests: survival (seed 0), regression (seeds 0, 1)."""
    store, surv, reg, _ = burden
    tmp = tmp_path_factory.mktemp("runs")
    out = {"s": _train(store, surv, tmp / "s"), "r0": _train(store, reg, tmp / "r0"),
           "r1": _train(store, reg, tmp / "r1", "--seed", "1")}
    for name, res in out.items():
        assert res.exit_code == 0, (name, res.output)
    return {name: tmp / name for name in out} | {"s_output": out["s"].output}


def _one_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def test_the_task_comes_from_the_columns(burden):
    _, surv, reg, _ = burden
    s = read_labels(surv)
    assert s.task == "survival" and s.target.shape == (64, 2) and set(s.target[:, 1]) == {0.0, 1.0}
    r = read_labels(reg)
    assert r.task == "regression" and r.target.shape == (64,) and r.classes == ()
    # survival folds: patient-grouped, and events spread so that every test fold holds some
    for sp in make_splits(s, folds=4, seed=0):
        assert s.target[sp.test, 1].sum() >= 5


def test_survival_run_beats_chance_reproducibly(burden, runs, tmp_path):
    store, surv, _, _ = burden
    a = runs["s"]
    assert "C-index" in runs["s_output"] and "Uno's C" in runs["s_output"]
    m = json.loads((a / "metrics.json").read_text())
    assert m["mean"]["c_index"] > 0.65 and m["mean"]["c_index_uno"] > 0.65
    assert m["pooled"]["logrank_p"] < 0.01 and m["pooled"]["events_high"] > 0
    with (a / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "time", "event", "risk", "fold"] and len(rows) == 64
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["task"] == "survival" and cfg["survival_loss"] == "cox" and cfg["classes"] == []
    assert (a / "km.png").is_file() and not (a / "roc.png").exists()
    # the predictions' C-index per fold is the oracle library's on the same numbers
    from lifelines.utils import concordance_index

    for fold, fm in m["folds"].items():
        fr = [r for r in rows if r["fold"] == fold]
        t, e, risk = (np.array([float(r[c]) for r in fr]) for c in ("time", "event", "risk"))
        assert fm["c_index"] == pytest.approx(concordance_index(t, -risk, e), abs=1e-4)
    again = _train(store, surv, tmp_path / "b")
    assert again.exit_code == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text()) == m


def test_discrete_time_nll_survival_learns_the_burden_too(burden, tmp_path):
    store, surv, _, _ = burden
    res = _train(store, surv, tmp_path / "nll", "--survival-loss", "nll", "--time-bins", "3")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "nll" / "metrics.json").read_text())
    cfg = json.loads((tmp_path / "nll" / "config.json").read_text())
    assert set(cfg["task_config"]) == set(m["folds"])          # each fold fits its own bins
    assert all(len(c["time_edges"]) == 2 for c in cfg["task_config"].values())   # 3 bins: 2 inner edges
    assert m["mean"]["c_index"] > 0.6 and m["mean"]["ibs"] is not None


def test_regression_run_tracks_the_score(runs):
    r = runs["r0"]
    m = json.loads((r / "metrics.json").read_text())
    assert m["mean"]["pearson"] > 0.7 and m["mean"]["r2"] > 0.4
    with (r / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "target", "prediction", "fold"]
    assert (r / "scatter.png").is_file()


BAD = {
    "negative time": ([("s0", "-1", "1"), ("s1", "2", "1"), ("s2", "3", "0")], "time must be >= 0; negative on line(s) 2"),
    "missing time": ([("s0", "", "1"), ("s1", "2", "1"), ("s2", "3", "0")], "time must be a number; empty or not numeric on line(s) 2"),
    "event not 0/1": ([("s0", "1", "2"), ("s1", "2", "1"), ("s2", "3", "0")], "event must be 0 (censored) or 1 (event); bad value on line(s) 2"),
    "one event": ([("s0", "1", "1"), ("s1", "2", "0"), ("s2", "3", "0")], "1 event(s) among 3 slides; survival needs at least two"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_survival_labels_are_one_line_and_write_nothing(burden, tmp_path, case):
    store, *_ = burden
    rows, msg = BAD[case]
    labels = write_labels(tmp_path / "l.csv", [{"slide_id": s, "time": t, "event": e} for s, t, e in rows])
    res = _train(store, labels, tmp_path / "run")
    assert msg in _one_line(res)
    assert not (tmp_path / "run").exists()


def test_too_few_events_for_the_folds_constant_target_and_ambiguous_integers(burden, tmp_path):
    store, *_ = burden
    few = write_labels(tmp_path / "few.csv", [{"slide_id": f"s{i:03d}", "time": str(i + 1), "event": str(int(i < 3))}
                                              for i in range(12)])
    assert "3 event(s) among 12 slides, too few for 4 folds" in _one_line(_train(store, few, tmp_path / "r1"))
    const = write_labels(tmp_path / "const.csv", [{"slide_id": f"s{i:03d}", "label": "2.5"} for i in range(8)])
    line = _one_line(_train(store, const, tmp_path / "r2", "--task", "regression"))
    assert "every label is 2.5; a regression target must vary" in line
    ints = write_labels(tmp_path / "ints.csv", [{"slide_id": f"s{i:03d}", "label": str(i)} for i in range(12)])
    line = _one_line(_train(store, ints, tmp_path / "r3"))
    assert "label holds 12 different integers" in line and "--task regression" in line
    with pytest.raises(LabelsError, match="needs both columns time,event; found time"):
        read_labels(write_labels(tmp_path / "t.csv", [{"slide_id": "a", "time": "1"}]))
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))


def test_max_pooling_is_refused_for_survival(burden, tmp_path):
    store, surv, _, _ = burden
    assert "model 'max'" in _one_line(_train(store, surv, tmp_path / "m", "--model", "max"))
    assert not (tmp_path / "m" / "config.json").exists()


def test_predict_evaluate_and_heatmap_titles_take_survival_runs(burden, runs, tmp_path):
    """`mil predict` gives each slide the mean of the fold heads' risks; `mil evaluate` scores a
    cohort with them and its C-index is lifelines' on those very risks; a heatmap title names the
    slide's time, event and risk."""
    from lifelines.utils import concordance_index

    store, surv, _, burden_ = burden
    run = runs["s"]
    res = CliRunner().invoke(mil_app, ["predict", "--run", str(run), "--store", store,
                                       "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0]) == ["slide_id", "risk"] and len(rows) == 64
    risk = np.array([float(r["risk"]) for r in rows])
    assert np.corrcoef(risk, burden_)[0, 1] > 0.7               # the risk tracks the planted burden
    res = CliRunner().invoke(mil_app, ["evaluate", "--run", str(run), "--store", store, "--labels", surv,
                                       "--name", "again", "--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    assert "C-index" in res.output and "Uno's C" in res.output and "external ensemble" in res.output
    ext = tmp_path / "again"
    m = json.loads((ext / "metrics.json").read_text())
    assert m["task"] == "survival" and m["n_training_overlap"] == 64
    lab = read_labels(surv)
    assert m["external"]["ensemble"]["c_index"] == pytest.approx(
        concordance_index(lab.target[:, 0], -risk, lab.target[:, 1]), abs=1e-4)
    assert m["external"]["ensemble"]["risk_groups"]["logrank_p"] < 0.01
    preds = list(csv.DictReader((ext / "predictions.csv").open()))
    assert list(preds[0])[:5] == ["slide_id", "patient_id", "time", "event", "risk"]
    assert "log-rank p" in (ext / "summary.md").read_text()
    from mil.heatmap import slide_title
    from mil.run import load_run

    title = slide_title(load_run(run), "s000")
    assert title.startswith("s000: time ") and ", risk " in title


def test_regression_runs_predict_evaluate_and_compare(burden, runs, tmp_path):
    """A regression run's `mil predict` values are on the target's own scale; `mil evaluate`'s
    Pearson r is scipy's on them; `mil compare` ranks regression runs by Pearson r and refuses
    to put a survival run in the same table."""
    from scipy.stats import pearsonr

    store, surv, reg, _ = burden
    res = CliRunner().invoke(mil_app, ["predict", "--run", str(runs["r0"]), "--store", store,
                                       "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    pred = np.array([float(r["prediction"]) for r in csv.DictReader((tmp_path / "p.csv").open())])
    target = read_labels(reg).target
    assert abs(pred.mean() - target.mean()) < 0.25 * target.std()   # de-standardised with the training scale
    res = CliRunner().invoke(mil_app, ["evaluate", "--run", str(runs["r0"]), "--store", store, "--labels", reg,
                                       "--out", str(tmp_path / "ext")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert m["external"]["ensemble"]["pearson"] == pytest.approx(pearsonr(target, pred)[0], abs=1e-5)
    assert m["external"]["ensemble"]["calibration"]["slope"] is not None
    res = CliRunner().invoke(mil_app, ["compare", str(runs["r0"]), str(runs["r1"]), "--out",
                                       str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert "Pearson r" in res.output
    row = next(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    folds = [f["pearson"] for r in ("r0", "r1")
             for f in json.loads((runs[r] / "metrics.json").read_text())["folds"].values()]
    assert int(row["n"]) == 8 and float(row["pearson_mean"]) == pytest.approx(np.mean(folds), abs=1e-9)
    res = CliRunner().invoke(mil_app, ["compare", str(runs["r0"]), str(runs["s"]), "--out",
                                       str(tmp_path / "cmp2")])
    assert "runs of different tasks cannot share one table" in _one_line(res)


def test_multi_target_labels_train_one_head_per_column_reported_apart(burden, tmp_path):
    """--targets grade,score: one run per column in OUT/<column>/, each its own task (grade:
    classification, score: regression); slides without a grade sit out of the grade run only;
    targets.json puts the two side by side; a missing column is one line."""
    store, _, _, burden_ = burden
    rows = [{"slide_id": f"s{i:03d}", "patient_id": f"p{i:03d}", "grade": "" if i % 8 == 7 else
             ("high" if b > 0.2 else "low"), "score": f"{100 * b:.2f}"} for i, b in enumerate(burden_)]
    labels = write_labels(tmp_path / "multi.csv", rows)
    res = _train(store, labels, tmp_path / "m", "--targets", "grade,score")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "m" / "targets.json").read_text())
    assert summary["targets"] == ["grade", "score"]
    assert summary["runs"]["grade"]["task"] == "classification" and summary["runs"]["score"]["task"] == "regression"
    assert summary["runs"]["grade"]["n_slides"] == 56 and summary["runs"]["score"]["n_slides"] == 64
    grade = json.loads((tmp_path / "m" / "grade" / "config.json").read_text())
    assert grade["classes"] == ["high", "low"]
    assert summary["runs"]["grade"]["mean"]["auc"] > 0.8 and summary["runs"]["score"]["mean"]["pearson"] > 0.7
    assert "grade" in res.output and "score" in res.output and "Pearson r" in res.output and "AUC" in res.output
    line = _one_line(_train(store, labels, tmp_path / "x", "--targets", "grade,stage"))
    assert "missing column(s) stage; found slide_id, patient_id, grade, score" in line
