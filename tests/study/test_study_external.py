"""The study's ``external:`` cohorts: extracted with the same settings, every frozen run scored on
them without retraining, Table V internal vs external, reruns reading the scores back."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from featstore.demo import make_demo_slide
from study.errors import StudyError
from study.study import Study, StudyConfig


def _cohort(folder, n, seed):
    (folder / "slides").mkdir(parents=True)
    rows = []
    for i in range(n):
        pos = i % 2 == 1
        make_demo_slide(folder / "slides" / f"{folder.name}{i}.tif", np.random.default_rng(seed + i), pos,
                        size=(1536, 1024))
        rows.append({"slide_id": f"{folder.name}{i}", "label": "tumor" if pos else "normal"})
    with (folder / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "label"])
        w.writeheader()
        w.writerows(rows)


def test_external_cohort_table_and_rerun(tmp_path):
    _cohort(tmp_path / "a", 8, 0)
    _cohort(tmp_path / "b", 4, 100)
    doc = {"name": "ext", "slides": "a/slides", "labels": "a/labels.csv", "store": "a.zarr",
           "encoders": [{"name": "resnet18", "weights": "random", "levels": [0]}], "seeds": [0, 1], "folds": 2,
           "tiling": {"patch_size": 256, "mpp": 1.0}, "extract": {"input_size": 64, "precision": "fp32"},
           "mil": {"epochs": 3, "patience": 0}, "cka": False, "heatmaps": 0,
           "external": [{"name": "site-b", "slides": "b/slides", "labels": "b/labels.csv"}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**doc, "external": [{"name": "site-b", "slides": "b/slides"}]}))
    with pytest.raises(StudyError, match=r"external\[0\]"):
        StudyConfig.from_yaml(path)
    path.write_text(yaml.safe_dump(doc))
    res = Study(StudyConfig.from_yaml(path)).run()
    assert (tmp_path / "site-b.zarr").is_dir()
    assert res.new_work["external_evaluations"] == 2 and not [f for f in res.failures if "site-b" in f["stage"]]
    scored = [json.loads((tmp_path / "study" / "runs" / f"resnet18-random-minus0-seed{s}" / "external" / "site-b" /
                          "metrics.json").read_text()) for s in (0, 1)]
    assert all(m["n_slides"] == 4 for m in scored)
    report = res.report.read_text()
    assert "## Table V: internal vs external validation" in report
    row = next(ln for ln in report.splitlines() if ln.startswith("| site-b"))
    cells = [c.strip() for c in row.split("|")]
    ext = [m["external"]["ensemble"]["auc"] for m in scored]
    assert cells[3] == "2" and cells[5].startswith(f"{np.mean(ext):.3f}")
    again = Study(StudyConfig.from_yaml(path)).run()
    assert "external_evaluations" not in again.new_work and "| site-b" in again.report.read_text()
