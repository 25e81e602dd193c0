"""`mil probe`: linear / kNN probe on pooled slide features or labelled tiles of a store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from featstore.core.ui import out_console as _console


def probe(
    store: Annotated[str, typer.Option("--store", help="Feature store (Zarr).")],
    encoder: Annotated[str, typer.Option("--encoder", help="Encoder name as stored, e.g. resnet18.")],
    minus: Annotated[int, typer.Option("--minus", help="Truncation level K (minus K).")],
    labels: Annotated[Path, typer.Option(
        "--labels", help="slide_id,label[,patient_id] CSV, or slide_id,x,y,label for tile-level labels.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for probe.json and probe.csv.")],
    weights: Annotated[Optional[str], typer.Option(
        "--weights", help="Weights tag (needed when several are stored).")] = None,
    pool: Annotated[str, typer.Option("--pool", help="Slide pooling: mean or attention (needs --run).")] = "mean",
    run: Annotated[Optional[Path], typer.Option(
        "--run", help="mil run directory whose attention.npz drives --pool attention.")] = None,
    probe_name: Annotated[str, typer.Option("--probe", help="logreg (C by inner CV) or knn.")] = "logreg",
    folds: Annotated[int, typer.Option("--folds", help="Outer CV folds (grouped by patient / slide).")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of folds and bootstrap.")] = 0,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples for the CIs.")] = 1000,
) -> None:
    """Cross-validated probe of stored embeddings: AUC, balanced accuracy, F1 with 95% CIs."""
    from analysis.probe import (evaluate_probe, is_tile_labels, load_tile_labels, pool_slides,
                                read_slide_labels, write_predictions)
    from analysis.errors import AnalysisError
    from featstore import open_store

    if not labels.is_file():
        raise AnalysisError(f"{labels}: no such labels file")
    st = open_store(store)
    if is_tile_labels(labels):
        X, y, groups, ids = load_tile_labels(st, labels, encoder, minus, weights)
        level = "tile"
    else:
        lab = read_slide_labels(labels)
        label_of = dict(zip(lab.slide_ids, lab.labels))
        group_of = dict(zip(lab.slide_ids, lab.groups))
        present = [s for s in lab.slide_ids if s in set(st.slide_ids())]
        if not present:
            raise AnalysisError(f"{labels}: none of its slide ids is in {store}; check the slide_id column")
        ids, X = pool_slides(st, encoder, minus, weights, slides=present, pool=pool, run_dir=run)
        y = [label_of[s] for s in ids]
        groups = [group_of[s] for s in ids]
        level = f"slide ({pool} pooled)"
    res = evaluate_probe(X, y, probe=probe_name, folds=folds, seed=seed, groups=groups, ids=ids, n_boot=n_boot)
    out.mkdir(parents=True, exist_ok=True)
    key = st.resolve_key(encoder, minus, weights)
    report = {"store": str(store), "encoder": key.encoder, "weights": key.weights, "minus": key.minus,
              "level": level, "labels": str(labels), "folds_requested": folds, "seed": seed, **res.to_json()}
    (out / "probe.json").write_text(json.dumps(report, indent=2, default=float))
    write_predictions(res, out / "probe.csv")

    table = Table(title=f"{probe_name} probe on {res.n} {level.split()[0]}s of {key}")
    for col in ("metric", "value", "95% CI"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, m in res.metrics.items():
        table.add_row(name, f"{m['value']:.3f}", f"{m['ci'][0]:.3f}–{m['ci'][1]:.3f}")
    _console.print(table)
    _console.print(f"wrote {out / 'probe.json'} and {out / 'probe.csv'}")


def register(featstore_app: typer.Typer, mil_app: typer.Typer) -> None:
    mil_app.command("probe")(probe)
