"""`mil finetune` of survival and regression runs on real slides: the task's loss through the
encoder (Cox over a batch of bags, MSE on the scaled target), the frozen head scored exactly as
`mil train` scored it, the task's metrics and picture, and a risk cut for the Kaplan-Meier split."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featstore.cli import mil_app
from featstore.cohort import discover_slides
from featstore.demo import make_demo_slide
from featstore.extract import ExtractConfig, Extractor
from featstore.tiling import TilingConfig
from mil.train import RunSpec, TrainConfig, train_run

SPLIT = ["train"] * 8 + ["val"] * 3 + ["test"] * 5
FT = ["--k", "4", "--epochs", "2", "--lr", "1e-3", "--micro-batch", "4", "--precision", "fp32", "--workers", "1",
      "--threads", "1"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """16 slides of 0-3 lesions in a resnet18 minus2 store; survival and regression labels."""
    root = tmp_path_factory.mktemp("ftend")
    (root / "slides").mkdir()
    rng = np.random.default_rng(3)
    surv, reg = [], []
    for i in range(16):
        n = i % 4
        make_demo_slide(root / "slides" / f"s{i:02d}.tif", np.random.default_rng(50 + i), n > 0, size=(768, 768),
                        strength=0.6, mimic_strength=0.0, n_lesions=n, radius=(0.1, 0.15))
        t = rng.exponential(1.0 / (0.1 * np.exp(1.2 * n)))
        event = int(i % 5 != 4)            # 3 censored slides, one in each split
        surv.append([f"s{i:02d}", f"{t:.3f}", event, SPLIT[i]])
        reg.append([f"s{i:02d}", f"{10 * n + rng.normal():.2f}", SPLIT[i]])
    for name, header, rows in (("surv.csv", ["slide_id", "time", "event", "split"], surv),
                               ("reg.csv", ["slide_id", "label", "split"], reg)):
        with (root / name).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    cfg = ExtractConfig(encoder="resnet18", weights="random", levels=(2,), tiling=TilingConfig(patch_size=64, mpp=1.0),
                        input_size=64, precision="fp32", batch_size=16, workers=1, device="cpu")
    assert Extractor(cfg).run(discover_slides([root / "slides"]), root / "c.zarr").ok
    return root


def _rows(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("task, labels, column", [("survival", "surv.csv", "risk"), ("regression", "reg.csv", "prediction")])
def test_finetune_takes_survival_and_regression_runs(cohort, tmp_path, task, labels, column):
    run, ft = tmp_path / "run", tmp_path / "ft"
    extra = {"cox_batch": 4} if task == "survival" else {}
    train_run(RunSpec(str(cohort / "c.zarr"), str(cohort / labels), str(run), "resnet18", 2, n_boot=50),
              TrainConfig(hidden=(16,), attn_dim=8, epochs=3, threads=1, **extra))
    res = CliRunner().invoke(mil_app, ["finetune", "--run", str(run), "--out", str(ft),
                                       "--slides", str(cohort / "slides"), *FT])
    assert res.exit_code == 0, res.output
    cfg = json.loads((ft / "config.json").read_text())
    m = json.loads((ft / "metrics.json").read_text())
    assert cfg["task"] == task and cfg["kind"] == "finetune"
    ft_rows, frozen_rows = _rows(ft / "predictions.csv"), _rows(ft / "predictions_frozen.csv")
    assert [r["slide_id"] for r in ft_rows] == [f"s{i:02d}" for i in range(11, 16)]
    assert column in ft_rows[0] and "label" not in ft_rows[0]
    # the frozen head scores the test slides exactly as `mil train` did (same tiles, same scaling)
    parent = {r["slide_id"]: float(r[column]) for r in _rows(run / "predictions.csv")}
    assert [float(r[column]) for r in frozen_rows] == pytest.approx([parent[r["slide_id"]] for r in frozen_rows],
                                                                    rel=1e-4, abs=1e-4)
    if task == "survival":
        from lifelines.utils import concordance_index

        t, e, risk = (np.array([float(r[c]) for r in ft_rows]) for c in ("time", "event", "risk"))
        assert m["folds"]["test"]["c_index"] == pytest.approx(concordance_index(t, -risk, e), abs=1e-6)
        assert m["frozen"]["folds"]["test"]["c_index"] is not None and "C-index" in res.output
        assert (ft / "km.png").is_file() and "risk_cutoff" in cfg["task_config"]["test"]
    else:
        from scipy.stats import pearsonr

        y, p = (np.array([float(r[c]) for r in ft_rows]) for c in ("target", "prediction"))
        assert m["folds"]["test"]["pearson"] == pytest.approx(pearsonr(y, p)[0], abs=1e-5)   # the CSV rounds
        assert (ft / "scatter.png").is_file() and "Pearson r" in res.output
        assert cfg["task_config"]["test"]["target_sd"] > 0
