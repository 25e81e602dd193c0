"""mil.run.RunWriter: the one writer of run directories (file list, --out refusals, config.json last)."""

from __future__ import annotations

import numpy as np
import pytest

from mil.errors import MilError, RunError
from mil.models import create_mil_model
from mil.run import RUN_FILES, RunWriter, load_run


def _write_run(out, **kw) -> RunWriter:
    head = create_mil_model("abmil", 4, 2, hidden=(8,), attn_dim=4)
    w = RunWriter(out, **kw)
    w.models({"test": head.state_dict()}, head.config, ["a", "b"], {"dim": 4})
    w.predictions([{"slide_id": "s1", "label": "b", "fold": "test", "probs": np.array([0.25, 0.75])}], ["a", "b"])
    w.predictions([{"slide_id": "s1", "label": "b", "fold": "test", "probs": np.array([0.5, 0.5])}], ["a", "b"],
                  "predictions_frozen.csv")
    w.attention({("test", "s1"): np.arange(3.0)})
    return w


def test_config_json_is_written_last_and_marks_a_finished_run(tmp_path):
    out = tmp_path / "run"
    w = _write_run(out)
    with pytest.raises(RunError, match="has no config.json"):
        load_run(out)                        # every file but config.json: not a finished run
    w.finish({"kind": "train", "value": float("nan")})
    run = load_run(out)
    assert run.config == {"kind": "train", "value": None} and run.folds == ["test"]
    assert (out / "predictions_frozen.csv").read_text().splitlines()[1] == "s1,b,0.500000,test"
    with pytest.raises(RunError, match="is finished"):
        w.json("metrics.json", {})
    with pytest.raises(ValueError, match="'notes.txt' is not a run file"):
        RunWriter(tmp_path / "other").file("notes.txt")


def test_out_refusals_and_overwrite_clears_every_run_file(tmp_path):
    out = tmp_path / "run"
    _write_run(out).finish({"kind": "finetune"})
    (out / "encoder.pt").write_bytes(b"x")     # a fine-tune file the next run does not write
    (out / "notes.txt").write_text("mine")    # not a run file: left alone
    with pytest.raises(MilError, match="already holds a run; pass --overwrite"):
        RunWriter(out)
    with pytest.raises(MilError, match=r"is the parent run itself; choose a new directory, e.g. .*run-ft"):
        RunWriter(out, overwrite=True, parent=out)
    (tmp_path / "file").write_text("")
    with pytest.raises(MilError, match="is a file; choose a directory path"):
        RunWriter(tmp_path / "file")
    RunWriter(out, overwrite=True)
    assert not any((out / name).exists() for name in RUN_FILES)
    assert (out / "notes.txt").read_text() == "mine"
