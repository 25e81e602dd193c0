"""MIL training epoch: bags streamed from the on-disk store vs bags already in memory.

Writes a synthetic cohort (float16 features, like `featstore extract` writes) to a real Zarr
store in a temp dir, then times training epochs of an ABMIL head with the bags
(a) cached in memory as float32 and (b) read from the store every epoch through the read API
with the prefetch thread. Goal: (b) / (a) <= 1.2, i.e. reading never starves the trainer.

    python benchmarks/bench_mil.py                      # 250 slides x ~2000 tiles x 1024-d
    python benchmarks/bench_mil.py --slides 50 --tiles 500 --epochs 2 --threads 0
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featstore.store import FeatureKey, open_store
from mil.data import load_bags
from mil.train import TrainConfig, fit

KEY = FeatureKey("densenet121", "random", 1)


def write_cohort(path: Path, n_slides: int, tiles: int, dim: int, seed: int = 0) -> tuple[list[str], np.ndarray, int]:
    """Slides of tiles/2 .. 3*tiles/2 rows; returns (slide ids, labels, total rows)."""
    rng = np.random.default_rng(seed)
    st = open_store(path, mode="a")
    st.set_tiling({"patch_size": 224, "mpp": 0.5})
    ids, total = [], 0
    for i in range(n_slides):
        n = int(rng.integers(tiles // 2, tiles * 3 // 2 + 1))
        sid = f"slide{i:04d}"
        coords = np.stack([np.arange(n) % 100, np.arange(n) // 100], 1) * 224
        st.write_tiling(sid, coords, np.ones(n), {"source": f"{sid}.svs", "size0": 224, "slide_mpp": 0.5})
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x[: 5 * (i % 2), 0] += 3.0
        st.write_features(sid, KEY, x.astype(np.float16), {"encoder": KEY.encoder, "dim": dim})
        ids.append(sid)
        total += n
    return ids, np.arange(n_slides) % 2, total


def time_epochs(bags, ids, y, cfg: TrainConfig) -> tuple[list[float], list[float]]:
    """(wall time of each epoch, wall time of each bag step) with no validation set.

    The per-bag median is robust to bursts of load from other processes on a shared machine.
    """
    import logging

    logging.getLogger("mil.train").setLevel(logging.ERROR)  # "no validation slides" is expected here
    marks, steps = [time.perf_counter()], [time.perf_counter()]

    def cb(e):
        now = time.perf_counter()
        if e.step == "epoch":
            marks.append(now)
        else:
            steps.append(now)

    fit(bags, ids, y, [], [], 2, cfg, callback=cb)
    return list(np.diff(marks)), list(np.diff(steps)[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=250)
    ap.add_argument("--tiles", type=int, default=2000, help="mean tiles per slide (uniform 0.5x..1.5x)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per mode (alternating; median shown)")
    ap.add_argument("--hidden", default="256,64")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads while training (0 = torch default). On 2 cores, 1 leaves a core "
                         "to the prefetch thread; with 2 the reader and the trainer share both")
    ap.add_argument("--dir", default=None, help="where to write the store (default: a temp dir)")
    args = ap.parse_args()
    cfg = TrainConfig(epochs=args.epochs, hidden=tuple(int(h) for h in args.hidden.split(",")),
                      lr=1e-4, patience=0, seed=0, threads=args.threads)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.zarr"
        t0 = time.perf_counter()
        ids, y, total = write_cohort(path, args.slides, args.tiles, args.dim)
        t_write = time.perf_counter() - t0
        gib = total * args.dim * 2 / 2**30
        st = open_store(path)
        modes = {}
        for cache in ("float32", "none"):
            t0 = time.perf_counter()
            bags = load_bags(st, ids, KEY, cache=cache)
            t_load = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _, _b in bags.iterate(ids):
                pass
            modes[cache] = {"bags": bags, "load": t_load, "read": time.perf_counter() - t0, "epochs": []}
        one = TrainConfig(**{**cfg.to_dict(), "epochs": 1})
        time_epochs(modes["float32"]["bags"], ids, y, one)      # warm-up (kernel caches), not counted
        for m in modes.values():
            m["steps"] = []
        for _ in range(args.epochs):                            # alternate, so machine load hits both
            for m in modes.values():
                ep, steps = time_epochs(m["bags"], ids, y, one)
                m["epochs"] += ep
                m["steps"] += steps
        rows = [(c, m["load"], m["read"], statistics.median(m["epochs"]), m["epochs"],
                 1000 * statistics.median(m["steps"])) for c, m in modes.items()]
    print(f"cohort: {args.slides} slides, {total} tiles, dim {args.dim}, {gib:.2f} GiB float16 on disk "
          f"(written in {t_write:.1f} s); torch threads {args.threads or torch.get_num_threads()}; "
          f"head {cfg.model} hidden {cfg.hidden}")
    print(f"{'bags':<22}{'load s':>8}{'bare pass s':>13}{'epoch s':>9}{'bag ms':>8}   timed epochs (s)")
    for cache, t_load, t_read, epoch, ep, step in rows:
        name = "in memory (float32)" if cache == "float32" else "from store + prefetch"
        print(f"{name:<22}{t_load:>8.1f}{t_read:>13.2f}{epoch:>9.2f}{step:>8.1f}   {', '.join(f'{e:.2f}' for e in ep)}")
    ratio = rows[1][3] / rows[0][3]
    step_ratio = rows[1][5] / rows[0][5]
    print(f"epoch time from store / in memory = {ratio:.3f}; median bag step ratio = {step_ratio:.3f}  "
          f"(goal <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")

if __name__ == "__main__":
    main()
