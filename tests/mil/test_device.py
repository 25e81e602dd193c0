"""`--device` is checked before any work: a bad device is one red line, exit 1, and no --out."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from featstore.cli import mil_app
from featstore.core.errors import ConfigError
from mil.train import RunSpec, TrainConfig, train_run


def _one_line(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.strip()]


def test_mil_train_on_a_missing_device_is_one_red_line(tmp_path, cohort):
    store, labels, _, _ = cohort
    out = tmp_path / "run"
    res = CliRunner().invoke(mil_app, ["train", "--store", store, "--encoder", "resnet18", "--minus", "1",
                                       "--labels", labels, "--out", str(out), "--device", "gpu"])
    assert res.exit_code == 1, res.output
    lines = _one_line(res.output)
    assert len(lines) == 1 and "--device 'gpu'" in lines[0] and "Traceback" not in res.output
    assert not out.exists()


def test_mil_finetune_on_a_missing_device_fails_before_reading_the_run(tmp_path):
    out = tmp_path / "ft"
    # the run does not exist either: the device is checked first, so that is the error shown
    res = CliRunner().invoke(mil_app, ["finetune", "--run", str(tmp_path / "nope"), "--out", str(out),
                                       "--device", "gpu"])
    assert res.exit_code == 1, res.output
    lines = _one_line(res.output)
    assert len(lines) == 1 and "--device 'gpu'" in lines[0] and "does not exist" not in res.output
    assert not out.exists()


def test_unavailable_cuda_is_refused_by_the_library_too(tmp_path, cohort):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    store, labels, _, _ = cohort
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train_run(RunSpec(store, labels, str(tmp_path / "r"), "resnet18", 1), TrainConfig(device="cuda"))
    assert not (tmp_path / "r").exists()
