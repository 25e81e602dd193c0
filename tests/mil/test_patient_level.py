"""`mil train --level patient`: a patient's slides (1-4 here) pooled into one bag, one prediction
per patient, attention cut back into each slide (so heatmaps stay per slide); slide-level runs
report patient metrics by late fusion; patients whose slides disagree are refused in one line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featstore.cli import mil_app
from featstore.core.errors import LabelsError
from featstore.core.labels import pool_patients, read_labels
from featstore.store import open_store
from mil.data import PatientBags, load_bags
from mil.metrics import fold_metrics
from tests.mil.conftest import KEY, write_labels, write_store


def patient_cohort(tmp, n_patients: int = 32, seed: int = 0):
    """(store, labels, members, lesion slide per positive patient): patient i holds 1 + i % 4
    slides; a positive patient (odd i) carries the planted instances in ONE of its slides only,
    the others look normal, so each slide's own label would be wrong for all but that slide."""
    rng = np.random.default_rng(seed)
    bags, rows, members, lesion = {}, [], {}, {}
    for i in range(n_patients):
        pid, label = f"p{i:02d}", i % 2
        ids = [f"{pid}-s{j}" for j in range(1 + i % 4)]
        members[pid] = ids
        hit = ids[int(rng.integers(len(ids)))] if label else None
        for sid in ids:
            x = rng.standard_normal((int(rng.integers(20, 40)), 16)).astype(np.float32)
            if sid == hit:
                x[rng.choice(len(x), 4, replace=False), 0] += 6.0
            bags[sid] = x
            rows.append({"slide_id": sid, "label": ["normal", "tumor"][label], "patient_id": pid})
        if hit:
            lesion[pid] = hit
    store = write_store(tmp / "p.zarr", bags)
    return store, write_labels(tmp / "labels.csv", rows), members, lesion, bags


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return patient_cohort(tmp_path_factory.mktemp("patients"))


def _train(store, labels, out, *extra):
    return CliRunner().invoke(mil_app, ["train", "--store", store, "--labels", labels, "--encoder", "resnet18",
                                        "--minus", "1", "--folds", "4", "--epochs", "15", "--out", str(out),
                                        "--seed", "0", *extra])


def test_pooling_makes_one_bag_per_patient_of_all_its_slides(cohort):
    store, labels, members, _, bags = cohort
    pooled, got = pool_patients(read_labels(labels))
    assert list(pooled.slide_ids) == list(members) and {p: list(s) for p, s in got.items()} == members
    assert sorted(len(s) for s in got.values())[::8] == [1, 2, 3, 4]
    assert list(pooled.y) == [i % 2 for i in range(len(members))]
    slides = load_bags(open_store(store), [s for m in members.values() for s in m], KEY)
    units = PatientBags(slides, got)
    four = "p03"
    bag = units[four]
    assert bag.shape[0] == sum(len(bags[s]) for s in members[four]) and len(members[four]) == 4
    np.testing.assert_allclose(bag.numpy(), np.concatenate([bags[s] for s in members[four]]), atol=1e-2)
    streamed = dict(units.iterate(["p01", four, "p00"]))
    assert all(np.array_equal(streamed[p].numpy(), units[p].numpy()) for p in streamed)
    cut = units.split_attention(four, np.arange(bag.shape[0], dtype=np.float32))
    assert [len(cut[s]) for s in members[four]] == [len(bags[s]) for s in members[four]]
    assert cut[members[four][1]][0] == len(bags[members[four][0]])   # rows continue across slides


def test_patient_run_scores_patients_and_keeps_attention_per_slide(cohort, tmp_path):
    store, labels, members, lesion, bags = cohort
    res = _train(store, labels, tmp_path / "run", "--level", "patient")
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    assert rows[0].keys() >= {"patient_id", "slides", "label", "probability", "fold"}
    assert sorted(r["patient_id"] for r in rows) == sorted(members)
    assert all(r["slides"].split(";") == members[r["patient_id"]] for r in rows)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["level"] == "patient" and metrics["mean"]["auc"] > 0.8, metrics["mean"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["level"] == "patient" and cfg["n_units"] == len(members) and cfg["n_slides"] == len(bags)
    att = np.load(run / "attention.npz")
    by_slide = {k.split("/", 1)[1]: att[k] for k in att.files}
    assert set(by_slide) == set(bags)                                  # every slide once, at its own length
    assert all(len(by_slide[s]) == len(bags[s]) for s in bags)
    # in a positive patient the head attends most to the lesion slide's planted instances
    found = 0
    for pid, hit in lesion.items():
        top = max(members[pid], key=lambda s: by_slide[s].max())
        found += top == hit
    assert found >= 0.8 * len(lesion), (found, len(lesion))


def test_heatmap_title_names_the_patient_row(cohort, tmp_path):
    from mil.heatmap import slide_title
    from mil.run import load_run

    store, labels, members, lesion, _ = cohort
    assert _train(store, labels, tmp_path / "run", "--level", "patient", "--epochs", "2").exit_code == 0
    sid = members["p03"][2]
    title = slide_title(load_run(tmp_path / "run"), sid)
    assert title.startswith(f"{sid} (patient p03): true tumor, P(tumor) = "), title


def test_slide_run_reports_patient_metrics_by_late_fusion(cohort, tmp_path):
    store, labels, members, *_ = cohort
    res = _train(store, labels, tmp_path / "run")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["level"] == "slide" and m["patient"]["n_patients"] == len(members)
    # the fused AUC of a fold is the AUC of the mean of each test patient's slide probabilities
    rows = list(csv.DictReader((tmp_path / "run" / "predictions.csv").open()))
    fold = rows[0]["fold"]
    probs: dict[str, list[float]] = {}
    truth = {}
    patient_of = {s: p for p, ss in members.items() for s in ss}
    for r in rows:
        if r["fold"] == fold:
            p = patient_of[r["slide_id"]]
            probs.setdefault(p, []).append(float(r["probability"]))
            truth[p] = int(r["label"] == "tumor")
    ps = sorted(probs)
    p1 = np.array([np.mean(probs[p]) for p in ps])
    want = fold_metrics(np.array([truth[p] for p in ps]), np.stack([1 - p1, p1], 1), n_boot=10)["auc"]
    assert m["patient"]["folds"][fold]["auc"] == pytest.approx(want, abs=1e-6)
    assert m["patient"]["folds"][fold]["n"] == len(ps) < sum(r["fold"] == fold for r in rows)


def test_a_patient_whose_slides_disagree_is_one_line(tmp_path):
    rows = [{"slide_id": "a", "label": "x", "patient_id": "p1"}, {"slide_id": "b", "label": "y", "patient_id": "p1"},
            {"slide_id": "c", "label": "x", "patient_id": "p2"}, {"slide_id": "d", "label": "y", "patient_id": "p3"}]
    path = write_labels(tmp_path / "l.csv", rows)
    with pytest.raises(LabelsError, match=r"patient\(s\) p1 have slides with different label; --level patient"):
        pool_patients(read_labels(path))
    surv = write_labels(tmp_path / "s.csv", [{"slide_id": "a", "time": "3", "event": "1", "patient_id": "p1"},
                                             {"slide_id": "b", "time": "5", "event": "1", "patient_id": "p1"},
                                             {"slide_id": "c", "time": "5", "event": "1", "patient_id": "p2"}])
    with pytest.raises(LabelsError, match=r"different time,event"):
        pool_patients(read_labels(surv))


def test_patient_run_evaluates_the_patients_of_another_cohort(cohort, tmp_path):
    """`mil evaluate` of a --level patient run pools the external cohort's slides by patient too:
    one row per patient, and the ensemble AUC is that of the rows' probabilities."""
    store, labels, *_ = cohort
    assert _train(store, labels, tmp_path / "run", "--level", "patient").exit_code == 0
    ext_store, ext_labels, members, *_ = patient_cohort(tmp_path, n_patients=20, seed=5)
    res = CliRunner().invoke(mil_app, ["evaluate", "--run", str(tmp_path / "run"), "--store", ext_store,
                                       "--labels", ext_labels, "--name", "site2"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "run" / "external" / "site2"
    m = json.loads((out / "metrics.json").read_text())
    assert m["level"] == "patient" and m["n_patients"] == 20 and m["n_slides"] == sum(map(len, members.values()))
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert list(rows[0])[:3] == ["patient_id", "slides", "label"] and len(rows) == 20
    assert all(r["slides"].split(";") == members[r["patient_id"]] for r in rows)
    p1 = np.array([float(r["prob_tumor"]) for r in rows])
    y = np.array([int(r["label"] == "tumor") for r in rows])
    ens = m["external"]["ensemble"]
    assert ens["auc"] == pytest.approx(fold_metrics(y, np.stack([1 - p1, p1], 1), n_boot=10)["auc"], abs=1e-9)
    assert ens["auc"] > 0.8


def test_commands_not_built_for_patient_runs_say_so_in_one_line(cohort, tmp_path):
    store, labels, *_ = cohort
    assert _train(store, labels, tmp_path / "run", "--level", "patient", "--epochs", "1").exit_code == 0
    for cmd in (["predict", "--run", str(tmp_path / "run"), "--store", store],
                ["finetune", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "ft")]):
        res = CliRunner().invoke(mil_app, cmd)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 1 and len(lines) == 1, res.output
        assert f"mil {cmd[0]} takes slide-level runs for now" in lines[0] and "--level patient" in lines[0]
    assert not (tmp_path / "ft").exists()


def test_slide_run_evaluated_on_another_cohort_adds_patient_metrics(cohort, tmp_path):
    """A slide-level run's external evaluation fuses each patient's slide probabilities too."""
    store, labels, *_ = cohort
    assert _train(store, labels, tmp_path / "run").exit_code == 0
    ext_store, ext_labels, members, *_ = patient_cohort(tmp_path, n_patients=20, seed=5)
    res = CliRunner().invoke(mil_app, ["evaluate", "--run", str(tmp_path / "run"), "--store", ext_store,
                                       "--labels", ext_labels, "--name", "site2"])
    assert res.exit_code == 0, res.output
    assert "external patients (mean of slides)" in res.output
    out = tmp_path / "run" / "external" / "site2"
    m = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    probs: dict[str, list[float]] = {}
    truth = {}
    for r in rows:
        probs.setdefault(r["patient_id"], []).append(float(r["prob_tumor"]))
        truth[r["patient_id"]] = int(r["label"] == "tumor")
    ps = sorted(probs)
    p1 = np.array([np.mean(probs[p]) for p in ps])
    want = fold_metrics(np.array([truth[p] for p in ps]), np.stack([1 - p1, p1], 1), n_boot=10)["auc"]
    assert m["external"]["patient"]["n_patients"] == 20 and m["external"]["patient"]["auc"] == pytest.approx(want)
