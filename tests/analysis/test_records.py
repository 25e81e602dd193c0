"""Seed-study table (Welch p-values vs a baseline init) and the metric-vs-fraction figure."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy import stats as st

from analysis.records import compare_records, plot_metric_vs_fraction, to_markdown, write_csv, write_markdown
from analysis.errors import RecordsError


def _records(seeds=5):
    rng = np.random.default_rng(0)
    out = []
    for frac in (0.01, 0.1, 1.0):
        for weights, shift in (("random", 0.0), ("imagenet", 0.15)):
            for seed in range(seeds):
                acc = 0.5 + 0.2 * np.log10(frac * 100) / 2 + shift + rng.normal(0, 0.02)
                out.append({"encoder": "resnet18", "weights": f"random-s{seed}" if weights == "random" else weights,
                            "minus": 1, "fraction": frac, "seed": seed, "accuracy": acc,
                            "balanced_accuracy": acc - 0.02, "macro_f1": acc - 0.03, "ece": 0.1 - shift / 3})
    return out


def test_one_row_per_group_and_welch_against_random():
    recs = _records()
    rows = compare_records(recs)
    assert len(rows) == 6
    assert [(r.weights, r.fraction) for r in rows[:2]] == [("random", 0.01), ("imagenet", 0.01)]
    assert all(r.n == 5 and r.seeds == [0, 1, 2, 3, 4] for r in rows)
    for r in rows:
        if r.is_baseline:
            assert r.weights == "random" and r.p == {}
            continue
        mine = [x["accuracy"] for x in recs if x["weights"] == "imagenet" and x["fraction"] == r.fraction]
        base = [x["accuracy"] for x in recs if x["weights"].startswith("random") and x["fraction"] == r.fraction]
        assert r.p["accuracy"] == pytest.approx(st.ttest_ind(mine, base, equal_var=False).pvalue, rel=1e-12)
        assert r.mean["accuracy"] == pytest.approx(np.mean(mine))
        assert r.sd["accuracy"] == pytest.approx(np.std(mine, ddof=1))
        assert r.delta["accuracy"] == pytest.approx(np.mean(mine) - np.mean(base))
        assert r.p["accuracy"] < 1e-4 and r.baseline == "random"
    assert set(rows[0].mean) == {"accuracy", "balanced_accuracy", "macro_f1", "ece"}


def test_baseline_choice():
    recs = [r for r in _records() if r["weights"] == "imagenet"] + \
           [dict(r, weights="ciga-simclr") for r in _records() if r["weights"] == "imagenet"]
    rows = compare_records(recs)                          # no random: the first init
    assert {r.weights for r in rows if r.is_baseline} == {"imagenet"}
    rows = compare_records(recs, baseline="ciga-simclr")
    assert {r.weights for r in rows if r.is_baseline} == {"ciga-simclr"} and rows[0].weights == "ciga-simclr"
    with pytest.raises(RecordsError, match="baseline init 'random'"):
        compare_records(recs, baseline="random")


def test_groups_without_enough_seeds_get_no_p():
    rows = compare_records(_records(seeds=1))
    assert all(r.p.get("accuracy") is None for r in rows) and np.isnan(rows[0].sd["accuracy"])


def test_bad_records():
    recs = _records()
    with pytest.raises(RecordsError, match="record 0 lacks seed"):
        compare_records([{k: v for k, v in recs[0].items() if k != "seed"}])
    with pytest.raises(RecordsError, match="seed 0; each seed once"):
        compare_records(recs + [recs[0]])
    with pytest.raises(RecordsError, match="none of the metrics"):
        compare_records([{k: recs[0][k] for k in ("encoder", "weights", "minus", "fraction", "seed")}])


def test_csv_markdown_and_plot(tmp_path):
    recs = _records()
    rows = compare_records(recs)
    path = write_csv(rows, tmp_path / "t.csv")
    table = list(csv.DictReader(path.open()))
    assert len(table) == 6 and table[1]["weights"] == "imagenet" and table[1]["baseline"] == "random"
    assert float(table[1]["accuracy_p_welch"]) == pytest.approx(rows[1].p["accuracy"])
    assert table[0]["accuracy_p_welch"] == ""
    md = to_markdown(rows)
    assert md.count("\n") == 8 and "(p<0.001)" in md and "| baseline |" in md
    assert write_markdown(rows, tmp_path / "t.md").read_text().startswith("# Patch classification")
    png = plot_metric_vs_fraction(recs + [dict(r, minus=2) for r in recs], "balanced_accuracy", tmp_path / "f.png",
                                  title="digits")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000
