"""`mil seg train|predict|compare`: segmentation transfer on image/mask folders or annotated slides
(docs/segmentation.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from featstore.core.config import Options, config_command
from featstore.core.ui import out_console
from mil.seg.config import SegConfig, SlidePredictConfig, WsiSource


@config_command(cfg=Options(SegConfig), wsi=Options(WsiSource))
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: model.pt, metrics.json, pictures/.")],
    cfg: SegConfig,
    wsi: WsiSource,
    images: Annotated[Optional[Path], typer.Option(
        "--images", help="Folder of images (masks in the sibling masks/); or --slides.")] = None,
    masks: Annotated[Optional[Path], typer.Option(help="Masks folder (default: images/../masks).")] = None,
    test_images: Annotated[Optional[list[Path]], typer.Option(
        help="Out-of-domain image folders to score without retraining (repeatable).")] = None,
    test_slides: Annotated[Optional[list[Path]], typer.Option(
        help="Out-of-domain slide folders (with their annotations, cut like --slides), repeatable.")] = None,
) -> None:
    """Train a U-Net / U-Net++ with a registry encoder on image/mask folders or annotated slides;
    score in-domain and out-of-domain test sets."""
    from dataclasses import replace

    from rich.progress import TextColumn

    from featstore.core.ui import progress_bar
    from mil.seg.errors import SegError
    from mil.seg.run import load_folder, load_wsi, run_segmentation

    if (images is None) == (wsi.slides is None):
        raise SegError("give either --images (image/mask folders) or --slides (annotated slides), not both or neither")
    train_set = load_folder(images, masks, cfg) if images is not None else load_wsi(wsi, cfg)
    ood = [load_folder(folder, None, cfg) for folder in test_images or []]
    ood += [load_wsi(replace(wsi, slides=str(f), annotations=None), cfg) for f in test_slides or []]

    with progress_bar(TextColumn("{task.fields[note]}"), console=out_console) as bar:
        task = bar.add_task(f"{cfg.arch} {cfg.encoder}", total=cfg.epochs, note="")

        def on_epoch(r) -> None:
            bar.update(task, completed=r.epoch, note=f"loss {r.train_loss:.3f} val {r.metrics.get('val_loss', float('nan')):.3f}")

        metrics = run_segmentation(cfg, train_set, out, ood, on_epoch)
        bar.update(task, total=bar.tasks[0].completed)
    table = Table(title=f"{out}: {cfg.arch} on {cfg.encoder} ({cfg.weights})")
    for col in ("set", "n", "Dice", "IoU", "pixel acc.", "object Dice", "AJI"):
        table.add_column(col)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name, m in metrics.items():
        table.add_row(name, str(m.get("n")), fmt(m.get("dice")), fmt(m.get("iou")), fmt(m.get("pixel_accuracy")),
                      fmt(m.get("object_dice")), fmt(m.get("aji")))
    out_console.print(table)


def predict(
    run: Annotated[Path, typer.Option("--run", help="A `mil seg train` run folder (config.json, model.pt).")],
    images: Annotated[Path, typer.Option("--images", help="Folder of images to segment.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for <name>_pred.png masks and overlays.")],
) -> None:
    """Segment a folder of images with a trained run (masks beside them in ../masks are scored too)."""
    from mil.seg.predict import predict_folder

    metrics, n = predict_folder(run, images, out)
    out_console.print(f"{n} images segmented into {out}", highlight=False)
    if metrics:
        out_console.print(f"Dice {metrics['dice']:.3f}  IoU {metrics['iou']:.3f}  (masks found beside the images)",
                          highlight=False)


@config_command(cfg=Options(SlidePredictConfig))
def predict_slides(
    slides: Annotated[list[str], typer.Argument(help="Slide files, folders, globs, or a CSV slide_id,path[,mpp].")],
    run: Annotated[Path, typer.Option("--run", help="A `mil seg train` run folder (config.json, model.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for <slide_id>.png class maps and seg.json "
                                                          "(resumes where it stopped).")],
    cfg: SlidePredictConfig,
) -> None:
    """Segment whole slides with a trained run: a class map per slide for `featstore view --seg` (and QuPath
    GeoJSON with --geojson), each class's area in mm²."""
    from featstore.core.ui import reason_table, slide_progress
    from mil.seg.slides import predict_slides as run_slides

    report = run_slides(run, slides, out, cfg, slide_progress)
    out_console.print(f"segmented {len(report.done)}, already done {len(report.already)}, skipped "
                      f"{len(report.skipped)} -> {out}", highlight=False)
    if report.skipped:
        out_console.print(reason_table(f"skipped slides (also in {out}/seg.json)", report.skipped.items()))
        raise typer.Exit(1)


def compare(
    runs: Annotated[list[Path], typer.Argument(help="`mil seg train` run folders, or folders holding them.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for table.md, table.csv, dice_vs_fraction.png.")],
    baseline: Annotated[Optional[str], typer.Option(help="Init to test against (default: imagenet, else random).")] = None,
) -> None:
    """Init x architecture x fraction (in-domain and out-of-domain sets): mean ± sd over seeds, Welch p."""
    from mil.seg.compare import compare_seg, read_seg_records

    files = compare_seg(read_seg_records(runs), out, baseline)
    out_console.print(Path(files["table_md"]).read_text(), highlight=False, markup=False)
    for name, path in files.items():
        out_console.print(f"{name}: {path}", highlight=False)


def register(mil_app: typer.Typer) -> None:
    """Add the `seg` group to the mil app."""
    app = typer.Typer(help="Segmentation transfer: U-Net / U-Net++ on registry encoders.", no_args_is_help=True,
                      add_completion=False, pretty_exceptions_enable=False)
    app.command("train")(train)
    app.command("predict")(predict)
    app.command("predict-slides")(predict_slides)
    app.command("compare")(compare)
    mil_app.add_typer(app, name="seg")
