"""Extraction benchmarks (issue 4): prints a table of ratios measured in one run.

    python benchmarks/bench_extract.py [--encoder densenet121] [--slides 12] [--precision auto]
    python benchmarks/bench_extract.py --encoder vit_small_patch16_224 --levels 0,4,8 --slides 4

- efficiency     = end-to-end tiles/s / model-only tiles/s (same encoder, precision, batch, threads)
- multi-level    = time(--minus LEVELS, default 0,1,2,3) / time(--minus 0)
- feeder         = tiles/s of one reader worker to normalised tensors / raw read_region tiles/s
- store read     = GB/s reading every slide's features via the read API / via per-slide .h5 files
- peak RSS       = max RSS extracting 20 slides / max RSS extracting 1 slide (separate processes)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featstore.cohort import discover_slides  # noqa: E402
from featstore.demo import make_demo_cohort  # noqa: E402
from featstore.encoders import autocast  # noqa: E402
from featstore.core.runtime import tuned_malloc  # noqa: E402
from featstore.extract import ExtractConfig, Extractor  # noqa: E402
from featstore.h5io import export_h5  # noqa: E402
from featstore.read.slide import Slide  # noqa: E402
from featstore.store import open_store  # noqa: E402
from featstore.tiling import TilingConfig, tile_slide  # noqa: E402
from featstore.read.tilesource import TileSource  # noqa: E402


def model_only(enc, prec: str, batch: int, n_tiles: int, size: int) -> float:
    dev = torch.device("cpu")
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode(), autocast(prec, dev):
        enc(x)  # warm-up
        t0 = time.perf_counter()
        done = 0
        while done < n_tiles:
            enc(x)
            done += batch
    return done / (time.perf_counter() - t0)


def end_to_end(ex: Extractor, refs, store: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    rep = ex.run(refs, store)
    return rep.tiles / (time.perf_counter() - t0), rep.tiles


def feeder(refs, size: int, n: int = 400) -> tuple[float, float]:
    slide = Slide(refs[0].path)
    tiles = tile_slide(slide, TilingConfig())
    coords = np.resize(tiles.coords, (n, 2))
    t0 = time.perf_counter()
    for x, y in coords:
        slide.read_region((int(x), int(y)), 0, (tiles.size0, tiles.size0))
    raw = n / (time.perf_counter() - t0)
    r = TileSource({"input_size": size, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}, workers=1)
    r.add(refs[0].slide_id, refs[0].path, tiles.size0)
    t0 = time.perf_counter()
    for i in range(0, n, 32):
        r.submit_batch([(refs[0].slide_id, coords[i:min(n, i + 32)])]).result()
    fed = n / (time.perf_counter() - t0)
    r.close()
    return fed, raw


def store_read(store: Path, encoder: str, level: int, tmp: Path) -> tuple[float, float]:
    import h5py

    st = open_store(store)
    h5dir = tmp / "h5"
    export_h5(st, h5dir, encoder, level)
    ids = st.slide_ids()
    t0 = time.perf_counter()
    nbytes = sum(st.features(s, encoder, level).nbytes for s in ids)
    zarr_gbs = nbytes / (time.perf_counter() - t0) / 1e9
    t0 = time.perf_counter()
    hbytes = 0
    for s in ids:
        with h5py.File(h5dir / f"{s}.h5", "r") as f:
            hbytes += f["features"][()].astype(np.float16).nbytes
    h5_gbs = hbytes / (time.perf_counter() - t0) / 1e9
    return zarr_gbs, h5_gbs


def peak_rss(slides_dir: Path, n: int, tmp: Path, encoder: str) -> float:
    code = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from featstore.cohort import discover_slides
from featstore.extract import ExtractConfig, Extractor
refs = discover_slides([{str(slides_dir)!r}])
refs = (refs * (1 + {n} // len(refs)))[:{n}]
refs = [type(r)(f"{{r.slide_id}}_{{i}}", r.path) for i, r in enumerate(refs)]
Extractor(ExtractConfig(encoder={encoder!r}, levels=(0,), batch_size=32)).run(refs, {str(tmp / f'rss{n}.zarr')!r})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def speed_rows(args, refs, tmp: Path) -> tuple[list[tuple], str, int]:
    """(rows, precision, tiles): efficiency, multi-level cost, feeder and store read, measured in
    interleaved rounds (the CPU's speed drifts by tens of percent between runs here: medians)."""
    cfg = dict(encoder=args.encoder, precision=args.precision, batch_size=args.batch_size, workers=args.workers)
    ex0 = Extractor(ExtractConfig(levels=(0,), **cfg))
    ex4 = Extractor(ExtractConfig(levels=tuple(int(v) for v in args.levels.split(",")), **cfg))
    # stain-normalised extraction: Macenko fitted to the first slide (issue 18)
    exs = Extractor(ExtractConfig(levels=(0,), stain="macenko", stain_reference=str(refs[0].path), **cfg))
    prec, size = ex0.precision, ex0.input_size
    for ex in (ex0, ex4, exs):  # warm-up: one slide each
        ex.run(refs[:1], tmp / f"warm-{len(ex.levels)}-{ex.cfg.stain}.zarr")
    e2e, e2e_all, e2e_stain, mo = [], [], [], []
    for r in range(args.rounds):
        rate, n_tiles = end_to_end(ex0, refs, tmp / f"m0-{r}.zarr")
        e2e.append(rate)
        mo.append(model_only(ex0.encoder, prec, args.batch_size, n_tiles, size))
        e2e_all.append(end_to_end(ex4, refs, tmp / f"m0123-{r}.zarr")[0])
        e2e_stain.append(end_to_end(exs, refs, tmp / f"m0-macenko-{r}.zarr")[0])
    e2e, e2e_all, e2e_stain, mo = (float(np.median(v)) for v in (e2e, e2e_all, e2e_stain, mo))
    fed, raw = feeder(refs, size)
    zr, hr = store_read(tmp / "m0123-0.zarr", args.encoder, 0, tmp)
    rows = [
        ("extraction efficiency (e2e / model-only tiles/s)", f"{e2e:.1f} / {mo:.1f}", e2e / mo, ">= 0.90"),
        (f"multi-level cost (time minus{args.levels} / time minus0)", f"{n_tiles / e2e_all:.1f}s / {n_tiles / e2e:.1f}s", e2e / e2e_all, "<= 1.05"),
        ("stain cost (time --stain macenko / time raw)", f"{n_tiles / e2e_stain:.1f}s / {n_tiles / e2e:.1f}s",
         e2e / e2e_stain, "info"),
        ("feeder (1 worker tiles/s / raw read_region tiles/s)", f"{fed:.0f} / {raw:.0f}", fed / raw, "info"),
        ("store read (read API GB/s / h5 GB/s)", f"{zr:.2f} / {hr:.2f}", zr / hr, "info"),
    ]
    return rows, prec, n_tiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="densenet121")
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="0 = the extractor's auto choice")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats (medians are reported)")
    ap.add_argument("--levels", default="0,1,2,3", help="multi-level set (a ViT: e.g. 0,4,8)")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--rss-only", action="store_true", help="only the peak-RSS row (e.g. for ViT-L)")
    args = ap.parse_args()
    with tuned_malloc(), tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_demo_cohort(tmp / "demo", n_slides=max(args.slides, 2), seed=0)
        refs = discover_slides([tmp / "demo" / "slides"])[: args.slides]
        rows, prec, n_tiles = ([], args.precision, 0) if args.rss_only else speed_rows(args, refs, tmp)
        if not args.skip_rss:
            r1 = peak_rss(tmp / "demo" / "slides", 1, tmp, args.encoder)
            r20 = peak_rss(tmp / "demo" / "slides", 20, tmp, args.encoder)
            rows.append(("peak RSS (20 slides / 1 slide, MiB)", f"{r20:.0f} / {r1:.0f}", r20 / r1, "<= 1.2 (flat)"))
        print(f"\nencoder={args.encoder} precision={prec} batch={args.batch_size} workers={args.workers or 'auto'} "
              f"tiles={n_tiles} torch_threads={torch.get_num_threads()}\n")
        print(f"| {'measure':<52} | {'values':>22} | {'ratio':>6} | goal |")
        print(f"|{'-' * 54}|{'-' * 24}|{'-' * 8}|------|")
        for name, vals, ratio, goal in rows:
            print(f"| {name:<52} | {vals:>22} | {ratio:6.3f} | {goal} |")
        print(json.dumps({r[0]: round(r[2], 4) for r in rows}))


if __name__ == "__main__":
    main()
