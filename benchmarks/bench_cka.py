"""Benchmark: streaming linear CKA vs the bare matrix products it cannot avoid.

    python benchmarks/bench_cka.py [--n 200000] [--d 1024] [--dtype float16] [--debiased]

Times the streaming accumulator behind ``analysis.cka.linear_cka`` on (N, D) x (N, D) inputs
and, interleaved chunk by chunk in the same run, the three float64 products X^T X, Y^T Y, Y^T X
of the same chunks (their float64 conversion not timed). Goal: ratio <= 1.5. Peak memory of the
accumulator (tracemalloc per chunk, plus its D x D sums) shows that nothing grows with N.
An N x N float64 matrix would need N^2 x 8 bytes.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from analysis.cka import CHUNK_ROWS, LinearCKAAccumulator


def make_data(n: int, d: int, dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correlated (N, D) features with an offset, generated chunk by chunk in the target dtype."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(d)
    X, Y = np.empty((n, d), dtype), np.empty((n, d), dtype)
    for lo in range(0, n, 16384):
        hi = min(n, lo + 16384)
        x = rng.standard_normal((hi - lo, d), dtype=np.float32) + 3.0
        X[lo:hi] = x
        Y[lo:hi] = np.tanh(x[:, perm] - 3.0) + 0.5 * x + rng.standard_normal((hi - lo, d), dtype=np.float32)
    return X, Y


def products_time(x: np.ndarray, y: np.ndarray) -> float:
    """Seconds spent in X^T X, Y^T Y, Y^T X of one float64 chunk."""
    t0 = time.perf_counter()
    x.T @ x
    y.T @ y
    y.T @ x
    return time.perf_counter() - t0


def interleaved(X: np.ndarray, Y: np.ndarray, chunk: int, debiased: bool) -> tuple[float, float, float, int]:
    """(CKA, accumulator seconds, bare products seconds, peak traced bytes of the accumulator).

    Alternates chunk by chunk so that load from other processes on a shared machine hits both
    sides alike; tracemalloc runs throughout (same overhead for both), its peak is reset before
    each accumulator call so the products' own temporaries are not counted.
    """
    acc = LinearCKAAccumulator(chunk_rows=chunk)
    t_acc = t_prod = 0.0
    peak = 0
    tracemalloc.start()
    for lo in range(0, len(X), chunk):
        xb, yb = X[lo:lo + chunk], Y[lo:lo + chunk]
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        acc.update(xb, yb)
        t_acc += time.perf_counter() - t0
        peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
        t_prod += products_time(xb.astype(np.float64), yb.astype(np.float64))
    t0 = time.perf_counter()
    value = acc.cka(debiased=debiased)
    t_acc += time.perf_counter() - t0
    tracemalloc.stop()
    return value, t_acc, t_prod, peak + _state_bytes(acc)


def _state_bytes(acc: LinearCKAAccumulator) -> int:
    """Bytes held between chunks by the accumulator (its D x D sums): not in the per-call peak."""
    inner = acc._acc
    sides = sum(s.gram.nbytes + 3 * s.s.nbytes for s in inner._sides.values())
    return sides + sum(c.xty.nbytes for c in inner._cross.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="rows (tiles)")
    ap.add_argument("--d", type=int, default=1024, help="feature dim of both inputs")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    ap.add_argument("--debiased", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    X, Y = make_data(args.n, args.d, args.dtype)
    gen = time.perf_counter() - t0
    in_mib = (X.nbytes + Y.nbytes) / 2**20

    value, t_acc, t_prod, peak = interleaved(X, Y, args.chunk_rows, args.debiased)

    nxn_gib = args.n**2 * 8 / 2**30
    rows = [
        ("N x D", f"{args.n:,} x {args.d} ({args.dtype}, {in_mib:,.0f} MiB both inputs)"),
        ("data generation", f"{gen:.1f} s"),
        ("CKA" + (" (debiased)" if args.debiased else ""), f"{value:.6f}"),
        ("accumulator, interleaved", f"{t_acc:.2f} s"),
        ("3 float64 products, interleaved", f"{t_prod:.2f} s"),
        ("ratio (goal <= 1.5)", f"{t_acc / t_prod:.2f}"),
        ("peak memory of the accumulator", f"{peak / 2**20:,.0f} MiB (an N x N float64 would be {nxn_gib:,.0f} GiB)"),
    ]
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
