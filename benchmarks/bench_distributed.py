"""Distributed extraction benchmark (issue 9): prints one table measured in one run.

    python benchmarks/bench_distributed.py [--slides 8] [--encoder resnet18] [--resize 224] [--precision auto]

Same slides, same config, fresh store each time:
- single      the single-process Extractor (torch uses every core, --workers reader threads)
- local:1     one LocalCluster worker process (torch threads = all cores)
- local:2     two worker processes (torch threads = cores / 2 each)
Distributed rows time the extraction call only (cluster start-up is reported apart); the first
task on each worker also builds its encoder, as the single-process run does in its timing.
- 2w / 1w     tiles/s of local:2 / tiles/s of local:1
- overhead    time(local:1) / time(single) - 1: what the task layer costs on the same slides
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featstore.cohort import discover_slides  # noqa: E402
from featstore.distributed import ClusterSpec, connect, extract_distributed  # noqa: E402
from featstore.extract import ExtractConfig, Extractor  # noqa: E402
from featstore.synth import rectangles_slide, write_pyramid_tiff  # noqa: E402
from featstore.tiling import TilingConfig  # noqa: E402


def make_slides(out: Path, n: int, side: int) -> list:
    """n square slides at 0.5 um/px, tissue over most of each (known tile counts)."""
    for i in range(n):
        m = side // 8
        rgb = rectangles_slide((side, side), [(m, m, side - m, side - m)], seed=i)
        write_pyramid_tiff(out / f"b{i:02d}.tif", rgb, mpp=0.5)
    return discover_slides([out])


def single(refs, store: Path, cfg: ExtractConfig) -> tuple[float, int]:
    t0 = time.perf_counter()
    rep = Extractor(cfg).run(refs, store)
    assert rep.ok, rep.failed
    return time.perf_counter() - t0, rep.tiles


def distributed(refs, store: Path, cfg: ExtractConfig, n_workers: int) -> tuple[float, int, float]:
    t0 = time.perf_counter()
    with connect(ClusterSpec(n_workers=n_workers)) as client:
        client.wait_for_workers(n_workers)
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        rep = extract_distributed(refs, store, cfg, client,
                                  torch_threads=max(1, (os.cpu_count() or 1) // n_workers))
        seconds = time.perf_counter() - t1
    assert rep.ok, rep.failed
    return seconds, rep.tiles, startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--side", type=int, default=2048, help="slide side in level-0 px (0.5 um/px)")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--resize", type=int, default=224)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="reader threads per process")
    args = ap.parse_args()

    tiling = TilingConfig(patch_size=256, mpp=0.5)
    cfg = ExtractConfig(encoder=args.encoder, levels=(0,), tiling=tiling, input_size=args.resize,
                        precision=args.precision, batch_size=args.batch_size, workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "slides").mkdir()
        refs = make_slides(tmp / "slides", args.slides, args.side)
        rows = []
        s_sec, s_tiles = single(refs, tmp / "single.zarr", cfg)
        rows.append(("single", s_sec, s_tiles, 0.0))
        for n in (1, 2):
            sec, tiles, startup = distributed(refs, tmp / f"local{n}.zarr", cfg, n)
            rows.append((f"local:{n}", sec, tiles, startup))

    print(f"\n{args.slides} slides of {args.side}^2 px, {args.encoder} {args.resize}px, precision {args.precision}, "
          f"batch {args.batch_size}, {os.cpu_count()} cores")
    print(f"{'run':<10}{'tiles':>8}{'seconds':>10}{'tiles/s':>10}{'start-up s':>12}")
    for name, sec, tiles, startup in rows:
        print(f"{name:<10}{tiles:>8}{sec:>10.2f}{tiles / sec:>10.1f}{startup:>12.1f}")
    rate = {name: tiles / sec for name, sec, tiles, _ in rows}
    print(f"2w / 1w throughput ratio: {rate['local:2'] / rate['local:1']:.2f}")
    print(f"distributed overhead (local:1 vs single): {rows[1][1] / rows[0][1] - 1:+.1%}")


if __name__ == "__main__":
    main()
