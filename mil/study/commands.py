"""`featstore study STUDY.yaml` and `featstore demo`: the main job in one command."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.progress import TextColumn

from featstore.core.ui import out_console, progress_bar

#: Package loggers whose per-run INFO lines the study's progress display replaces.
QUIET_LOGGERS = ("featstore", "mil", "analysis")

#: The demo study: resnet18 random vs pretrained on the cohort (2 fractions) and densenet121,
#: x levels 0-3 x 3 seeds, fine-tune the best, CKA. Sized for a
#: 2-core CPU (see docs/study.md for the measured time).
DEMO_STUDY = {
    "name": "demo cohort (generated, H&E-like)",
    "slides": ["data/slides"],
    "labels": "data/labels.csv",
    "store": "cohort.zarr",
    "out": "study",
    "encoders": [
        {"name": "resnet18", "weights": ["random", "pretrain"], "levels": [0, 1, 2, 3]},
        {"name": "densenet121", "weights": ["imagenet-or-random"], "levels": [0, 1, 2, 3]},
    ],
    "seeds": [0, 1, 2],
    "folds": 4,
    "extract": {"batch_size": 32},
    "mil": {"epochs": 40, "patience": 10, "lr": 5e-4},
    "finetune": {"enabled": True, "k": 8, "epochs": 2, "eval_tiles": "topk"},
    # resnet18 pretrained with SimCLR on the demo's own tiles (one epoch: the 10-minute budget), on 25 % and on all of them
    "pretrain": {"fractions": [0.25, 1.0], "epochs": 1, "batch_size": 32, "lr": 5e-4},
    "cka": True,
    "heatmaps": 3,
}


@contextmanager
def quiet_package_logs(names: tuple[str, ...] = QUIET_LOGGERS) -> Iterator[None]:
    """Raise the package loggers to WARNING inside the block (unless debugging); restored after."""
    if logging.getLogger().level <= logging.DEBUG:
        yield
        return
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, before):
            lg.setLevel(level)


def _run_study(cfg) -> None:
    """Run any study form (its config's ``runner``) under one progress display."""
    from mil.study.base import StudyEvent

    with quiet_package_logs(), progress_bar(TextColumn("{task.fields[item]}")) as p:
        tasks: dict[str, int] = {}

        def on_event(e: StudyEvent) -> None:
            if e.stage not in tasks:
                tasks[e.stage] = p.add_task(e.stage, total=e.total, item="")
            p.update(tasks[e.stage], completed=e.done, total=e.total, item=e.text[:60])

        result = cfg.runner(on_event).run()
    out = out_console
    if result.failures:
        out.print(f"[yellow]{len(result.failures)} item(s) failed[/]; they are listed in the report")
    out.print(f"new work this run: {result.new_work}")
    out.print(f"[bold green]report:[/] {result.report}")


def register(featstore_app: typer.Typer, mil_app: typer.Typer) -> None:
    @featstore_app.command("study")
    def study_cmd(
        study_file: Annotated[Path, typer.Argument(help="Study YAML (slides, labels, encoders x weights x levels, seeds, ...; task: patch for labelled images, task: segmentation for image/mask pairs).")],
    ) -> None:
        """Run a whole transfer-learning study and write report/report.md (reruns do only what is missing)."""
        from mil.study.forms import load_study

        _run_study(load_study(study_file))

    @featstore_app.command("demo")
    def demo_cmd(
        out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo cohort, store, runs and report.")] = Path("demo"),
        n_slides: Annotated[int, typer.Option(help="Slides in the generated cohort.")] = 24,
        seed: Annotated[int, typer.Option(help="Seed of the generated cohort.")] = 0,
    ) -> None:
        """Generate the demo cohort and run the demo study on it (two encoders x levels 0-3 x 3 seeds,
        top-k fine-tuning of the best, CKA), printing where the report is."""
        from mil.study.study import StudyConfig
        from featstore.demo import make_demo_cohort

        out.mkdir(parents=True, exist_ok=True)
        if not (out / "data" / "labels.csv").exists():
            from featstore.core.ui import counting_bar

            with counting_bar(f"demo cohort -> {out / 'data'}", n_slides) as advance:
                make_demo_cohort(out / "data", n_slides=n_slides, seed=seed, progress=advance)
        study_file = out / "study.yaml"
        if not study_file.exists():
            study_file.write_text(yaml.safe_dump(DEMO_STUDY, sort_keys=False))
        _run_study(StudyConfig.from_yaml(study_file))
