"""A valid small cohort (8 slides, 4 per class) never ends in a traceback: the default hold-out
shrinks to what the rarest class allows, and a --folds the classes cannot fill is one line that
says which --folds would work."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from featstore.cli import mil_app
from featstore.core.labels import read_labels
from mil.data import make_splits
from mil.errors import LabelsError
from tests.mil.conftest import planted_cohort, write_labels


@pytest.fixture
def small(tmp_path):
    store, rows, _, y = planted_cohort(tmp_path / "s.zarr", 8, dim=8, n_inst=(10, 20), k=2, seed=3)
    assert sorted(y.tolist()) == [0] * 4 + [1] * 4
    return store, write_labels(tmp_path / "labels.csv", rows)


def _train(store, labels, out, *extra):
    return CliRunner().invoke(mil_app, ["train", "--store", store, "--labels", labels, "--encoder", "resnet18",
                                        "--minus", "1", "--epochs", "2", "--out", str(out), *extra])


def test_default_hold_out_on_8_slides_trains(small, tmp_path, caplog):
    store, labels = small
    with caplog.at_level(logging.WARNING, logger="mil.data"):
        (fold,) = make_splits(read_labels(labels))
    assert len(fold.test) == 2 and "holding out 1/4" in caplog.text   # 1/5 impossible with 4 per class
    res = _train(store, labels, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_too_many_folds_is_one_line_naming_what_works(small, tmp_path):
    store, labels = small
    res = _train(store, labels, tmp_path / "run5", "--folds", "5")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "--folds 5 needs 5 patients of every class" in lines[0] and "use --folds 4 or fewer" in lines[0]
    assert "Traceback" not in res.output and not (tmp_path / "run5" / "metrics.json").exists()
    assert _train(store, labels, tmp_path / "run4", "--folds", "4").exit_code == 0


def test_a_class_with_one_patient_cannot_be_split(tmp_path):
    rows = [{"slide_id": f"s{i}", "label": "a" if i else "b"} for i in range(6)]
    with pytest.raises(LabelsError, match=r"class 'b' has 1 patient\(s\) \(a: 5, b: 1\)"):
        make_splits(read_labels(write_labels(tmp_path / "l.csv", rows)))
