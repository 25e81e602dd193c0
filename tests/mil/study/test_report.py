"""The study report's answers say what the numbers support: ties are ties, weights are compared
within one encoder, and a CKA that did not move says so."""

from __future__ import annotations

import csv
import json

from analysis.compare import GroupKey, GroupRow
from mil.study.report import _answers, cka_note


def _row(enc: str, w: str, minus: int, auc: float) -> GroupRow:
    return GroupRow(GroupKey(enc, w, minus, "train"), n=12, n_runs=3, mean={"auc": auc}, sd={"auc": 0.01},
                    ci=(auc - 0.02, auc + 0.02))


ROWS = [_row("densenet121", "random-s0", 0, 1.0), _row("densenet121", "random-s0", 2, 1.0),
        _row("densenet121", "random-s0", 1, 0.95), _row("resnet18", "random-s0", 0, 0.80),
        _row("resnet18", "random-s0", 3, 0.90), _row("resnet18", "pretrain-simclr-f1-1a2b3c4d", 2, 0.97)]


def test_a_tie_for_best_is_called_a_tie():
    text = "\n".join(_answers(ROWS, ROWS[0], None))
    assert "It ties with 1 other configuration(s) at that AUC (`densenet121:random-s0:minus2`)" in text
    assert "**Truncation, densenet121 (random-s0):** minus0, minus2 tie at AUC 1.000: no level is better" in text
    assert "**Truncation, resnet18 (random-s0):** minus3 reaches AUC 0.900 vs 0.800" in text


def test_pretraining_is_compared_within_one_encoder():
    lines = [ln for ln in _answers(ROWS, ROWS[0], None) if "Pre-training" in ln]
    assert lines == ["- **Pre-training, resnet18:** best AUC per weights: `pretrain-simclr-f1-1a2b3c4d` 0.970 "
                     "(minus2), `random-s0` 0.900 (minus3)."]          # densenet121 has one weights: no line


def _cka(path, values):
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["a", "b", "a_minus", "b_minus", "cka"])
        for k, v in values.items():
            w.writerow(["x", "y", k, k, v])
            w.writerow(["x", "y", k, k + 1, 0.5])
    return path


def test_cka_note_says_when_nothing_moved_and_what_moved(tmp_path):
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "config.json").write_text(json.dumps({"k": 8, "epochs": 2, "lr": 1e-5}))
    still = cka_note(_cka(tmp_path / "a.csv", {0: 0.9998, 1: 0.9991}), ft)
    assert still.startswith("**Fine-tuning barely moved the encoder:**") and "≥ 0.9991" in still
    assert "(k=8, epochs=2, lr=1e-05)" in still
    moved = cka_note(_cka(tmp_path / "b.csv", {0: 0.62, 1: 0.95, 2: 0.99}), ft)
    assert moved.startswith("Fine-tuning moved minus0 (CKA 0.620) and minus1 (CKA 0.950) most")
