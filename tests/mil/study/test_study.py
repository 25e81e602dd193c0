"""A tiny study end to end: 2 encoders x 2 levels x 2 seeds on generated slides, report, rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mil.study.errors import StudyError
from mil.study.study import Study, StudyConfig
from featstore.cli import featstore_app
from featstore.demo import make_demo_slide

import csv

import numpy as np


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("study")
    (d / "slides").mkdir()
    rows = []
    for i in range(8):
        pos = i % 2 == 1
        make_demo_slide(d / "slides" / f"s{i}.tif", np.random.default_rng(i), pos, size=(1536, 1024))
        rows.append({"slide_id": f"s{i}", "label": "tumor" if pos else "normal", "patient_id": f"p{i}"})
    with (d / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "label", "patient_id"])
        w.writeheader()
        w.writerows(rows)
    # one broken slide: reported, the study goes on
    (d / "slides" / "broken.tif").write_text("not a slide")
    study = {
        "name": "tiny",
        "slides": ["slides"],
        "labels": "labels.csv",
        "encoders": [{"name": "resnet18", "weights": "random", "levels": [0, 2]},
                     {"name": "efficientnet_b0", "weights": "random", "levels": [0, 2]}],
        "seeds": [0, 1],
        "folds": 2,
        "tiling": {"patch_size": 256, "mpp": 1.0},
        "extract": {"input_size": 64, "precision": "fp32", "batch_size": 16},
        "mil": {"epochs": 5, "patience": 0},
        "finetune": {"enabled": True, "k": 2, "epochs": 1, "eval_tiles": "topk", "micro_batch": 4,
                     "precision": "fp32", "n_boot": 50},
        "heatmaps": 1,
    }
    (d / "study.yaml").write_text(yaml.safe_dump(study))
    return d


def test_tiny_study_end_to_end_then_rerun_does_nothing_new(study_dir):
    res = CliRunner().invoke(featstore_app, ["study", str(study_dir / "study.yaml")])
    assert res.exit_code == 0, res.output
    out = study_dir / "study"
    report = (out / "report" / "report.md").read_text()
    for heading in ("## Answers", "## Table I", "## Table II", "## Table III", "## CKA", "## ROC curves",
                    "## Attention heatmaps", "## Failures"):
        assert heading in report, heading
    # every promised image exists where the report points
    for rel in [l.split("](")[1].rstrip(")") for l in report.splitlines() if l.startswith("![")]:
        assert (out / "report" / rel).is_file(), rel
    assert (out / "report" / "cka.csv").is_file() and (out / "report" / "frozen" / "compare.csv").is_file()
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len([r for r in runs if not r.endswith("-ft")]) == 2 * 2 * 2
    assert len([r for r in runs if r.endswith("-ft")]) == 1
    assert "broken" in report  # the broken slide is listed under failures
    # Table I has one row per encoder x level (4 groups), each with 2 runs x 2 folds
    table = [l for l in report.split("## Table I")[1].split("##")[0].splitlines() if l.startswith("| ") and "train" in l]
    assert len(table) == 4 and all("| 2 x 2 |" in l for l in table)

    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.json")}
    cfg = StudyConfig.from_yaml(study_dir / "study.yaml")
    result = Study(cfg).run()
    assert result.new_work == {"extracted_tiles": 0, "trained_runs": 0, "finetuned_runs": 0, "pretrained_encoders": 0}
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.json")} == before


def test_study_file_errors(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("slides: [x]\nlabels: l.csv\nencoders: [resnet18]\nfoo: 1\n")
    with pytest.raises(StudyError, match=r"unknown keys \['foo'\]"):
        StudyConfig.from_yaml(bad)
    bad.write_text("slides: [x]\n")
    with pytest.raises(StudyError, match="missing keys"):
        StudyConfig.from_yaml(bad)
    with pytest.raises(StudyError, match="no such study file"):
        StudyConfig.from_yaml(tmp_path / "nope.yaml")
    cfg_text = "slides: [x]\nlabels: l.csv\nencoders: [{name: resnet18, weights: random, depth: 2}]\n"
    bad.write_text(cfg_text)
    with pytest.raises(StudyError, match="unknown keys"):
        StudyConfig.from_yaml(bad)
    good = tmp_path / "g.yaml"
    good.write_text("slides: data/slides\nlabels: data/labels.csv\nencoders: [resnet18]\n")
    cfg = StudyConfig.from_yaml(good)
    assert cfg.slides == [str(tmp_path / "data/slides")] and cfg.encoders[0].levels == [0, 1, 2, 3]
    assert cfg.store == str(tmp_path / "cohort.zarr")
    json.dumps(cfg.to_dict())


def test_study_pretrains_on_its_cohort_and_compares_with_random(study_dir, tmp_path):
    """weights [random, pretrain]: SimCLR per fraction on the store's tiles, each checkpoint
    extracted and trained like any weights, and Table I holds them beside random."""
    study = yaml.safe_load((study_dir / "study.yaml").read_text())
    study.update({"encoders": [{"name": "resnet18", "weights": ["random", "pretrain"], "levels": [0]}],
                  "slides": [str(study_dir / "slides")], "labels": str(study_dir / "labels.csv"),
                  "seeds": [0], "finetune": {"enabled": False}, "cka": False, "heatmaps": 0,
                  "pretrain": {"fractions": [0.5, 1.0], "epochs": 1, "batch_size": 8, "precision": "fp32",
                               "holdout": 2, "lr": 1e-3}})
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    result = Study(StudyConfig.from_yaml(tmp_path / "study.yaml")).run()
    assert result.new_work["pretrained_encoders"] == 2, result.failures
    runs = sorted(p.name for p in (tmp_path / "study" / "runs").iterdir())
    assert runs == ["resnet18-pretrain-f0.5-minus0-seed0", "resnet18-pretrain-f1-minus0-seed0",
                    "resnet18-random-minus0-seed0"]
    cfg = json.loads((tmp_path / "study" / "runs" / runs[0] / "config.json").read_text())
    assert json.dumps(cfg).count("pretrain-simclr-resnet18-f0.5-") >= 1
    table = (tmp_path / "study" / "report" / "report.md").read_text().split("## Table I")[1].split("##")[0]
    assert "pretrain-simclr-resnet18-f0.5-" in table and "pretrain-simclr-resnet18-f1-" in table and "random" in table
    again = Study(StudyConfig.from_yaml(tmp_path / "study.yaml")).run()
    assert again.new_work == {"extracted_tiles": 0, "trained_runs": 0, "finetuned_runs": 0, "pretrained_encoders": 0}

