"""Slide-reader benchmarks (issue 14): native JPEG tiles vs OpenSlide, one table of ratios.

    python benchmarks/bench_reader.py                     # generated SVS-like 0.25 µm/px slides
    python benchmarks/bench_reader.py --slide CMU-1.svs   # add real slides (any OpenSlide file)

Rows, each measured in this run on one reader thread, medians of --repeats interleaved runs
(per core = CPU seconds per patch, which other load on the machine does not inflate):
- native level   : 224² patches at the slide's own resolution (a crop of decoded tiles)
- 2x from level 0: 0.5 µm/px patches from a 0.25 µm/px level (448² read, resized to 224²), as
                   from an SVS whose next level is 4x; "dct" rows let libjpeg's DCT scaling do
                   the 2x (``dct_min_final=1``), with the mean absolute pixel difference to OpenSlide
- decode_jpeg    : the GPU path's code on --device (cpu here, cuda on a GPU host): patches/s and
                   compressed KiB sent to the device per patch
- end to end     : densenet121 extraction tiles/s ÷ model-only tiles/s, per reader
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_extract import model_only  # noqa: E402
from featstore.core.runtime import tuned_malloc  # noqa: E402
from _table import print_table  # noqa: E402
from featstore.cohort import SlideRef  # noqa: E402
from featstore.extract import ExtractConfig, Extractor  # noqa: E402
from featstore.read.native import TileCache, open_slide  # noqa: E402
from featstore.read.slide import Slide  # noqa: E402
from featstore.synth import he_image, write_pyramid_tiff  # noqa: E402
from featstore.tiling import TilingConfig  # noqa: E402


def make_slides(tmp: Path, n: int, side: int) -> list[Path]:
    """SVS-like 0.25 µm/px slides as Aperio writes them: JPEGTables, 240² RGB tiles (quality 85),
    levels 4x apart; grain gives the JPEG streams real-slide-like entropy."""
    out = []
    for i in range(n):
        rgb = he_image(np.ones((side // 32, side // 32), bool), (side, side), np.random.default_rng(i))
        out.append(write_pyramid_tiff(tmp / f"s{i}.svs", rgb, 0.25, tile=240, vendor="aperio",
                                      jpeg_tables=True, factor=4))
    return out


def grid(path: Path, size0: int, limit: int) -> list[tuple[int, int]]:
    with Slide(path) as s:
        w, h = s.dimensions
    xy = [(x, y) for y in range(0, h - size0 + 1, size0) for x in range(0, w - size0 + 1, size0)]
    return xy[:limit]


def read_rate(path: Path, reader: str, size0: int, coords, dct_min_final: float = 2.0) -> tuple[float, float]:
    """(patches/s wall, CPU s/patch) of one thread reading *coords* in tile order, fresh handle/cache."""
    with open_slide(path, reader=reader, cache=TileCache(), dct_min_final=dct_min_final) as s:
        s.read_patch(coords[0], size0, 224)
        c0, w0 = time.process_time(), time.perf_counter()
        for xy in coords:
            s.read_patch(xy, size0, 224)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return len(coords) / wall, cpu / len(coords)


def mad(path: Path, size0: int, coords, dct_min_final: float) -> float:
    with Slide(path) as ref, open_slide(path, reader="native", dct_min_final=dct_min_final) as nat:
        return float(np.mean([np.abs(ref.read_patch(xy, size0, 224).astype(int)
                                     - nat.read_patch(xy, size0, 224).astype(int)).mean() for xy in coords[:40]]))


def reader_rows(paths: list[Path], limit: int, repeats: int) -> list[tuple]:
    """Per slide and case: the per-core ratio = OpenSlide CPU s/patch ÷ native CPU s/patch
    (medians of *repeats* interleaved runs; CPU time is what a core spends, whatever else runs)."""
    rows = []
    for path in paths:
        with Slide(path) as s:
            mpp = s.mpp
        for label, size0 in (("native level", 224), ("2x from level 0", 448)):
            coords = grid(path, size0, limit)
            variants = [("native", 2.0)] + ([("native dct", 1.0)] if size0 > 224 else [])
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in [("openslide", 0)] + variants}
            for _ in range(repeats):
                runs["openslide"].append(read_rate(path, "openslide", size0, coords))
                for name, dmf in variants:
                    runs[name].append(read_rate(path, "native", size0, coords, dmf))
            med = {k: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v]))) for k, v in runs.items()}
            os_rate, os_cpu = med["openslide"]
            for name, dmf in variants:
                rate, cpu = med[name]
                rows.append((f"{path.name} ({mpp:.2f} µm/px) {label}: {name} ÷ openslide, per core", os_cpu / cpu,
                             f"CPU {cpu * 1e3:.2f} vs {os_cpu * 1e3:.2f} ms/patch; wall {rate:,.0f} vs {os_rate:,.0f} "
                             f"patches/s; MAD {mad(path, size0, coords, dmf):.2f}; {len(coords)} patches"))
    return rows


def device_row(path: Path, size0: int, limit: int, device: str, batch: int) -> tuple:
    """The nvJPEG path's code (:func:`featstore.read.devicedecode.read_patches`) on *device*: patches/s
    and compressed bytes sent to the device per patch (the H2D traffic of the GPU model)."""
    import torch

    from featstore.read.devicedecode import read_patches

    coords = np.array(grid(path, size0, limit))
    with open_slide(path, reader="native", cache=TileCache()) as s:
        read_patches(s, coords[:batch], size0, 224, device=device)          # warm-up (CUDA context, kernels)
        s.cache = TileCache()
        t0 = time.perf_counter()
        for b in range(0, len(coords), batch):
            out = read_patches(s, coords[b:b + batch], size0, 224, device=device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        sent = sum(s.layout.levels[k[1]].counts[k[3] * s.layout.levels[k[1]].cols + k[2]] for k in s.cache._items)
    assert out.device.type == torch.device(device).type
    return (f"{path.name} 2x from level 0: decode_jpeg path on {device} (patches/s, not a ratio)", len(coords) / dt,
            f"{len(coords)} patches in batches of {batch}; {len(s.cache._items)} tiles decoded, "
            f"{sent / len(coords) / 1024:.1f} KiB compressed to the device per patch")


def e2e_rows(paths: list[Path], tmp: Path, batch: int, precision: str, repeats: int) -> list[tuple]:
    """Medians of *repeats* alternating runs per reader, model-only measured between them (this
    VM's speed drifts by ±20 % over minutes, so single runs do not compare)."""
    refs = [SlideRef(p.stem, p) for p in paths]
    tiling = TilingConfig(patch_size=224, mpp=0.5, min_tissue=0.0)
    ex = {r: Extractor(ExtractConfig(encoder="densenet121", levels=(0,), batch_size=batch, precision=precision,
                                     reader=r, tiling=tiling)) for r in ("openslide", "native")}
    rates: dict[str, list[float]] = {"model": [], "openslide": [], "native": []}
    tiles = 0
    for i in range(repeats):
        for reader, e in ex.items():
            rates["model"].append(model_only(e.encoder, e.precision, batch, 6 * batch, 224))
            t0 = time.perf_counter()
            rep = e.run(refs, tmp / f"{reader}{i}.zarr")
            rates[reader].append(rep.tiles / (time.perf_counter() - t0))
            tiles = rep.tiles
    model = float(np.median(rates["model"]))
    e = ex["native"]
    return [(f"end to end ÷ model only, densenet121 {e.precision}, --reader {r}", float(np.median(rates[r])) / model,
             f"median {np.median(rates[r]):.1f} vs {model:.1f} tiles/s over {repeats} runs "
             f"({min(rates[r]):.1f}-{max(rates[r]):.1f}), {tiles} tiles, {e.workers} reader thread")
            for r in ("openslide", "native")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", action="append", default=[], help="a real slide to add (repeatable)")
    ap.add_argument("--side", type=int, default=4800, help="generated slide side in px")
    ap.add_argument("--patches", type=int, default=400, help="patches per reader row")
    ap.add_argument("--e2e-slides", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="runs per reader and case (median)")
    ap.add_argument("--device", default="cpu", help="device of the decode_jpeg row (cuda on a GPU host)")
    ap.add_argument("--no-e2e", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = make_slides(tmp, max(1, args.e2e_slides), args.side)
        with tuned_malloc(True):     # as during extraction: no page-fault storm from patch buffers
            bench = paths[:1] + [Path(p) for p in args.slide]
            rows = reader_rows(bench, args.patches, args.repeats)
            rows += [device_row(p, 448, args.patches, args.device, args.batch_size) for p in bench]
        if not args.no_e2e:
            rows += e2e_rows(paths, tmp, args.batch_size, args.precision, args.repeats)
    print_table(rows)


if __name__ == "__main__":
    main()
