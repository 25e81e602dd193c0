"""`mil finetune`: top-k end-to-end fine-tuning of a trained run's encoder + head (HistoTransfer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()

_STAGES = {"train": "train", "val": "validate", "reselect": "re-select top-k", "test": "score test slides"}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def finetune(
    run: Annotated[Path, typer.Option(help="Frozen run directory written by `mil train`.")],
    out: Annotated[Path, typer.Option(help="Fine-tune run directory to write, e.g. runs/NAME-ft.")],
    slides: Annotated[Optional[list[str]], typer.Option(
        help="Slide files, directories, globs or a slide_id,path CSV (as given to `featstore extract`). "
             "Default: the source paths recorded in the store.")] = None,
    k: Annotated[int, typer.Option("--k", help="Tiles per slide: the k highest raw attention of the frozen run.")] = 64,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs (the best validation epoch is kept).")] = 3,
    lr: Annotated[float, typer.Option(help="Encoder learning rate.")] = 1e-5,
    head_lr: Annotated[float, typer.Option(help="Head learning rate.")] = 1e-4,
    weight_decay: Annotated[float, typer.Option(help="Adam weight decay.")] = 1e-5,
    fold: Annotated[Optional[str], typer.Option(help="Fold of the run to fine-tune (default: its first; one "
                                                     "fold per fine-tune run).")] = None,
    reselect: Annotated[bool, typer.Option(help="Recompute each training slide's top-k from the current model "
                                                "every epoch (embeds all its tiles).")] = False,
    eval_tiles: Annotated[str, typer.Option(help="Score test slides on 'all' their tiles or the frozen 'topk'.")] = "all",
    micro_batch: Annotated[int, typer.Option(help="Tiles per encoder forward while training (activation memory).")] = 16,
    accumulate: Annotated[int, typer.Option(help="Slides (bags) per optimiser step.")] = 1,
    eval_batch: Annotated[int, typer.Option(help="Tiles per forward when scoring.")] = 64,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16 (auto: bf16 on capable CPUs, fp16 "
                                                "on CUDA).")] = "auto",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto.")] = "cpu",
    workers: Annotated[int, typer.Option(help="Tile reader threads.")] = 2,
    threads: Annotated[int, typer.Option(help="Torch CPU threads (0 = torch default).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for bag order and dropout; same seed -> same run on CPU.")] = 0,
    store: Annotated[Optional[str], typer.Option(help="Feature store (default: the run's).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out.")] = False,
) -> None:
    """Fine-tune a run's encoder + attention head end to end on each slide's top-k tiles read from the WSI."""
    from mil.finetune import FinetuneConfig, FinetuneSpec, finetune_run

    cfg = FinetuneConfig(k=k, epochs=epochs, lr=lr, head_lr=head_lr, weight_decay=weight_decay,
                         micro_batch=micro_batch, accumulate=accumulate, reselect=reselect,
                         eval_tiles=eval_tiles, eval_batch=eval_batch, fold=fold, precision=precision,
                         device=device, workers=workers, seed=seed, threads=threads)
    spec = FinetuneSpec(run=str(run), out=str(out), slides=slides, store=store, overwrite=overwrite)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[tuple[str, int], int] = {}

        def progress(e) -> None:
            name = (e.stage, e.epoch)
            if name not in tasks:
                label = _STAGES.get(e.stage, e.stage)
                desc = f"{label} {e.epoch}/{e.epochs}" if e.stage in ("train", "reselect") else label
                if e.stage == "val":
                    return
                tasks[name] = bar.add_task(desc, total=e.total, note="")
            note = f"loss {e.loss:.3f}" if e.stage == "train" and e.loss == e.loss else ""
            bar.update(tasks[name], completed=e.done, total=e.total, note=note)

        res = finetune_run(spec, cfg, progress=progress, on_stage=lambda s: bar.console.log(s))
    m, fr = res.metrics["folds"][res.fold], res.metrics["frozen"]["folds"][res.fold]
    table = Table(title=f"{out}: fold {res.fold}, {m['n']} test slides, k={k}")
    for col in ("model", "AUC", "95% CI", "bal. acc.", "F1"):
        table.add_column(col)
    for name, row in (("frozen", fr), ("fine-tuned", m)):
        lo, hi = row["auc_ci"]
        table.add_row(name, _fmt(row["auc"]), f"{_fmt(lo)}-{_fmt(hi)}", _fmt(row["balanced_accuracy"]),
                      _fmt(row["f1"]))
    console.print(table)
    console.print(f"fine-tuned encoder: [bold]{out / 'encoder.pt'}[/] "
                  f"(featstore extract --encoder {res.model.encoder.name} --weights {out / 'encoder.pt'})")


def register(app: typer.Typer) -> None:
    """Add `finetune` to the mil app."""
    app.command("finetune")(finetune)
