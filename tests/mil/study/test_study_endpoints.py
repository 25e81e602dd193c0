"""Studies of survival and regression endpoints on generated slides whose lesion burden (0-4
lesions) sets an exponential hazard (with censoring) and a continuous score: the study reads
the task from the YAML, ranks configurations by C-index / Pearson r, and its report carries the
C-index tables, the Kaplan-Meier picture with its log-rank p and the regression calibration."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from featstore.cli import featstore_app
from featstore.demo import make_demo_slide
from mil.study.errors import StudyError
from mil.study.forms import load_study

N_SLIDES = 30


@pytest.fixture(scope="module")
def burden_dir(tmp_path_factory) -> Path:
    """30 slides of 0-4 lesions; survival.csv (time, event: hazard x4.5 per lesion, ~25 % censored)
    and score.csv (10 x lesions + noise)."""
    d = tmp_path_factory.mktemp("burden")
    (d / "slides").mkdir()
    rng = np.random.default_rng(7)
    surv, score = [], []
    for i in range(N_SLIDES):
        n = i % 5
        make_demo_slide(d / "slides" / f"s{i:02d}.tif", np.random.default_rng(100 + i), n > 0, size=(1536, 1024),
                        strength=0.6, mimic_strength=0.0, n_lesions=n, radius=(0.08, 0.12))
        t = rng.exponential(1.0 / (0.05 * np.exp(1.5 * n)))
        censored = rng.random() < 0.25
        time = rng.uniform(0, t) if censored else t
        surv.append({"slide_id": f"s{i:02d}", "time": f"{time:.3f}", "event": int(not censored)})
        score.append({"slide_id": f"s{i:02d}", "label": f"{10 * n + rng.normal(0, 1):.2f}"})
    for name, rows in (("survival.csv", surv), ("score.csv", score)):
        with (d / name).open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return d


def _study(d: Path, name: str, task: str, labels: str, **extra) -> Path:
    study = {"name": name, "task": task, "slides": ["slides"], "labels": labels, "store": "cohort.zarr",
             "out": name, "encoders": [{"name": "resnet18", "weights": "random", "levels": [0, 3]}],
             "seeds": [0], "folds": 3, "tiling": {"patch_size": 64, "mpp": 1.0},
             "extract": {"input_size": 64, "precision": "fp32", "batch_size": 16},
             "mil": {"epochs": 20, "patience": 0, "lr": 1e-3, **({"cox_batch": 8} if task == "survival" else {})},
             "cka": False, "heatmaps": 1, **extra}
    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _images(report: str, base: Path) -> list[Path]:
    return [base / ln.split("](")[1].rstrip(")") for ln in report.splitlines() if ln.startswith("![")]


def test_survival_study_ranks_by_c_index_and_draws_kaplan_meier(burden_dir):
    """... and fine-tunes the best configuration on the C-index too."""
    ft = {"enabled": True, "k": 4, "epochs": 1, "micro_batch": 4, "precision": "fp32", "n_boot": 50,
          "eval_tiles": "topk"}
    path = _study(burden_dir, "surv", "survival", "survival.csv", finetune=ft)
    res = CliRunner().invoke(featstore_app, ["study", str(path)])
    assert res.exit_code == 0, res.output
    out = burden_dir / "surv"
    report = (out / "report" / "report.md").read_text()
    assert "endpoint **survival** (ranked by Harrell's C-index" in report
    assert "| C-index mean ± sd | 95% CI | Uno's C | td-AUC | Δ C-index vs baseline |" in report
    assert "## Table II: C-index by truncation level" in report and "## Kaplan-Meier curves" in report
    assert "log-rank p" in report and "## ROC" not in report
    assert all(p.is_file() for p in _images(report, out / "report"))
    assert any(p.name == "km.png" for p in _images(report, out / "report"))
    rows = list(csv.DictReader((out / "report" / "frozen" / "compare.csv").open()))
    assert {r["minus"] for r in rows} == {"0", "3"} and "c_index_mean" in rows[0]
    best = max(float(r["c_index_mean"]) for r in rows)
    assert best > 0.75, rows                                 # lesion burden sets the hazard
    answers = report.split("## Answers")[1].split("##")[0]
    assert f"C-index {best:.3f}" in answers and "frozen C-index" in answers
    assert "| model | slides | C-index | 95% CI | Uno's C | td-AUC |" in report.split("## Table III")[1]
    # report.html: the same tables, and each configuration a link into `featstore view`
    page = (out / "report" / "report.html").read_text()
    assert "<table>" in page and "C-index" in page and "featstore view " in page
    for r in rows:
        run = f"resnet18-random-minus{r['minus']}-seed0"
        assert f'href="http://127.0.0.1:8765/?run={run}"' in page, run
    # an external cohort's table (Table V) names the endpoint's metric too
    from mil.study.report import _external_table

    rec = {"cohort": "b", "encoder": "resnet18", "weights": "random", "minus": 0, "seed": 0, "metric": "C-index",
           "internal_auc": 0.8, "external_auc": 0.7, "external_ci": [0.6, 0.8], "n_external": 9}
    table = _external_table([rec])
    assert "| internal C-index | external C-index | drop |" in table[0] and "| 0.800 | 0.700 | +0.100 |" in table[2]


def test_regression_study_reports_pearson_and_calibration(burden_dir):
    res = CliRunner().invoke(featstore_app, ["study", str(_study(burden_dir, "reg", "regression", "score.csv"))])
    assert res.exit_code == 0, res.output
    out = burden_dir / "reg"
    report = (out / "report" / "report.md").read_text()
    assert "endpoint **regression**" in report and "| Pearson r mean ± sd |" in report
    assert "## Calibration of the best frozen configuration" in report and "calibration line true = " in report
    assert all(p.is_file() for p in _images(report, out / "report"))
    rows = list(csv.DictReader((out / "report" / "frozen" / "compare.csv").open()))
    assert max(float(r["pearson_mean"]) for r in rows) > 0.75, rows
    best = json.loads(next((out / "runs").glob("*/metrics.json")).read_text())
    assert set(best["pooled"]["calibration"]) == {"slope", "intercept", "mean_error"}
    # the extraction was shared with the survival study's store: nothing extracted twice
    assert json.loads((out / "study.json").read_text())["endpoint"] == "regression"


def test_study_refuses_what_it_cannot_run_in_one_line(burden_dir, tmp_path):
    path = _study(burden_dir, "bad", "survival", "survival.csv", level="patient", finetune={"enabled": True})
    with pytest.raises(StudyError, match="level: patient: top-k fine-tuning takes slide-level runs for now"):
        load_study(path)
    path = _study(burden_dir, "bad", "hazard", "survival.csv")
    with pytest.raises(StudyError, match="task: 'hazard'; choose patch or segmentation, or classification, survival, regression"):
        load_study(path)
