"""The study YAML is validated whole when it is loaded: one red line naming the key, before any work."""

from __future__ import annotations

import logging

import pytest
import yaml
from typer.testing import CliRunner

from featstore.cli import featstore_app
from mil.study.commands import quiet_package_logs
from mil.study.errors import StudyError
from mil.study.study import StudyConfig

BASE = {
    "slides": ["slides"],
    "labels": "labels.csv",
    "encoders": [{"name": "resnet18", "weights": "random", "levels": [0, 2]}],
    "seeds": [0, 1],
    "tiling": {"patch_size": 256},
    "extract": {"batch_size": 16, "precision": "fp32"},
    "mil": {"epochs": 5, "patience": 0, "lr": "1e-3"},
    "finetune": {"enabled": True, "k": 2, "eval_tiles": "topk"},
}


def _with(section: str, key: str, value) -> dict:
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    if section:
        d[section][key] = value
    else:
        d[key] = value
    return d


def _study(tmp_path, data: dict):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(featstore_app, ["study", str(path)], env={"COLUMNS": "300"})
    return path, res


@pytest.mark.parametrize("section, key, value, words", [
    ("mil", "epoch", 5, ["mil.epoch", "unknown", "did you mean 'epochs'", "valid: model, hidden"]),
    ("extract", "batchsize", 8, ["extract.batchsize", "unknown", "did you mean 'batch_size'"]),
    ("tiling", "patch_sise", 128, ["tiling.patch_sise", "unknown", "did you mean 'patch_size'"]),
    ("finetune", "kk", 3, ["finetune.kk", "unknown", "valid: k, epochs"]),
    ("mil", "epochs", "ten", ["mil.epochs", "'ten'", "expected int"]),
    ("mil", "seed", 3, ["mil.seed", "unknown"]),                        # seeds come from `seeds`
    ("extract", "weights", "imagenet", ["extract.weights", "unknown"]),  # set per encoder plan
    ("mil", "optimizer", "sgd", ["mil.optimizer 'sgd' must be one of adam, adamw"]),
    ("mil", "device", "gpu", ["mil.device", "'gpu' is not a device"]),
    ("finetune", "enabled", "yes", ["finetune.enabled", "expected bool"]),
    ("", "heatmaps", "three", ["heatmaps", "expected int"]),
    ("", "baseline", "resnet18", ["baseline", "ENCODER:WEIGHTS:minusK"]),
])
def test_a_bad_key_fails_in_one_line_before_any_work(tmp_path, section, key, value, words):
    path, res = _study(tmp_path, _with(section, key, value))
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert str(path) in lines[0] and all(w in lines[0] for w in words), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # no store, no study folder


def test_encoder_entries_are_checked_against_the_registry(tmp_path):
    bad_name = _with("", "encoders", [{"name": "resnet19"}])
    with pytest.raises(StudyError, match=r"encoders\[0\]\.name: unknown encoder 'resnet19'"):
        StudyConfig.from_dict(bad_name, tmp_path)
    bad_level = _with("", "encoders", ["resnet18", {"name": "resnet18", "levels": [0, 9]}])
    with pytest.raises(StudyError, match=r"encoders\[1\]\.levels: encoder resnet18 has truncation levels"):
        StudyConfig.from_dict(bad_level, tmp_path)


def test_valid_sections_build_the_configs_the_runs_use(tmp_path):
    cfg = StudyConfig.from_dict(BASE, tmp_path)
    train = cfg.train_config(seed=1)
    assert (train.epochs, train.patience, train.lr, train.seed) == (5, 0, 1e-3, 1)
    ex = cfg.extract_config("resnet18", "random", [0, 2])
    assert (ex.batch_size, ex.precision, ex.levels, ex.tiling.patch_size) == (16, "fp32", (0, 2), 512)
    ft = cfg.finetune_config()
    assert (ft.k, ft.eval_tiles, ft.seed) == (2, "topk", 0)
    assert StudyConfig.from_dict(_with("finetune", "enabled", False), tmp_path).finetune_config() is None
    assert cfg.mil == {"epochs": 5, "patience": 0, "lr": 1e-3}  # study.json keeps the YAML's keys


def test_quiet_package_logs_is_restored(monkeypatch):
    root, pkg = logging.getLogger(), logging.getLogger("mil")
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setattr(pkg, "level", logging.NOTSET)
    with pytest.raises(RuntimeError):
        with quiet_package_logs():
            assert pkg.level == logging.WARNING
            raise RuntimeError("a failing study")
    assert pkg.level == logging.NOTSET
    monkeypatch.setattr(root, "level", logging.DEBUG)  # --verbose: nothing is silenced
    with quiet_package_logs():
        assert pkg.level == logging.NOTSET
