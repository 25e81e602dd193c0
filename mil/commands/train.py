"""`mil train`, `mil predict`, `mil heatmap`: attention MIL over a featstore."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mil.errors import MilError

console = Console()


def _widths(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise MilError(f"--hidden {text!r}: give comma-separated integers, e.g. 256,64") from None
    if not out:
        raise MilError("--hidden is empty: give comma-separated integers, e.g. 256,64")
    return out


def _split_ids(values: Optional[list[str]]) -> list[str] | None:
    if not values:
        return None
    return [v for item in values for v in item.split(",") if v]


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def train(
    store: Annotated[str, typer.Option(help="Feature store (path or fsspec URL) made by `featstore extract`.")],
    encoder: Annotated[str, typer.Option(help="Encoder whose features to use, e.g. densenet121.")],
    labels: Annotated[Path, typer.Option(help="CSV slide_id,label[,patient_id][,split|fold].")],
    out: Annotated[Path, typer.Option(help="Run directory to write, e.g. runs/densenet121-m1.")],
    minus: Annotated[int, typer.Option(help="Truncation level K (features of stage last-K).")] = 0,
    weights: Annotated[Optional[str], typer.Option(help="Weights tag; needed only if the store holds several.")] = None,
    model: Annotated[str, typer.Option(help="abmil | abmil-gated | mean | max.")] = "abmil",
    folds: Annotated[Optional[int], typer.Option(help="K-fold CV (patient-grouped, stratified). Default: the "
                                                      "labels' split/fold column, else one 80/20 hold-out.")] = None,
    epochs: Annotated[int, typer.Option(help="Maximum epochs per fold.")] = 50,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 2e-4,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 1e-5,
    optimizer: Annotated[str, typer.Option(help="adam | adamw.")] = "adam",
    patience: Annotated[int, typer.Option(help="Early stopping: epochs without validation improvement (0 = off).")] = 10,
    monitor: Annotated[str, typer.Option(help="Early-stopping criterion: val_loss | val_auc.")] = "val_loss",
    val_fraction: Annotated[float, typer.Option(help="Share of training patients held out for early stopping.")] = 0.2,
    hidden: Annotated[str, typer.Option(help="Instance MLP widths, comma-separated (CLAM-like: 512).")] = "256,64",
    attn_dim: Annotated[int, typer.Option(help="Attention width (CLAM-like: 256).")] = 32,
    dropout: Annotated[float, typer.Option(help="Dropout after each MLP layer.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed for splits, init, order; same seed -> same run on CPU.")] = 0,
    train_fraction: Annotated[float, typer.Option(help="Use this share of the training patients (stratified), "
                                                       "for data-size studies.")] = 1.0,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto.")] = "cpu",
    threads: Annotated[int, typer.Option(help="CPU threads while training (0 = torch default); small heads "
                                              "often train fastest on 1.")] = 1,
    allow_missing: Annotated[bool, typer.Option(help="Skip labelled slides the store lacks (with a warning).")] = False,
    cache: Annotated[str, typer.Option(help="Bags in memory: auto | float32 | float16 | none (stream).")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out.")] = False,
) -> None:
    """Train attention-MIL slide classifiers and write a run directory (metrics, plots, model)."""
    from mil.train import RunSpec, TrainConfig, train_run

    cfg = TrainConfig(model=model, hidden=_widths(hidden), attn_dim=attn_dim, dropout=dropout, epochs=epochs,
                      lr=lr, weight_decay=weight_decay, optimizer=optimizer, patience=patience,
                      monitor=monitor, seed=seed, device=device, val_fraction=val_fraction,
                      threads=threads)
    spec = RunSpec(store=store, labels=str(labels), out=str(out), encoder=encoder, minus=minus,
                   weights=weights, folds=folds, train_fraction=train_fraction,
                   allow_missing=allow_missing, cache=cache, overwrite=overwrite)
    columns = (TextColumn("[bold]{task.fields[fold]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("epochs  loss {task.fields[loss]}  val loss {task.fields[vloss]}  "
                          "val AUC {task.fields[vauc]}"), TimeElapsedColumn())
    tasks: dict[str, int] = {}
    with Progress(*columns, console=console, transient=False) as bar:
        def progress(fold, index, n_folds, e):
            if fold not in tasks:
                tasks[fold] = bar.add_task("", total=e.epochs, fold=f"{fold} ({index + 1}/{n_folds})",
                                           loss="-", vloss="-", vauc="-")
            t = tasks[fold]
            if e.step == "bag":
                bar.update(t, completed=e.epoch - 1 + e.done / e.total, loss=f"{e.train_loss:.3f}")
            else:
                bar.update(t, completed=e.epoch, loss=f"{e.train_loss:.3f}", vloss=_fmt(_num(e.val_loss)),
                           vauc=_fmt(_num(e.val_auc)))

        summary = train_run(spec, cfg, progress=progress, on_stage=lambda s: bar.console.print(f"[dim]{s}[/]"))
        for t in tasks.values():  # early-stopped folds: show the bar as finished
            bar.update(t, total=bar.tasks[t].completed)
    table = Table(title=f"{out}  ({summary.n_slides} slides, classes {', '.join(summary.classes)})")
    for col in ("fold", "n", "AUC", "95% CI", "bal. acc.", "F1"):
        table.add_column(col)
    for name, m in summary.metrics["folds"].items():
        lo, hi = m["auc_ci"]
        table.add_row(name, str(m["n"]), _fmt(m["auc"]), f"{_fmt(lo)}-{_fmt(hi)}",
                      _fmt(m["balanced_accuracy"]), _fmt(m["f1"]))
    mean, std = summary.metrics["mean"], summary.metrics["std"]
    if len(summary.folds) > 1:
        table.add_row("mean ± std", "", f"{_fmt(mean['auc'])} ± {_fmt(std['auc'])}", "",
                      f"{_fmt(mean['balanced_accuracy'])} ± {_fmt(std['balanced_accuracy'])}",
                      f"{_fmt(mean['f1'])} ± {_fmt(std['f1'])}")
    console.print(table)
    console.print(f"run written to [bold]{out}[/]")


def _num(x: float):
    return None if x != x else x  # NaN -> None


def predict(
    run: Annotated[Path, typer.Option(help="Run directory written by `mil train`.")],
    store: Annotated[str, typer.Option(help="Feature store holding the run's encoder/level/weights.")],
    slides: Annotated[Optional[list[str]], typer.Option(help="Slide ids to score (repeat or comma-separate); "
                                                             "default: every slide with the features.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write predictions to this CSV.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto.")] = "cpu",
) -> None:
    """Score slides with a trained run (k-fold runs average the fold models' probabilities)."""
    from mil.predict import predict as run_predict

    preds = run_predict(run, store, _split_ids(slides), device=device)
    if out is not None:
        preds.write_csv(out)
        console.print(f"{len(preds.slide_ids)} predictions written to [bold]{out}[/]")
    table = Table(title=f"{run} on {store}")
    for col in ("slide_id", "prediction", "probability"):
        table.add_column(col)
    shown = 50
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
    mpp: Annotated[Optional[float], typer.Option(help="Microns per pixel, if the file lacks it.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto.")] = "cpu",
) -> None:
    """Draw a run's attention over a slide thumbnail, with the top-k tiles below."""
    from mil.heatmap import make_heatmap

    if not slide.exists():
        raise MilError(f"slide file {slide} does not exist; check --slide")
    res = make_heatmap(run, slide, store, out, slide_id=slide_id, top_k=top_k, norm=norm,
                       max_size=max_size, mpp=mpp, device=device)
    console.print(f"heatmap of [bold]{res.slide_id}[/] ({len(res.scores)} tiles) written to [bold]{res.path}[/]")


def register(app: typer.Typer) -> None:
    """Add `train`, `predict`, `heatmap` to the mil app."""
    app.command("train")(train)
    app.command("predict")(predict)
    app.command("heatmap")(heatmap)
