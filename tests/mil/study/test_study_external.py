"""The study's ``external:`` cohorts: extracted with the same settings, every frozen run scored on
them without retraining, Table V internal vs external, reruns reading the scores back."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from featstore.demo import make_demo_slide
from mil.study.errors import StudyError
from mil.study.study import Study, StudyConfig


def _cohort(folder, n, seed, site=None, sites=0):
    (folder / "slides").mkdir(parents=True)
    rows = []
    for i in range(n):
        pos = i % 2 == 1
        make_demo_slide(folder / "slides" / f"{folder.name}{i}.tif", np.random.default_rng(seed + i), pos,
                        size=(1536, 1024), site=site)
        rows.append({"slide_id": f"{folder.name}{i}", "label": "tumor" if pos else "normal",
                     **({"site": f"H{(i // 2) % sites}"} if sites else {})})
    with (folder / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "label"] + (["site"] if sites else []))
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


def test_two_stain_styles_macenko_site_preserved_internal_and_external(tmp_path):
    """Issue 18's acceptance: cohort A (4 hospitals) and cohort B in another stain style; Macenko
    fitted to an A slide; site-preserved CV on A; B scored externally; all in one report."""
    from featstore.store import open_store

    _cohort(tmp_path / "a", 8, 0, sites=4)
    _cohort(tmp_path / "b", 4, 100, site="site-b")
    doc = {"name": "sites", "slides": "a/slides", "labels": "a/labels.csv", "store": "a.zarr",
           "encoders": [{"name": "resnet18", "weights": "random", "levels": [0]}], "seeds": [0], "folds": 2,
           "split": "site-preserved", "tiling": {"patch_size": 256, "mpp": 1.0},
           "extract": {"input_size": 64, "precision": "fp32", "stain": "macenko",
                       "stain_reference": "a/slides/a0.tif", "stain_tiles": 8},
           "mil": {"epochs": 3, "patience": 0}, "cka": False, "heatmaps": 0,
           "external": [{"name": "site-b", "slides": "b/slides", "labels": "b/labels.csv"}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(doc))
    res = Study(StudyConfig.from_yaml(tmp_path / "study.yaml")).run()
    assert res.failures == [], res.failures
    run = next((tmp_path / "study" / "runs").iterdir())
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["split"] == "site-preserved" and "-stain-macenko-" in cfg["weights"]
    for fold in cfg["splits"].values():       # a hospital never on both sides
        sides = fold["sites"]
        assert not set(sides["test"]) & (set(sides["train"]) | set(sides["val"]))
    st = open_store(tmp_path / "site-b.zarr")
    prov = st.provenance(st.slide_ids()[0], "resnet18", 0, cfg["weights"])
    assert prov["stain"]["method"] == "macenko" and "a0.tif" in prov["stain"]["source"]
    report = res.report.read_text()
    assert "Stain: **macenko**" in report and "## Table V" in report
    row = next(ln for ln in report.splitlines() if ln.startswith("| site-b"))
    assert row.split("|")[4].strip() not in ("", "-") and row.split("|")[5].strip() not in ("", "-")
    # the QC rows: the A slides' tiles, already close to the reference, stay close
    qc = [ln for ln in report.splitlines() if ln.startswith("| a")]
    assert qc and all(float(ln.split("|")[3]) < 10 for ln in qc)
