"""`featstore study` with ``task: patch``: labelled images -> image store -> probes + fine-tuning ->
report, end to end on scikit-learn's digits; a bad key fails before any work."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from mil.study.errors import StudyError
from mil.study.forms import load_study
from mil.study.patchstudy import PatchStudyConfig
from tests.mil.patches.test_run import write_digits

STUDY = {
    "task": "patch", "name": "digits", "images": "digits", "store": "digits.zarr", "out": "study",
    "encoders": [{"name": "resnet18", "weights": ["random"], "levels": [3]}],
    "seeds": [0, 1], "train_fractions": [0.5, 1.0], "methods": ["logreg", "knn"],
    "extract": {"input_size": 32, "precision": "fp32"}, "patches": {"n_boot": 100},
    "finetune": {"enabled": True, "levels": [3], "epochs": 1, "augment": False, "precision": "fp32"},
}


def test_patch_study_end_to_end_and_rerun_does_nothing_new(tmp_path):
    from featstore.cli import featstore_app

    write_digits(tmp_path / "digits", n_per_class=20)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(STUDY))
    r = CliRunner().invoke(featstore_app, ["study", str(tmp_path / "s.yaml")])
    assert r.exit_code == 0, r.output
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    assert "Table I" in report and "logreg" in report and "knn" in report and "finetune" in report
    assert "ECE after T" in report and "Failures" in report and "None." in report
    runs = sorted(p.name for p in (tmp_path / "study" / "patches" / "runs").iterdir())
    assert len(runs) == 1 * 2 * 2 * 2 + 2 * 2      # levels x seeds x fractions x probes + finetune seeds x fractions
    assert (tmp_path / "study" / "report" / "balanced_accuracy_vs_fraction.png").is_file()
    page = (tmp_path / "study" / "report" / "report.html").read_text()     # the same report, as HTML
    assert "<table>" in page and "ECE after T" in page and 'src="balanced_accuracy_vs_fraction.png"' in page
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "study" / "patches" / "runs").glob("*/config.json")}
    r = CliRunner().invoke(featstore_app, ["study", str(tmp_path / "s.yaml")])
    assert r.exit_code == 0 and "'extracted_images': 0" in r.output
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


@pytest.mark.parametrize("patch, match", [
    ({"patches": {"nope": 1}}, "patches"),
    ({"methods": ["svm"]}, "svm"),
    ({"finetune": {"enabled": True, "epochs": "many"}}, "finetune"),
    ({"encoders": [{"name": "resnet18", "levels": [9]}]}, "encoders"),
])
def test_bad_keys_fail_before_any_work(tmp_path, patch, match):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**STUDY, **patch}))
    with pytest.raises(StudyError, match=match):
        load_study(tmp_path / "s.yaml")
    assert not (tmp_path / "digits.zarr").exists()


def test_a_slide_study_file_still_loads_as_one(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"slides": ["x"], "labels": "l.csv",
                                                     "encoders": ["resnet18"]}))
    assert not isinstance(load_study(tmp_path / "s.yaml"), PatchStudyConfig)
