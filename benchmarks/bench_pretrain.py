"""Pretraining benchmarks (issue 15): one table of ratios measured in one run.

    python benchmarks/bench_pretrain.py [--steps 8] [--batch-size 32]

Rows, per (encoder, method):
- bf16 ÷ fp32    : pretraining tiles/s with bf16 autocast ÷ with fp32 (same steps, same tiles)
- reading share  : seconds to read one batch of tiles on one thread ÷ seconds of one training
                   step (what reading would cost if it were not overlapped; goal ≤ 0.10)
- waiting share  : seconds the trainer actually waited for tiles ÷ step seconds (the reader
                   thread prefetches the next batch while the current one trains)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _table import print_table  # noqa: E402
from featstore.cohort import SlideRef  # noqa: E402
from featstore.encoders import create_encoder, resolve_precision  # noqa: E402
from featstore.extract import ExtractConfig, Extractor  # noqa: E402
from featstore.pretrain import PretrainConfig, pretrain  # noqa: E402
from featstore.train.feed import TileFeed  # noqa: E402
from featstore.store import open_store  # noqa: E402
from featstore.synth import he_image, write_pyramid_tiff  # noqa: E402
from featstore.tiling import TilingConfig  # noqa: E402


def make_store(tmp: Path, n: int = 3, side: int = 4096) -> Path:
    """SVS-like 0.25 µm/px slides tiled into 224-px patches at 0.5 µm/px (as `featstore extract` does)."""
    refs = []
    for i in range(n):
        rgb = he_image(np.ones((side // 32, side // 32), bool), (side, side), np.random.default_rng(i))
        refs.append(SlideRef(f"s{i}", write_pyramid_tiff(tmp / f"s{i}.svs", rgb, 0.25, tile=240, vendor="aperio",
                                                         jpeg_tables=True, factor=4)))
    cfg = ExtractConfig(encoder="resnet18", levels=(0,), input_size=32, batch_size=64,
                        tiling=TilingConfig(patch_size=224, mpp=0.5, min_tissue=0.0))
    Extractor(cfg).run(refs, tmp / "store.zarr")
    return tmp / "store.zarr"


def read_seconds(store: Path, encoder: str, batch: int, repeats: int = 3) -> float:
    """Median seconds to read one batch of tiles on one thread (no overlap)."""
    st = open_store(store)
    ids = st.slide_ids()
    enc = create_encoder(encoder, "random")
    feed = TileFeed(st, ids, enc.preprocessing())
    try:
        times = []
        for r in range(repeats):
            items = [(ids[i % len(ids)], (r * batch + i) % st.n_tiles(ids[0])) for i in range(batch)]
            t0 = time.perf_counter()
            feed.read(items)
            times.append(time.perf_counter() - t0)
    finally:
        feed.close()
    return float(np.median(times))


def run(store: Path, out: Path, encoder: str, precision: str, steps: int, batch: int) -> dict:
    cfg = PretrainConfig(encoder=encoder, tiles=steps * batch, epochs=1, batch_size=batch, precision=precision,
                         holdout=0, checkpoint_every=10_000)
    t0 = time.perf_counter()
    r = pretrain(cfg, store, out)[0]
    wall = time.perf_counter() - t0
    prov = json.loads((r.path.parent / "provenance.json").read_text())
    sec = prov["seconds"]
    return {"tiles_s": r.tiles / (sec["steps"] + sec["waiting_for_tiles"]), "step_s": sec["steps"] / r.steps,
            "wait_s": sec["waiting_for_tiles"] / r.steps, "wall": wall, "method": prov["method"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--encoders", default="vit_small_patch16_224,resnet18")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        store = make_store(tmp)
        bf16 = resolve_precision("auto", "cpu")
        for enc in args.encoders.split(","):
            res = {p: run(store, tmp / f"{enc}-{p}", enc, p, args.steps, args.batch_size) for p in ("fp32", bf16)}
            fast = res[bf16]
            read = read_seconds(store, enc, args.batch_size)
            name = f"{enc} {fast['method']}"
            rows.append((f"{name}: {bf16} ÷ fp32 tiles/s", fast["tiles_s"] / res["fp32"]["tiles_s"],
                         f"{fast['tiles_s']:.1f} vs {res['fp32']['tiles_s']:.1f} tiles/s, batch {args.batch_size}"))
            rows.append((f"{name}: reading share of a {bf16} step", read / fast["step_s"],
                         f"{read:.3f} s to read {args.batch_size} tiles vs {fast['step_s']:.2f} s per step"))
            rows.append((f"{name}: waiting share (prefetched)", fast["wait_s"] / fast["step_s"],
                         f"{fast['wait_s']:.3f} s waited per step"))
    print_table(rows)


if __name__ == "__main__":
    main()
