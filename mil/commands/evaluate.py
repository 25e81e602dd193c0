"""`mil evaluate`: external validation of a trained run on a second cohort (store + labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from featstore.core.ui import out_console as console


def evaluate(
    run: Annotated[Path, typer.Option(help="Run directory written by `mil train`.")],
    store: Annotated[str, typer.Option(help="Store of the external cohort, with the run's encoder/level/weights.")],
    labels: Annotated[Path, typer.Option(help="Labels CSV of the external cohort (slide_id,label[,patient_id]; survival: "
                                                 "slide_id,time,event[,patient_id]).")],
    name: Annotated[Optional[str], typer.Option(help="Name of the evaluation (default: the store's folder stem).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: RUN/external/NAME).")] = None,
    allow_missing: Annotated[bool, typer.Option(help="Skip labelled slides the store lacks instead of failing.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: CUDA when present, else the CPU).")] = "auto",
) -> None:
    """Score an external cohort with every fold model of a run; internal vs external AUC, CI, balanced accuracy
    (survival: C-index, Uno's C, risk groups; regression: Pearson r, R², calibration)."""
    from mil.evaluate import evaluate_external

    res = evaluate_external(run, store, labels, name=name, allow_missing=allow_missing, device=device)
    path = res.write(out)
    console.print(_table(res.metrics))
    console.print(f"external validation written to [bold]{path}[/]")


def _table(metrics: dict) -> Table:
    """Internal CV folds, their mean ± sd, then each fold model and the ensemble on the external cohort."""
    from mil.evaluate import summary_columns, summary_rows

    _, head, _, second = summary_columns(metrics)
    what = f"classes {', '.join(metrics['classes'])}" if metrics.get("classes") else metrics.get("task")
    table = Table(title=f"{metrics['name']}: {metrics['n_slides']} slides, {metrics['n_patients']} patients "
                        f"({what})")
    for col in ("", "n", head, "95% CI", second):
        table.add_column(col)
    for row in summary_rows(metrics):
        table.add_row(*row, style="bold" if row[0] == "external ensemble" else None)
    return table


def register(app: typer.Typer) -> None:
    """Add `evaluate` to the mil app."""
    app.command("evaluate")(evaluate)
