"""`featstore pretrain`: self-supervised pretraining (MAE, SimCLR, Barlow Twins) on a store's own tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import TextColumn
from rich.table import Table

from featstore.core.config import config_command
from featstore.core.ui import out_console
from featstore.pretrain.config import PretrainConfig


@config_command(cfg=PretrainConfig)
def pretrain_cmd(
    store: Annotated[Path, typer.Option("--store", "-s", help="Store whose tiles to train on (extract tiles it).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: one subfolder per fraction.")],
    cfg: PretrainConfig,
    slides: Annotated[Optional[list[str]], typer.Option(help="Slide files, if they moved since extraction.")] = None,
) -> None:
    """Pretrain an encoder on the store's tiles: --method mae (ViTs), simclr or barlowtwins (CNNs); auto picks
    mae for ViTs and simclr for CNNs. Nested --fraction subsets, one checkpoint each; rerun to resume."""
    from featstore.core.ui import progress_bar
    from featstore.pretrain import pretrain

    with progress_bar(TextColumn("{task.fields[note]}"), rate=True, console=out_console) as bar:
        tasks: dict[str, int] = {}

        def on_step(subset: str, done: int, total: int, loss: float) -> None:
            if subset not in tasks:
                tasks[subset] = bar.add_task(f"{cfg.encoder} {subset}", total=total, completed=done - 1, note="")
            bar.update(tasks[subset], completed=done, note=f"loss {loss:.4f}")

        results = pretrain(cfg, store, out, slides=slides, on_step=on_step)
    table = Table(title=f"{out}: {cfg.encoder} pretrained on {store}")
    for col in ("subset", "tiles", "steps", "loss first → last epoch", "held-out loss"):
        table.add_column(col)
    for r in results:
        h0, h1 = r.holdout_loss
        held = f"{h0:.4f} → {h1:.4f}" if h0 is not None and h1 is not None else "-"
        table.add_row(r.subset, str(r.tiles), str(r.steps), f"{r.epoch_loss[0]:.4f} → {r.epoch_loss[-1]:.4f}",
                      held)
    out_console.print(table)
    for r in results:
        out_console.print(f"{r.subset}: tag {r.tag}; featstore extract --encoder {cfg.encoder} --weights {r.path}",
                          highlight=False)


def register(app: typer.Typer) -> None:
    """Add `pretrain` to the featstore app."""
    app.command("pretrain")(pretrain_cmd)
