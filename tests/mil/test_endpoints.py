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


def test_survival_run_beats_chance_reproducibly(burden, tmp_path):
    store, surv, _, _ = burden
    res = _train(store, surv, tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert "C-index" in res.output and "Uno's C" in res.output
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["mean"]["c_index"] > 0.65 and m["mean"]["c_index_uno"] > 0.65
    assert m["pooled"]["logrank_p"] < 0.01 and m["pooled"]["events_high"] > 0
    with (tmp_path / "a" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "time", "event", "risk", "fold"] and len(rows) == 64
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["task"] == "survival" and cfg["survival_loss"] == "cox" and cfg["classes"] == []
    assert (tmp_path / "a" / "km.png").is_file() and not (tmp_path / "a" / "roc.png").exists()
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


def test_regression_run_tracks_the_score(burden, tmp_path):
    store, _, reg, _ = burden
    res = _train(store, reg, tmp_path / "r")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["mean"]["pearson"] > 0.7 and m["mean"]["r2"] > 0.4
    with (tmp_path / "r" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "target", "prediction", "fold"]
    assert (tmp_path / "r" / "scatter.png").is_file()


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


def test_commands_not_built_for_survival_yet_say_so_in_one_line(burden, tmp_path):
    store, surv, _, _ = burden
    assert _train(store, surv, tmp_path / "s", "--epochs", "2").exit_code == 0
    res = CliRunner().invoke(mil_app, ["predict", "--run", str(tmp_path / "s"), "--store", store])
    line = _one_line(res)
    assert "mil predict takes classification runs for now" in line and "survival run" in line
    from mil.heatmap import slide_title
    from mil.run import load_run

    run = load_run(tmp_path / "s")
    assert run.task == "survival"
    title = slide_title(run, "s000")
    assert title.startswith("s000: time ") and ", risk " in title
