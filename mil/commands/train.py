"""`mil train`, `mil predict`, `mil heatmap`: attention MIL over a featstore."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import TextColumn
from rich.table import Table

from featstore.core.config import config_command
from featstore.core.ui import fmt3 as _fmt
from featstore.core.ui import out_console as console
from mil.config import RunSpec, TrainConfig
from mil.errors import MilError


def _split_ids(values: Optional[list[str]]) -> list[str] | None:
    if not values:
        return None
    return [v for item in values for v in item.split(",") if v]


@config_command(spec=RunSpec, cfg=TrainConfig)
def train(spec: RunSpec, cfg: TrainConfig) -> None:
    """Train attention-MIL heads (slide labels, survival or regression; per slide or per patient) and write a
    run directory (metrics, plots, model); --targets: one run per label column."""
    from featstore.core.ui import progress_bar
    from mil.train import train_run, train_targets

    # "val AUC" only where there is one: survival and regression runs monitor their loss alone
    fold_text = TextColumn("epochs  loss {task.fields[loss]}  val loss {task.fields[vloss]}{task.fields[vauc]}")
    tasks: dict[str, int] = {}
    with progress_bar(fold_text, label="[bold]{task.fields[fold]}", eta=False, console=console) as bar:
        def progress(fold, index, n_folds, e):
            if fold not in tasks:
                tasks[fold] = bar.add_task("", total=e.epochs, fold=f"{fold} ({index + 1}/{n_folds})",
                                           loss="-", vloss="-", vauc="")
            t = tasks[fold]
            if e.step == "bag":
                bar.update(t, completed=e.epoch - 1 + e.done / e.total, loss=f"{e.train_loss:.3f}")
            else:
                bar.update(t, completed=e.epoch, loss=f"{e.train_loss:.3f}", vloss=_fmt(_num(e.val_loss)),
                           vauc="" if _num(e.val_auc) is None else f"  val AUC {_fmt(e.val_auc)}")

        stage = lambda s: bar.console.print(f"[dim]{s}[/]")  # noqa: E731
        if spec.targets:
            summaries = train_targets(spec, cfg, progress=progress, on_stage=stage)
        else:
            summaries = {"": train_run(spec, cfg, progress=progress, on_stage=stage)}
        for t in tasks.values():  # early-stopped folds: show the bar as finished
            bar.update(t, total=bar.tasks[t].completed)
    for target, summary in summaries.items():
        console.print(_summary_table(str(Path(spec.out) / target) if target else spec.out, summary))
    if spec.targets:
        missing = [t for t in dict.fromkeys(spec.targets) if t not in summaries]
        if missing:
            console.print(f"target(s) {', '.join(missing)} failed: see {Path(spec.out) / 'targets.json'}")
        console.print(f"{len(summaries)} run(s), one per target, written under [bold]{spec.out}[/] "
                      f"(targets.json sums them up)")
    else:
        console.print(f"run written to [bold]{spec.out}[/]")


def _summary_table(out: str, summary) -> Table:
    """Per-fold metrics of the run's task (AUC, CI, balanced accuracy, F1 for classification;
    C-index etc. for survival; Pearson r etc. for regression), plus mean ± std over folds."""
    from mil.tasks import task_columns

    what = f"classes {', '.join(summary.classes)}" if summary.task == "classification" else summary.task
    units = f"{summary.n_slides} slides" + (f" of {summary.n_units} patients, one bag each"
                                            if summary.level == "patient" else "")
    table = Table(title=f"{out}  ({units}, {what})")
    cols = task_columns(summary.task)
    for col in ("fold", "n", *(c for c, _ in cols)):
        table.add_column(col)

    def cell(m: dict, key: str) -> str:
        v = m.get(key)
        if key.endswith("_ci"):
            lo, hi = v or (None, None)
            return f"{_fmt(lo)}-{_fmt(hi)}"
        return str(v) if isinstance(v, int) else _fmt(v)

    for name, m in summary.metrics["folds"].items():
        table.add_row(name, str(m["n"]), *(cell(m, k) for _, k in cols))
    mean, std = summary.metrics["mean"], summary.metrics["std"]
    if len(summary.folds) > 1:
        table.add_row("mean ± std", "", *("" if k.endswith("_ci") or k not in mean else
                                          f"{_fmt(mean[k])} ± {_fmt(std[k])}" for _, k in cols))
    fused = summary.metrics.get("patient")
    if fused:   # slide-level run, patients with several slides: the mean of their slide scores
        table.add_row("patients (mean of slides)", str(fused["n_patients"]),
                      *("" if k.endswith("_ci") or k not in fused["mean"] else
                        f"{_fmt(fused['mean'][k])} ± {_fmt(fused['std'][k])}" for _, k in cols))
    return table


def _num(x: float):
    return None if x != x else x  # NaN -> None


def predict(
    run: Annotated[Path, typer.Option(help="Run directory written by `mil train`.")],
    store: Annotated[str, typer.Option(help="Feature store holding the run's encoder/level/weights.")],
    slides: Annotated[Optional[list[str]], typer.Option(help="Slide ids to score (repeat or comma-separate); "
                                                             "default: every slide with the features.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write predictions to this CSV.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: CUDA when present, else the CPU).")] = "auto",
) -> None:
    """Score slides with a trained run (k-fold runs average the fold models' probabilities; survival runs
    give a risk, regression runs the predicted value)."""
    from mil.predict import predict as run_predict

    preds = run_predict(run, store, _split_ids(slides), device=device)
    if out is not None:
        preds.write_csv(out)
        console.print(f"{len(preds.slide_ids)} predictions written to [bold]{out}[/]")
    table = Table(title=f"{run} on {store}")
    shown = 50
    if hasattr(preds, "values"):   # survival: risk (higher: earlier event); regression: the predicted value
        for col in ("slide_id", preds.column):
            table.add_column(col)
        for sid, v in list(zip(preds.slide_ids, preds.values))[:shown]:
            table.add_row(sid, f"{v:.3f}")
    else:
        for col in ("slide_id", "prediction", "probability"):
            table.add_column(col)
        for sid, pred, p in list(zip(preds.slide_ids, preds.predicted, preds.probability()))[:shown]:
            table.add_row(sid, pred, f"{p:.3f}")
    if out is None or len(preds.slide_ids) <= shown:
        console.print(table)
    if len(preds.slide_ids) > shown and out is None:
        console.print(f"... {len(preds.slide_ids) - shown} more; pass --out preds.csv for all")


def heatmap(
    run: Annotated[Path, typer.Option(help="Run directory written by `mil train`.")],
    slide: Annotated[Path, typer.Option(help="The whole-slide image file.")],
    store: Annotated[str, typer.Option(help="Feature store holding the slide's features.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")],
    slide_id: Annotated[Optional[str], typer.Option(help="Slide id in the store (default: matched by path).")] = None,
    top_k: Annotated[int, typer.Option(help="Show the k most attended tiles in a strip.")] = 8,
    norm: Annotated[str, typer.Option(help="Attention normalisation: rank | softmax | minmax.")] = "rank",
    max_size: Annotated[int, typer.Option(help="Thumbnail size (longest side, px).")] = 1024,
    slide_mpp: Annotated[Optional[float], typer.Option("--slide-mpp", "--mpp", help="Microns per pixel of a "
                                                       "slide whose file does not record it (as in extract).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: CUDA when present, else the CPU).")] = "auto",
    geojson: Annotated[Optional[Path], typer.Option(help="Also write the attention as QuPath GeoJSON: tissue "
                                                         "contours, every tile with its attention as measurements, "
                                                         "the slide's prediction (level-0 px).")] = None,
) -> None:
    """Draw a run's attention over a slide thumbnail, with the top-k tiles below (and, with --geojson, the
    same attention for QuPath)."""
    from mil.heatmap import make_heatmap

    if not slide.exists():
        raise MilError(f"slide file {slide} does not exist; check --slide")
    res = make_heatmap(run, slide, store, out, slide_id=slide_id, top_k=top_k, norm=norm,
                       max_size=max_size, mpp=slide_mpp, device=device, geojson=geojson)
    console.print(f"heatmap of [bold]{res.slide_id}[/] ({len(res.scores)} tiles) written to [bold]{res.path}[/]")
    if geojson is not None:
        console.print(f"QuPath GeoJSON written to [bold]{geojson}[/] (drag it onto the slide in QuPath)")


def register(app: typer.Typer) -> None:
    """Add `train`, `predict`, `heatmap` to the mil app."""
    app.command("train")(train)
    app.command("predict")(predict)
    app.command("heatmap")(heatmap)
