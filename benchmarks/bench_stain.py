"""Stain normalisation throughput (issue 18): batched none / reinhard / macenko / HED jitter, one table.

    python benchmarks/bench_stain.py                      # 64 x 224² synthetic H&E tiles, 5 repeats
    python benchmarks/bench_stain.py --batch 128 --device cuda --repeats 10

Rows, each measured in this run (medians of --repeats interleaved runs on the same batch of
synthetic ``gland_image`` tiles, half "he", half "he-dark"):
- <method> ÷ none      : tiles/s of the batched transform ÷ tiles/s of ``none`` (uint8 copy);
                         the detail gives tiles/s and ms per batch
- batched ÷ torchstain : batched tiles/s ÷ torchstain's per-image ``normalize`` loop tiles/s
                         (CPU only; torchstain is the reference implementation)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table  # noqa: E402
from featstore.stain import HEDJitter, get_normaliser  # noqa: E402
from featstore.synth import gland_image  # noqa: E402


def make_batch(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(reference "he" tile (H, W, 3), batch (n, 3, size, size) uint8 of half "he", half "he-dark")."""
    rng = np.random.default_rng(seed)
    ref = gland_image(rng, (size, size), style="he")[0]
    tiles = [gland_image(rng, (size, size), style="he" if i % 2 else "he-dark")[0] for i in range(n)]
    return ref, torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, batch: torch.Tensor) -> float:
    """Seconds of one call of *fn* on *batch* (device synchronised)."""
    _sync(batch.device)
    t0 = time.perf_counter()
    fn(batch)
    _sync(batch.device)
    return time.perf_counter() - t0


def torchstain_loop(name: str, ref: np.ndarray):
    """torchstain's per-image normalize over a batch, as a callable (the reference implementation)."""
    import torchstain

    ref_t = torch.from_numpy(ref).permute(2, 0, 1).contiguous()
    if name == "macenko":
        ts = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        ts.fit(ref_t)
        return lambda b: [ts.normalize(t, stains=False)[0] for t in b]
    ts = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    ts.fit(ref_t)
    return lambda b: [ts.normalize(t) for t in b]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    ref, batch = make_batch(args.batch, args.size)
    batch = batch.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    jitter = HEDJitter()
    fns = {name: get_normaliser(name).fit(ref) for name in ("none", "reinhard", "macenko")}
    fns["hed-jitter"] = lambda b: jitter(b, generator=gen)
    loops = {name: torchstain_loop(name, ref) for name in ("reinhard", "macenko")} if device.type == "cpu" else {}
    for fn in (*fns.values(), *loops.values()):
        fn(batch[:2])                                        # warm-up (allocator, kernels)
    runs: dict[str, list[float]] = {k: [] for k in (*fns, *(f"ts-{k}" for k in loops))}
    for _ in range(args.repeats):                              # interleaved: load drift hits all alike
        for name, fn in fns.items():
            runs[name].append(timed(fn, batch))
        for name, fn in loops.items():
            runs[f"ts-{name}"].append(timed(fn, batch))
    rate = {k: args.batch / statistics.median(v) for k, v in runs.items()}

    n = args.batch
    rows = []
    for name in ("reinhard", "macenko", "hed-jitter"):
        rows.append((f"{name} ÷ none (batched, {device.type})", rate[name] / rate["none"],
                     f"{rate[name]:,.0f} vs {rate['none']:,.0f} tiles/s; {n / rate[name] * 1e3:.0f} ms per batch of "
                     f"{n} x {args.size}²"))
    for name in loops:
        rows.append((f"{name} batched ÷ torchstain per-image loop", rate[name] / rate[f"ts-{name}"],
                     f"{rate[name]:,.0f} vs {rate[f'ts-{name}']:,.0f} tiles/s"))
    print(f"{n} tiles {args.size}x{args.size}, device {device}, torch threads {torch.get_num_threads()}, "
          f"medians of {args.repeats} interleaved runs")
    print_table(rows)


if __name__ == "__main__":
    main()
