"""A patch study end to end on a real labelled dataset: scikit-learn's 8x8 digits written as PNG
tiles in class folders, extracted into an image store with random-weight resnet18, then linear
probe, kNN and end-to-end fine-tuning with nested training fractions, seeds and calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from featstore.extract import ExtractConfig, Extractor
from featstore.read.images import discover_images, image_table
from featstore.store import open_store
from mil.patches.config import PatchConfig
from mil.patches.finetune import FinetuneSettings
from mil.patches.run import read_records, run_patches

N_PER_CLASS = 150


def write_digits(root, n_per_class: int = N_PER_CLASS, size: int = 32) -> None:
    """Digits as RGB PNGs in ``root/<digit>/``, upsampled from 8x8, ink dark on white like a stain.
    (No augmentation when fine-tuning: flips and rotations are right for tissue, not for digits.)"""
    d = load_digits()
    for c in range(10):
        idx = np.flatnonzero(d.target == c)[:n_per_class]
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in idx:
            g = (255 - d.images[i] * (255 / 16)).astype(np.uint8)
            img = Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
            img.save(root / str(c) / f"d{i:04d}.png")


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    write_digits(tmp / "digits")
    cfg = ExtractConfig(encoder="resnet18", levels=(2, 3), input_size=32, precision="fp32", batch_size=64)
    report = Extractor(cfg).run(discover_images(tmp / "digits", shard_size=256), tmp / "digits.zarr")
    assert report.ok
    return tmp / "digits.zarr"


def _cfg(**kw) -> PatchConfig:
    base = dict(encoder="resnet18", levels=(3,), method="logreg", fractions=(0.25, 1.0), seeds=(0, 1), n_boot=200)
    return PatchConfig(**{**base, **kw})


def test_linear_probe_on_random_resnet18_reaches_085_and_writes_every_picture(digits_store, tmp_path):
    res = run_patches(_cfg(), digits_store, tmp_path / "probe")
    full = [r for r in res.records if r["fraction"] == 1.0]
    assert len(res.records) == 4 and all(r["accuracy"] >= 0.85 for r in full), full
    run = next((tmp_path / "probe" / "runs").glob("*-f1-seed0"))
    for name in ("confusion.png", "reliability.png", "confidence.png", "predictions.csv", "metrics.json"):
        assert (run / name).stat().st_size > 0
    m = json.loads((run / "metrics.json").read_text())
    cm = np.array(m["confusion"])
    assert cm.shape == (10, 10) and cm.sum() == m["n"] and np.trace(cm) / cm.sum() == pytest.approx(m["accuracy"])
    assert m["temperature"] > 0 and m["ece_after_temperature"] is not None and m["probe"]["param"] == "C"
    assert (tmp_path / "probe" / "balanced_accuracy_vs_fraction.png").stat().st_size > 0
    table = (tmp_path / "probe" / "table.md").read_text()
    assert "0.25" in table and "random" in table


def test_predictions_csv_ece_matches_an_independent_numpy_computation(digits_store, tmp_path):
    res = run_patches(_cfg(fractions=(1.0,), seeds=(0,)), digits_store, tmp_path / "p")
    run = next((tmp_path / "p" / "runs").iterdir())
    rows = np.genfromtxt(run / "predictions.csv", delimiter=",", names=True, dtype=None, encoding=None)
    conf, correct = rows["confidence"].astype(float), rows["label"].astype(str) == rows["predicted"].astype(str)
    edges = np.linspace(0, 1, 16)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inb = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if inb.any():
            ece += inb.mean() * abs(correct[inb].mean() - conf[inb].mean())
    assert res.records[0]["ece"] == pytest.approx(ece, abs=2e-6)


def test_fractions_are_nested_deterministic_and_a_rerun_reuses_finished_runs(digits_store, tmp_path):
    a = run_patches(_cfg(method="knn"), digits_store, tmp_path / "k")
    ntrain = {(r["seed"], r["fraction"]): r["n_train"] for r in a.records}
    assert ntrain[(0, 0.25)] < ntrain[(0, 1.0)] and ntrain[(0, 1.0)] == ntrain[(1, 1.0)]
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "k" / "runs").glob("*/config.json")}
    b = run_patches(_cfg(method="knn"), digits_store, tmp_path / "k")
    assert [r["accuracy"] for r in a.records] == [r["accuracy"] for r in b.records]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp        # nothing refitted


def test_finetuning_improves_on_the_probe_of_the_same_encoder(digits_store, tmp_path):
    probe = run_patches(_cfg(levels=(2,), fractions=(1.0,), seeds=(0,)), digits_store, tmp_path / "lp")
    ft = run_patches(_cfg(levels=(2,), fractions=(1.0,), seeds=(0,), method="finetune", keep_encoder=True),
                     digits_store, tmp_path / "ft",
                     settings=FinetuneSettings(epochs=8, patience=3, lr=1e-3, head_lr=1e-3, precision="fp32", augment=False,
                                               batch_size=32, workers=1))
    assert ft.records[0]["accuracy"] > probe.records[0]["accuracy"], (ft.records, probe.records)
    run = next((tmp_path / "ft" / "runs").iterdir())
    m = json.loads((run / "metrics.json").read_text())
    assert m["finetune"]["best_epoch"] >= 1 and (run / "encoder.pt").is_file()


def test_cli_probe_and_compare(digits_store, tmp_path):
    from featstore.cli import mil_app

    r = CliRunner().invoke(mil_app, ["patches", "probe", "--store", str(digits_store), "--encoder", "resnet18",
                                     "--minus", "3", "--train-fraction", "0.5,1", "--seeds", "0,1", "--n-boot", "0",
                                     "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert "balanced" in r.output
    recs = read_records([tmp_path / "cli"])
    assert len(recs) == 4
    r = CliRunner().invoke(mil_app, ["patches", "compare", str(tmp_path / "cli"), "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cmp" / "table.csv").is_file()
    r = CliRunner().invoke(mil_app, ["patches", "probe", "--store", str(tmp_path / "nope.zarr"), "--encoder",
                                     "resnet18", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "error" in r.output


def test_image_table_of_the_digits(digits_store):
    t = image_table(open_store(digits_store))
    assert len(t) == 10 * N_PER_CLASS and t.classes == [str(c) for c in range(10)]


def test_lp_ft_starts_exactly_where_the_probe_ends(digits_store, tmp_path):
    """--head-init probe with frozen BatchNorm and zero learning rates scores like the probe itself:
    the probe's head, standardisation folded in, sits on the encoder that made the stored features."""
    probe = run_patches(_cfg(levels=(3,), fractions=(1.0,), seeds=(0,), n_boot=0), digits_store, tmp_path / "lp")
    ft = run_patches(_cfg(levels=(3,), fractions=(1.0,), seeds=(0,), n_boot=0, method="finetune"), digits_store,
                     tmp_path / "lpft", settings=FinetuneSettings(epochs=1, lr=0.0, head_lr=0.0, head_init="probe",
                                                                  freeze_bn=True, precision="fp32", augment=False,
                                                                  workers=1))
    assert ft.records[0]["accuracy"] == pytest.approx(probe.records[0]["accuracy"], abs=1 / 300)
