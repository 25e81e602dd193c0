"""The files of a patch run and of a patch study (one place, so the CLI and the study agree).

Run folder: ``config.json`` (what ran, with the features' provenance), ``metrics.json`` (test
metrics, CIs, calibration before/after temperature, the probe sweep or fine-tune history),
``record.json`` (the flat row `mil patches compare` reads), ``predictions.csv``,
``confusion.png``, ``reliability.png``, ``confidence.png`` (and ``encoder.pt`` when kept).
The ``config.json`` is written last (atomically): a folder without it is an unfinished run.
Study folder: ``table.md`` / ``table.csv`` (mean ± sd over seeds, Welch p against random init)
and ``<metric>_vs_fraction.png`` per headline metric.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

HEADLINE = ("balanced_accuracy", "accuracy", "macro_f1", "ece")


def _json(path: Path, doc) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    os.replace(tmp, path)


def write_predictions(path: Path, cohort, arrays: Mapping) -> Path:
    """One row per test image: path, label, prediction, confidence (and after temperature), probabilities."""
    t, idx, classes = cohort.table, cohort.split["test"], list(cohort.table.classes)
    proba, proba_t = arrays["proba"], arrays.get("proba_t")
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "group", "label", "predicted", "confidence", "confidence_t"]
                   + [f"p_{c}" for c in classes])
        for i, row in enumerate(idx):
            p = proba[i]
            ct = "" if proba_t is None else f"{proba_t[i].max():.9f}"
            w.writerow([t.paths[row], t.groups[row], t.labels[row], classes[int(p.argmax())], f"{p.max():.9f}", ct]
                       + [f"{v:.6f}" for v in p])
    return path


def _pictures(path: Path, cohort, doc: Mapping, metrics: Mapping, arrays: Mapping) -> None:
    from featstore.core.plotting import heatmap
    from mil.patches.calibration import plot_confidence_hist, plot_reliability

    classes = list(cohort.table.classes)
    cm = np.asarray(metrics["confusion"], float)
    rows = np.maximum(cm.sum(1, keepdims=True), 1)
    name = f"{doc['encoder']} {doc['weights']} minus{doc['minus']} {doc['method']} f{doc['fraction']:g} seed{doc['seed']}"
    heatmap(cm / rows, classes, classes, path / "confusion.png", title=f"confusion (row-normalised): {name}",
            xlabel="predicted", ylabel="true")
    plot_reliability(arrays["bins"], path / "reliability.png", title=name, after=arrays.get("bins_after"),
                     temperature=metrics.get("temperature"))
    plot_confidence_hist(arrays["conf"], arrays["correct"], path / "confidence.png", title=f"confidence: {name}")


def write_run(path: Path, cohort, doc: dict, metrics: dict, arrays: Mapping, extra: Mapping, record: dict,
              encoder=None) -> Path:
    """Every file of one run (module docstring); ``config.json`` last."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").unlink(missing_ok=True)
    _json(path / "metrics.json", {**metrics, **extra})
    write_predictions(path / "predictions.csv", cohort, arrays)
    _pictures(path, cohort, doc, metrics, arrays)
    if encoder is not None:
        from featstore.checkpoint import save_encoder

        save_encoder(encoder, path / "encoder.pt", level=int(doc["minus"]),
                     extra={"patch_finetune": {"run": str(path), "classes": doc["classes"], "seed": doc["seed"]}})
    _json(path / "record.json", record)
    _json(path / "config.json", doc)
    return path


def write_study(out: Path, records: Sequence[Mapping], baseline: str | None = None) -> dict[str, Path]:
    """The comparison table (markdown, CSV) and the metric-vs-fraction figures of *records*."""
    from analysis.records import compare_records, plot_metric_vs_fraction, write_csv, write_markdown

    out.mkdir(parents=True, exist_ok=True)
    rows = compare_records(records, baseline=baseline)
    files = {"table_md": write_markdown(rows, out / "table.md"), "table_csv": write_csv(rows, out / "table.csv")}
    for metric in HEADLINE:
        if any(r.get(metric) is not None for r in records):
            files[f"{metric}_plot"] = plot_metric_vs_fraction(records, metric, out / f"{metric}_vs_fraction.png",
                                                              baseline=baseline)
    return files


__all__ = ["HEADLINE", "write_predictions", "write_run", "write_study"]
