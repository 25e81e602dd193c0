"""`featstore ls`, `featstore import-h5`, `featstore export-h5`: look into and move stores."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from featstore.core.ui import check_format, counting_bar, err_console, out_console, reason_table, write_json, write_tsv
from featstore.errors import FeatstoreError


#: `featstore ls` lists at most this many slides one per row unless --all (the totals always cover all).
LS_ROWS = 50


def _key_text(k) -> str:
    return f"{k.encoder}:{k.weights}:minus{k.minus}"


def _has_qc(st) -> bool:
    """True when the store was tiled with per-tile QC (``--qc flag|drop``)."""
    return (st.tiling or {}).get("qc", "off") != "off"


def _qc_text(st, sid: str) -> str:
    """A slide's QC counts, e.g. ``blur 3, dark 1, background 0`` (``dropped`` with --qc drop)."""
    from featstore.tileqc import qc_text

    q = st.slide_info(sid).get("qc") or {}
    return qc_text(q.get("flagged"), q.get("dropped"))


def _coverage_table(st, store: str, show_all: bool = False) -> tuple[str, Table, list[str]]:
    """A title line, the table slides x feature sets (tile counts, which features are complete, a
    totals row) and the legend lines naming each column's feature set in full
    (``#1  resnet18:file-...:minus1``): a store path or weights tag is never cut or folded.

    One listing of the store (``coverage()``): one read on a consolidated store, whatever its size.
    Beyond :data:`LS_ROWS` slides only the first ones get a row unless *show_all*."""
    cov = st.coverage()
    keys = sorted({k for _, ks in cov.values() for k in ks})
    slides = list(cov)
    t = Table()
    t.add_column("slide", no_wrap=True)
    t.add_column("tiles", justify="right")
    qc = _has_qc(st)
    if qc:
        t.add_column("QC flagged", no_wrap=True)
    for i, _ in enumerate(keys):
        t.add_column(f"#{i + 1}", justify="center")
    totals = [0] * len(keys)
    shown = slides if show_all else slides[:LS_ROWS]
    for sid in slides:
        n, have = cov[sid]
        for i, k in enumerate(keys):
            totals[i] += k in have
    for sid in shown:
        n, have = cov[sid]
        t.add_row(sid, "?" if n is None else str(n), *([_qc_text(st, sid)] if qc else []),
                  *["[green]yes[/]" if k in have else "[dim]-[/]" for k in keys])
    pad = [""] * (len(keys) + qc)
    if len(shown) < len(slides):
        t.add_row(f"[dim]... {len(slides) - len(shown)} more (--all)", "", *pad)
    t.add_row("[bold]complete", "", *([""] if qc else []), *[f"{n}/{len(slides)}" for n in totals], end_section=True)
    legend = [f"#{i + 1}  {_key_text(k)}  ({n}/{len(slides)} slides)" for i, (k, n) in enumerate(zip(keys, totals))]
    return f"{store}: {len(slides)} slides, {len(keys)} feature sets", t, legend


def _coverage_records(st) -> tuple[list[dict], list[str]]:
    """One record per slide (every slide): id, tiles and ``yes``/``no`` per feature set, whose
    column is its whole ``encoder:weights:minusK`` (and its QC counts last, when tiled with --qc)."""
    cov = st.coverage()
    keys = sorted({k for _, ks in cov.values() for k in ks})
    names = [_key_text(k) for k in keys]
    qc = _has_qc(st)
    records = [{"slide": sid, "tiles": n, **{name: "yes" if k in have else "no" for name, k in zip(names, keys)},
                **({"qc": _qc_text(st, sid)} if qc else {})}
               for sid, (n, have) in cov.items()]
    return records, ["slide", "tiles", *names, *(["qc"] if qc else [])]


def _print_provenance(st) -> None:
    """One line per feature set: dim, weights sha256, precision, featstore version (first slide with it)."""
    slides = st.slide_ids()
    for k in st.encoders():
        sid = next(s for s in slides if st.has_features(s, k.encoder, k.minus, k.weights))
        p = st.provenance(sid, k.encoder, k.minus, k.weights)
        out_console.print(f"[bold]{k}[/]: dim={p.get('dim')} sha256={p.get('weights_sha256')} "
                          f"precision={p.get('precision')} version={p.get('featstore_version')}", highlight=False)


def ls(
    store: Annotated[str, typer.Argument(help="Store path or URL.")],
    provenance: Annotated[bool, typer.Option(help="Also print the provenance of each feature set.")] = False,
    show_all: Annotated[bool, typer.Option("--all", help=f"One row per slide even beyond {LS_ROWS} slides.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="table (for people) | tsv (one line per slide, a column "
                                                      "per encoder:weights:minusK, every slide) | json (slides, "
                                                      "feature sets and failures).")] = "table",
) -> None:
    """Show slides x (encoder, weights, level) with tile counts, and the failure log."""
    from featstore.store import open_store

    check_format(fmt)
    st = open_store(store)
    if fmt != "table":
        records, columns = _coverage_records(st)
        if fmt == "tsv":
            write_tsv(records, columns)
        else:
            write_json({"store": store, "feature_sets": [c for c in columns[2:] if c != "qc"], "slides": records,
                        "failures": st.failures()})
        return
    title, table, legend = _coverage_table(st, store, show_all)
    out_console.print(title, markup=False, highlight=False, soft_wrap=True)
    out_console.print(table)
    for line in legend:
        out_console.print(line, markup=False, highlight=False, soft_wrap=True)
    if provenance and st.slide_ids():
        _print_provenance(st)
    fails = st.failures()
    if fails:
        out_console.print(reason_table("failure log", sorted(fails.items())))


def _h5_files(inputs: list[Path]) -> list[Path]:
    """The .h5 files named by *inputs* (files, or directories searched for ``*.h5``)."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files.extend(sorted(p.glob("*.h5")))
        elif p.is_file():
            files.append(p)
        else:
            raise FeatstoreError(f"{p}: no such file or directory")
    if not files:
        raise FeatstoreError(f"no .h5 files in {', '.join(map(str, inputs))}")
    return files


def import_h5(
    inputs: Annotated[list[Path], typer.Argument(help="Directories or .h5 files (CLAM/TRIDENT layout).")],
    store: Annotated[str, typer.Option("--store", "-s", help="Store to import into (created if missing).")],
    encoder: Annotated[str, typer.Option("--encoder", "-e", help="Encoder name to record the features under.")],
    minus: Annotated[int, typer.Option("--minus", "-m", help="Truncation level to record.")] = 0,
    weights: Annotated[str, typer.Option(help="Weights tag to record.")] = "imported",
    size0: Annotated[Optional[int], typer.Option(help="Patch side in level-0 px when the files do not say.")] = None,
    slide_mpp: Annotated[Optional[float], typer.Option(help="Slides' microns per pixel, recorded for heatmaps.")] = None,
) -> None:
    """Import per-slide .h5 features (features (N, D) or (1, N, D), coords (N, 2)) into a store."""
    from featstore.h5io import import_h5 as _import
    from featstore.store import open_store_writer

    files = _h5_files(inputs)
    with counting_bar("h5 files", len(files)) as advance:
        writer = open_store_writer(store)
        rep = _import(files, writer, encoder, minus, weights, size0, slide_mpp, advance)
    if rep.imported:
        writer.consolidate()
    out_console.print(f"imported {len(rep.imported)}, already present {len(rep.skipped)}, failed {len(rep.failed)}")
    for sid, why in rep.failed.items():
        err_console.print(f"[red]{sid}[/]: {why}", highlight=False)
    if rep.failed:
        raise typer.Exit(1)


def export_h5(
    store: Annotated[str, typer.Argument(help="Store path or URL.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for <slide_id>.h5 files.")],
    encoder: Annotated[str, typer.Option("--encoder", "-e", help="Encoder name.")],
    minus: Annotated[int, typer.Option("--minus", "-m", help="Truncation level.")] = 0,
    weights: Annotated[Optional[str], typer.Option(help="Weights tag (needed if several are stored).")] = None,
) -> None:
    """Write one CLAM/TRIDENT-style .h5 per slide (features float32, coords, patch_size attrs)."""
    from featstore.h5io import export_h5 as _export
    from featstore.store import open_store

    st = open_store(store)
    with counting_bar("slides", len(st.slide_ids())) as advance:
        paths = _export(st, out, encoder, minus, weights, progress=advance)
    out_console.print(f"wrote {len(paths)} files to {out}")


def consolidate(
    store: Annotated[str, typer.Argument(help="Store path or URL.")],
    storage_options: Annotated[Optional[str], typer.Option(
        help='JSON fsspec options for a remote store, e.g. \'{"endpoint_url": "http://host:9000"}\'.')] = None,
) -> None:
    """Write the store's consolidated listing (extract and import-h5 do it when they finish).

    Opening and listing then cost one read however many slides the store holds; changes made
    since stay visible (docs/store-format.md). Run it after copying or editing a store by hand."""
    import time

    from featstore.store import open_store_writer

    from featstore.read.remote import parse_storage_options
    from featstore.store import open_store

    t0 = time.perf_counter()
    so = parse_storage_options(storage_options)
    open_store(store, storage_options=so)  # an existing store only: a typo must not create one
    st = open_store_writer(store, storage_options=so)
    with err_console.status(f"consolidating {store} (about 2.5 ms a slide)"):
        n, cleared = st.consolidate()
    out_console.print(f"consolidated {n} slides in {time.perf_counter() - t0:.1f} s "
                      f"({cleared} change markers folded in) -> {store}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `featstore ls`, `consolidate`, `import-h5` and `export-h5` to *app*."""
    app.command("ls")(ls)
    app.command("consolidate")(consolidate)
    app.command("import-h5")(import_h5)
    app.command("export-h5")(export_h5)
