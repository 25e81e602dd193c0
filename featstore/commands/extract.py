"""`featstore extract`: slides -> embeddings at one or more truncation levels -> Zarr store."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from featstore.errors import FeatstoreError

console = Console(stderr=True)


def parse_levels(text: str, encoder: str | None = None) -> tuple[int, ...]:
    """'1' -> (1,); '0,1,2,3' -> (0, 1, 2, 3); 'all' -> every level the encoder offers."""
    if text.strip().lower() == "all":
        if encoder is None:
            return (0, 1, 2, 3)
        from featstore.encoders import get_spec

        return tuple(get_spec(encoder).levels)
    try:
        levels = tuple(sorted({int(p) for p in text.split(",") if p.strip()}))
    except ValueError:
        raise FeatstoreError(f"--minus {text!r}: give levels as integers, e.g. 1 or 0,1,2,3 or all") from None
    if not levels or min(levels) < 0:
        raise FeatstoreError(f"--minus {text!r}: levels are integers >= 0")
    return levels


class RichProgress:
    """featstore.extract.Progress drawn with rich: slides, tiles, tiles/s, ETA."""

    def __init__(self, progress: Progress, n_slides: int):
        self.p = progress
        self.slides = progress.add_task("slides", total=n_slides)
        self.tiles = progress.add_task("tiles", total=0)

    def slide_started(self, slide_id: str, n_tiles: int) -> None:
        total = self.p.tasks[self.tiles].total or 0
        self.p.update(self.tiles, total=total + n_tiles, description=f"tiles ({slide_id})")

    def tiles_done(self, n: int) -> None:
        self.p.advance(self.tiles, n)

    def slide_finished(self, slide_id: str, status: str) -> None:
        self.p.advance(self.slides)


def build_config(st, encoder: str, minus: str = "0", weights: str = "random", mpp: float | None = None,
                 patch_size: int | None = None, overlap: int | None = None, min_tissue: float | None = None,
                 resize: int | None = None, batch_size: int = 32, workers: int = 0, precision: str = "auto",
                 device: str = "auto", slide_mpp: float | None = None, seed: int = 0,
                 allow_download: bool = False, strict_weights: bool = True):
    """The command's options as an ExtractConfig; unset tiling options default to the store's."""
    from dataclasses import replace

    from featstore.extract import ExtractConfig
    from featstore.tiling import TilingConfig

    tiling = TilingConfig.from_dict(st.tiling) if st.tiling else TilingConfig()
    overrides = {k: v for k, v in dict(mpp=mpp, patch_size=patch_size, overlap=overlap,
                                       min_tissue=min_tissue).items() if v is not None}
    return ExtractConfig(encoder=encoder, levels=parse_levels(minus, encoder), weights=weights,
                         tiling=replace(tiling, **overrides), input_size=resize, batch_size=batch_size,
                         workers=workers, precision=precision, device=device, slide_mpp=slide_mpp, seed=seed,
                         allow_download=allow_download, strict_weights=strict_weights)


def run_extract(slides: list[str], store: str, *, show_progress: bool = True,
                storage_options: dict | None = None, **options):
    """The single-process command: build the config (options as build_config), run, return the report."""
    from featstore.cohort import discover_slides
    from featstore.extract import Extractor
    from featstore.store import open_store

    refs = discover_slides(slides)
    st = open_store(store, mode="a", storage_options=storage_options)
    ex = Extractor(build_config(st, **options))
    console.print(
        f"[bold]{ex.encoder.name}[/] weights={ex.encoder.weights_tag} levels={list(ex.levels)} "
        f"dims={[ex.encoder.dims[lv] for lv in ex.levels]} precision={ex.precision} device={ex.device} "
        f"input={ex.input_size}px slides={len(refs)} -> {store}", highlight=False,
    )
    if not show_progress:
        return ex.run(refs, st), ex
    with _progress() as p:
        report = ex.run(refs, st, RichProgress(p, len(refs)))
    return report, ex


def counting_bar(label: str, total: int):
    """A context manager yielding an ``advance(n)`` callback drawn as a rich bar with ETA."""
    from contextlib import contextmanager

    @contextmanager
    def bar():
        with _progress() as p:
            task = p.add_task(label, total=total)
            yield lambda n=1: p.advance(task, n)

    return bar()


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console,
    )


class _Rate(TextColumn):
    """items/s of a task (rich's speed estimate), blank until known."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        return Text(f"{task.speed:,.1f}/s" if task.speed else "", style="cyan")


def print_report(report, store: str) -> None:
    out = Console()
    out.print(
        f"done {len(report.done)}, already complete {len(report.skipped)}, claimed by another process "
        f"{len(report.busy)}, failed {len(report.failed)}; {report.tiles:,} tiles in {report.seconds:.1f} s "
        f"({report.tiles / max(report.seconds, 1e-9):,.1f} tiles/s) -> {store}", highlight=False,
    )
    if report.failed:
        t = Table(title="failed slides (also recorded in the store's failure log)", show_lines=False)
        t.add_column("slide")
        t.add_column("reason", overflow="fold")
        for sid, reason in report.failed.items():
            t.add_row(sid, reason)
        out.print(t)


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract_cmd(
        slides: Annotated[list[str], typer.Argument(help="Slide files, directories, globs, or a CSV with slide_id,path.")],
        store: Annotated[str, typer.Option("--store", "-s", help="Zarr store path or fsspec URL (created if missing).")],
        encoder: Annotated[str, typer.Option("--encoder", "-e", help="Encoder name (see `featstore encoders`).")],
        minus: Annotated[str, typer.Option("--minus", "-m", help="Truncation level(s): 1, or 0,1,2,3, or all. One forward pass for all.")] = "0",
        weights: Annotated[str, typer.Option(help="random | imagenet | a paper tag | path to .pth/.pt/.bin/.safetensors or a fine-tuned encoder.pt.")] = "random",
        mpp: Annotated[Optional[float], typer.Option(help="Target microns per pixel of a patch (default 0.5, or the store's tiling).")] = None,
        patch_size: Annotated[Optional[int], typer.Option(help="Patch side in pixels at --mpp (default 512).")] = None,
        overlap: Annotated[Optional[int], typer.Option(help="Overlap between patches in pixels at --mpp (default 0).")] = None,
        min_tissue: Annotated[Optional[float], typer.Option(help="Keep patches with at least this tissue fraction (default 0.5).")] = None,
        resize: Annotated[Optional[int], typer.Option(help="Encoder input side in px (default: the encoder's, e.g. 224).")] = None,
        batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 32,
        workers: Annotated[int, typer.Option(help="Reader threads, one OpenSlide handle each (0 = auto: 1 on CPU, where readers compete with the encoder for cores; up to 8 with CUDA).")] = 0,
        precision: Annotated[str, typer.Option(help="auto | bf16 | fp16 | fp32 (auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32).")] = "auto",
        device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
        slide_mpp: Annotated[Optional[float], typer.Option(help="Microns per pixel of slides whose files do not record it.")] = None,
        seed: Annotated[int, typer.Option(help="Seed for random weights.")] = 0,
        allow_download: Annotated[bool, typer.Option(help="Allow fetching weights from the internet (off: offline caches only).")] = False,
        strict_weights: Annotated[bool, typer.Option(help="Refuse weights files with missing/unexpected keys.")] = True,
        cluster: Annotated[Optional[str], typer.Option(help="Run slides on a dask.distributed scheduler ADDRESS or local:N.")] = None,
        storage_options: Annotated[Optional[str], typer.Option(help='JSON fsspec options for a remote store, e.g. \'{"endpoint_url": "http://host:9000"}\'.')] = None,
    ) -> None:
        """Extract patch embeddings of every slide into a chunked Zarr store (resumable, crash-safe)."""
        opts = {k: v for k, v in locals().items() if k not in ("cluster", "storage_options")}
        from featstore.remote import parse_storage_options

        so = parse_storage_options(storage_options)
        if cluster:
            from featstore.distributed import run_distributed_cli

            report = run_distributed_cli(**opts, cluster=cluster, storage_options=so)
        else:
            report, _ = run_extract(**opts, storage_options=so)
        print_report(report, store)
        if not report.ok:
            raise typer.Exit(1)
