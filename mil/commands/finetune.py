"""`mil finetune`: top-k end-to-end fine-tuning of a trained run's encoder + head (HistoTransfer)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import TextColumn
from rich.table import Table

from featstore.core.config import config_command
from featstore.core.ui import fmt3 as _fmt
from featstore.core.ui import out_console as console
from mil.config import FinetuneConfig, FinetuneSpec

_STAGES = {"train": "train", "val": "validate", "reselect": "re-select top-k", "test": "score test slides"}


@config_command(spec=FinetuneSpec, cfg=FinetuneConfig)
def finetune(spec: FinetuneSpec, cfg: FinetuneConfig) -> None:
    """Fine-tune a run's encoder + attention head end to end on each slide's top-k tiles read from the WSI."""
    from featstore.core.ui import progress_bar
    from mil.finetune import finetune_run

    with progress_bar(TextColumn("{task.fields[note]}"), eta=False, console=console) as bar:
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
    out = Path(spec.out)
    m, fr = res.metrics["folds"][res.fold], res.metrics["frozen"]["folds"][res.fold]
    from mil.tasks import task_columns

    table = Table(title=f"{out}: fold {res.fold}, {m['n']} test slides, k={cfg.k}")
    cols = task_columns(res.task)    # AUC ...; C-index ...; Pearson r ...
    for col in ("model", *(title for title, _ in cols)):
        table.add_column(col)

    def cell(row: dict, key: str) -> str:
        if key.endswith("_ci"):
            lo, hi = row.get(key) or (None, None)
            return f"{_fmt(lo)}-{_fmt(hi)}"
        v = row.get(key)
        return str(v) if isinstance(v, int) else _fmt(v)

    for name, row in (("frozen", fr), ("fine-tuned", m)):
        table.add_row(name, *(cell(row, k) for _, k in cols))
    console.print(table)
    console.print(f"fine-tuned encoder: [bold]{out / 'encoder.pt'}[/] "
                  f"(featstore extract --encoder {res.model.encoder.name} --weights {out / 'encoder.pt'})")


def register(app: typer.Typer) -> None:
    """Add `finetune` to the mil app."""
    app.command("finetune")(finetune)
