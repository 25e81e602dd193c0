"""`mil patches ...`: patch classification over an image store (probe, finetune, compare)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from featstore.core.config import Options, config_command
from featstore.core.ui import out_console
from mil.patches.config import FinetuneSettings, PatchConfig

STORE = Annotated[Path, typer.Option("--store", "-s", help="Image store (`featstore extract --images`).")]
OUT = Annotated[Path, typer.Option("--out", "-o", help="Study folder: runs/<one per config>, table.md, plots.")]
SLIDES = Annotated[Optional[list[str]], typer.Option(help="finetune: the image folder/CSV, if it moved.")]


def _show(records: list[dict], out: Path, files: dict) -> None:
    table = Table(title=f"{out}: test metrics per run")
    for col in ("run", "n train", "accuracy", "balanced acc.", "macro F1", "ECE", "ECE (T)"):
        table.add_column(col)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in records:
        table.add_row(f"{r['weights']} minus{r['minus']} {r['method']} f{r['fraction']:g} s{r['seed']}",
                      str(r["n_train"]), fmt(r.get("accuracy")), fmt(r.get("balanced_accuracy")),
                      fmt(r.get("macro_f1")), fmt(r.get("ece")), fmt(r.get("ece_after_temperature")))
    out_console.print(table)
    for name, path in files.items():
        out_console.print(f"{name}: {path}", highlight=False)


def _run(cfg: PatchConfig, store: Path, out: Path, settings=None, slides=None) -> None:
    from featstore.core.ui import progress_bar
    from mil.patches.run import run_patches

    with progress_bar(console=out_console) as bar:
        task = bar.add_task("patch runs", total=None)

        def on_run(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=name)

        res = run_patches(cfg, store, out, settings=settings, slides=slides, on_run=on_run)
    _show(res.records, out, res.files)


@config_command(cfg=PatchConfig)
def probe(store: STORE, out: OUT, cfg: PatchConfig) -> None:
    """Linear probe (logreg, C swept on val) or kNN on stored patch features, per level, seed, fraction."""
    _run(cfg, store, out)


@config_command(cfg=Options(PatchConfig, exclude=("method",)), settings=FinetuneSettings)
def finetune(store: STORE, out: OUT, cfg: PatchConfig, settings: FinetuneSettings, slides: SLIDES = None) -> None:
    """Fine-tune the encoder (all blocks or --train-blocks N) + a linear head on the labelled patches."""
    _run(dataclasses.replace(cfg, method="finetune"), store, out, settings, slides)


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Study folders or run folders of `mil patches`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for table.md, table.csv and the plots.")],
    baseline: Annotated[Optional[str], typer.Option(help="Init to test against (default: random).")] = None,
) -> None:
    """Mean ± sd over seeds per encoder x init x level x fraction, Welch p against the baseline init."""
    from mil.patches.outputs import write_study
    from mil.patches.run import read_records

    files = write_study(out, read_records(runs), baseline=baseline)
    out_console.print((out / "table.md").read_text(), highlight=False, markup=False)
    for name, path in files.items():
        out_console.print(f"{name}: {path}", highlight=False)


def register(mil_app: typer.Typer) -> None:
    """Add the `patches` group (probe, finetune, compare) to the mil app."""
    app = typer.Typer(help="Patch classification over an image store: probes, fine-tuning, calibration.",
                      no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    app.command("probe")(probe)
    app.command("finetune")(finetune)
    app.command("compare")(compare)
    mil_app.add_typer(app, name="patches")
