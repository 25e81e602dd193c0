"""`featstore extract`: slides -> embeddings at one or more truncation levels -> Zarr store.

The options are not declared here: they come from the fields of :class:`ExtractConfig` and
:class:`TilingConfig` (each field carries its default and help; :mod:`featstore.core.config`). Tiling
options are overrides: unset ones take the store's recorded tiling, else the declared default.
``--images DIR|FILE.csv`` extracts an image cohort instead of slides (docs/images.md).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Optional

import typer

from featstore.core.config import Options, config_command, help_of
from featstore.core.ui import err_console, out_console, reason_table, slide_progress
from featstore.config import ExtractConfig
from featstore.errors import FeatstoreError
from featstore.tiling import TilingConfig

DEFAULT_SHARD_SIZE = 1024   # featstore.read.images.DEFAULT_SHARD_SIZE (not imported: keeps --help free of PIL)

_FIELDS = {f.name: f for f in dataclasses.fields(ExtractConfig)}
_DEFAULT_LEVELS = ",".join(str(lv) for lv in _FIELDS["levels"].default)
#: Tiling options of the command (the mask's resolution keeps its default / the store's).
TILING_OPTIONS = Options(TilingConfig, exclude=("thumb_mpp",), overrides=True, note="or the store's tiling")
#: Pipeline options: every ExtractConfig field but the levels (``--minus`` text, "all" needs the encoder).
EXTRACT_OPTIONS = Options(ExtractConfig, exclude=("levels",))


def build_config(st, cfg: ExtractConfig, minus: str = _DEFAULT_LEVELS, tiling: dict | None = None) -> ExtractConfig:
    """The command's config completed: ``--minus`` parsed for its encoder, unset tiling options from the store."""
    from featstore.encoders import parse_levels

    from featstore.read.images import is_images_tiling

    stored = st.tiling if st.tiling and not is_images_tiling(st.tiling) else None
    base = TilingConfig.from_dict(stored) if stored else TilingConfig()
    return dataclasses.replace(cfg, levels=parse_levels(minus, cfg.encoder, weights=cfg.weights) or (),
                               tiling=dataclasses.replace(base, **(tiling or {})))


def discover(slides: list[str] | None, images: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
             tiling: dict | None = None) -> tuple[list, str]:
    """The run's refs and how to count them: SLIDES, or the shards of ``--images`` (never both)."""
    from featstore.cohort import discover_slides
    from featstore.read.images import discover_images

    if images is None:
        if not slides:
            raise FeatstoreError("give SLIDES (files, directories, globs, a CSV) or --images DIR|FILE.csv")
        return discover_slides(slides), "slides"
    if slides:
        raise FeatstoreError(f"--images {images} and SLIDES ({slides[0]} ...) in one run; images and slides "
                             "need separate stores")
    if tiling:
        raise FeatstoreError(f"--images: tiling options ({', '.join('--' + k.replace('_', '-') for k in tiling)}) "
                             "apply to slides only")
    refs = discover_images(images, shard_size)
    return refs, f"images={sum(len(r.images) for r in refs)} shards"


def run_extract(slides: list[str] | None, store: str, cfg: ExtractConfig, *, minus: str = _DEFAULT_LEVELS,
                tiling: dict | None = None, show_progress: bool = True, storage_options: dict | None = None,
                images: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE):
    """The single-process command: complete the config (see :func:`build_config`), run, return the report."""
    from featstore.extract import Extractor
    from featstore.store import open_store_writer

    refs, what = discover(slides, images, shard_size, tiling)
    st = open_store_writer(store, storage_options=storage_options)
    ex = Extractor(build_config(st, cfg, minus, tiling))
    err_console.print(
        f"[bold]{ex.encoder.name}[/] weights={ex.feature_tag} levels={list(ex.levels)} "
        f"dims={[ex.encoder.dims[lv] for lv in ex.levels]} precision={ex.precision} device={ex.device} "
        f"input={ex.input_size}px {what}={len(refs)} -> {store}", highlight=False,
    )
    if not show_progress:
        report = ex.run(refs, st)
    else:
        with slide_progress(len(refs)) as progress:
            report = ex.run(refs, st, progress)
    return report, ex


def run_distributed(slides: list[str], store: str, cfg: ExtractConfig, *, minus: str = _DEFAULT_LEVELS,
                    tiling: dict | None = None, cluster: str = "local:1", storage_options: dict | None = None,
                    show_progress: bool = True, images: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE):
    """`featstore extract --cluster`: connect (or start local:N), submit slides (or image shards:
    one task each), draw progress, report."""
    from featstore.distributed import ClusterSpec, connect, extract_distributed
    from featstore.read.remote import remote_options, store_location
    from featstore.store import open_store_writer

    refs, what = discover(slides or None, images, shard_size, tiling)
    location = store_location(store)
    st = open_store_writer(location, storage_options=remote_options(location, storage_options))
    cfg = build_config(st, cfg, minus, tiling)
    spec = ClusterSpec.parse(cluster)
    # our own LocalCluster: split this machine's cores between the worker processes
    threads = max(1, (os.cpu_count() or 1) // spec.n_workers) if spec.local else None
    with connect(spec) as client:
        n = len(client.scheduler_info().get("workers", {}))
        err_console.print(f"[bold]{cfg.encoder}[/] weights={cfg.weights} levels={list(cfg.levels)} "
                          f"precision={cfg.precision} {what}={len(refs)} cluster={cluster} ({n} workers) -> {store}",
                          highlight=False)
        kw = dict(storage_options=storage_options, torch_threads=threads, gpu_by_name=spec.local)
        if not show_progress:
            report = extract_distributed(refs, store, cfg, client, **kw)
        else:
            with slide_progress(len(refs)) as progress:
                report = extract_distributed(refs, store, cfg, client, progress=progress, **kw)
    if report.done:  # the tasks leave it to the client: one consolidation for the whole run
        st.consolidate()
    return report


def print_report(report, store: str) -> None:
    """The run's one-line summary on stdout, and a table of the failed slides."""
    out_console.print(
        f"done {len(report.done)}, already complete {len(report.skipped)}, claimed by another process "
        f"{len(report.busy)}, failed {len(report.failed)}; {report.tiles:,} tiles in {report.seconds:.1f} s "
        f"({report.tiles / max(report.seconds, 1e-9):,.1f} tiles/s) -> {store}", highlight=False,
    )
    if report.failed:
        out_console.print(reason_table("failed slides (also recorded in the store's failure log)",
                                       report.failed.items()))


@config_command(cfg=EXTRACT_OPTIONS, tiling=TILING_OPTIONS)
def extract(
    store: Annotated[str, typer.Option("--store", "-s", help="Zarr store path or fsspec URL (created if missing).")],
    minus: Annotated[str, typer.Option(*_FIELDS["levels"].metadata["flags"],
                                       help=help_of(_FIELDS["levels"]))] = _DEFAULT_LEVELS,
    cfg: ExtractConfig = None,  # built by config_command from its generated options (never None)
    tiling: dict = None,        # the tiling options given on the command line
    cluster: Annotated[Optional[str], typer.Option(
        help="Run slides on a dask.distributed scheduler ADDRESS or local:N.")] = None,
    storage_options: Annotated[Optional[str], typer.Option(
        help='JSON fsspec options for a remote store, e.g. \'{"endpoint_url": "http://host:9000"}\'.')] = None,
    slides: Annotated[Optional[list[str]], typer.Argument(
        help="Slide files, directories, globs, or a CSV with slide_id,path (none with --images).")] = None,
    images: Annotated[Optional[str], typer.Option(
        help="An image cohort instead of slides: a folder DIR/<class>/*.png|jpg|tif|bmp, or a CSV "
             "path,label[,split][,group] (docs/images.md).")] = None,
    shard_size: Annotated[int, typer.Option(
        help="--images: images per shard (one store group each).")] = DEFAULT_SHARD_SIZE,
) -> None:
    """Extract patch embeddings of every slide (or image of --images) into a chunked Zarr store (resumable, crash-safe)."""
    from featstore.read.remote import parse_storage_options

    so = parse_storage_options(storage_options)
    if cluster:
        report = run_distributed(slides or [], store, cfg, minus=minus, tiling=tiling, cluster=cluster,
                                 storage_options=so, images=images, shard_size=shard_size)
    else:
        report, _ = run_extract(slides, store, cfg, minus=minus, tiling=tiling, storage_options=so,
                                images=images, shard_size=shard_size)
    print_report(report, store)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `featstore extract` to *app*."""
    app.command("extract")(extract)
