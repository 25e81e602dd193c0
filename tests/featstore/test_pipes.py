"""What a user sees in a pipe or a log file (no terminal): names, tags and paths whole, list
commands in --format table|tsv|json, progress as plain lines, logs unpadded, `| head` quiet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from featstore.store import FeatureKey
from tests.mil.conftest import planted_bags, write_labels, write_store

ROOT = Path(__file__).resolve().parents[2]
LONG = "file-densenet121-imagenet-minus1-seed0-finetuned-on-the-whole-cohort-1a2b3c4d"


def _run(app: str, *args: str, shell_tail: str = "") -> subprocess.CompletedProcess:
    """The real command through a pipe (stdout and stderr are not terminals, no COLUMNS)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    code = f"from featstore.cli import {app}_app as a; a()"
    if shell_tail:
        cmd = " ".join([f"{sys.executable!r}", "-c", repr(code), *map(repr, args)])
        return subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} {shell_tail}"], capture_output=True,
                              text=True, env=env, cwd=ROOT)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT)


def _store(tmp_path: Path) -> str:
    bags, _ = planted_bags(3, dim=8, n_inst=(5, 9), seed=1)
    path = write_store(tmp_path / "s.zarr", bags)
    write_store(path, {"s000": bags["s000"]}, key=FeatureKey("densenet121", LONG, 1))
    return path


def test_encoders_in_a_pipe_keep_names_and_paths_whole():
    res = _run("featstore", "encoders", "efficientnet*")
    assert res.returncode == 0, res.stderr
    assert any("efficientnet_b0" in line for line in res.stdout.splitlines())
    tsv = _run("featstore", "encoders", "efficientnet_b0", "--format", "tsv").stdout.splitlines()
    header, rows = tsv[0].split("\t"), [dict(zip(tsv[0].split("\t"), r.split("\t"))) for r in tsv[1:]]
    assert header[:2] == ["encoder", "levels"] and {r["weights"] for r in rows} == {"random", "imagenet"}
    imagenet = next(r for r in rows if r["weights"] == "imagenet")
    assert imagenet["path"].endswith("model.safetensors") and imagenet["status"] in ("present", "missing")
    doc = json.loads(_run("featstore", "encoders", "efficientnet_b0", "--format", "json").stdout)
    assert [r["weights"] for r in doc] == ["random", "imagenet"] and doc[0]["levels"][0] == "0:1280"


def test_ls_gives_whole_tags_in_every_format(tmp_path):
    store = _store(tmp_path)
    lines = _run("featstore", "ls", store, "--format", "tsv").stdout.splitlines()
    assert lines[0].split("\t") == ["slide", "tiles", f"densenet121:{LONG}:minus1", "resnet18:random:minus1"]
    assert lines[1].split("\t")[2:] == ["yes", "no"] and lines[2].split("\t")[2:] == ["no", "yes"]
    doc = json.loads(_run("featstore", "ls", store, "--format", "json").stdout)
    assert doc["feature_sets"][0] == f"densenet121:{LONG}:minus1" and len(doc["slides"]) == 3
    table = _run("featstore", "ls", store).stdout
    assert f"#1  densenet121:{LONG}:minus1  (1/3 slides)" in table and "…" not in table


def test_a_bad_format_is_one_line():
    res = _run("featstore", "ls", "nowhere.zarr", "--format", "csv")
    assert res.returncode == 1 and res.stderr.strip() == "error: --format 'csv' must be one of table, tsv, json"


def test_progress_and_logs_are_plain_lines_without_a_terminal(tmp_path):
    bags, y = planted_bags(12, dim=8, n_inst=(8, 12), seed=2)
    store = write_store(tmp_path / "t.zarr", bags)
    labels = write_labels(tmp_path / "l.csv", [{"slide_id": s, "label": int(c)} for s, c in zip(bags, y)])
    res = _run("mil", "train", "--store", store, "--labels", labels, "--encoder", "resnet18", "--minus", "1",
               "--epochs", "3", "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    fold = [ln for ln in res.stdout.splitlines() if ln.startswith("test (1/1)")]
    assert fold and fold[-1].split()[2] == "3/3" and "(100%)" in fold[-1], res.stdout
    assert not any("━" in ln for ln in fold) and "…" not in res.stdout   # no bar drawn, nothing cut
    logs = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert logs[0].startswith("INFO     bags: 12 slides") and all(ln == ln.rstrip() for ln in logs)  # unpadded


def test_a_closed_pipe_is_not_an_error():
    res = _run("featstore", "encoders", "--format", "json", shell_tail="| head -n 2")
    assert res.returncode == 0 and res.stderr == "" and len(res.stdout.splitlines()) == 2


def test_a_tsv_cell_never_holds_a_tab_or_a_newline():
    from featstore.core.ui import _cell

    assert _cell(["a", "b c"]) == "a,b c" and _cell("x\ty\nz") == "x y z" and _cell(None) == ""
