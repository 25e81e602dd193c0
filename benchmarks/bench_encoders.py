"""Model-only encoder throughput: fp32 vs reduced precision, and the cost of extra levels.

For each encoder it measures, in one run on this machine:
  * images/s at level 0 in fp32 and in the reduced precision ``auto`` picks (bf16 +
    channels_last on CPUs with native bf16, fp16 on CUDA);
  * time(levels 0,1,2,3) / time(level 0): the one-pass promise, should be ~1.0;
  * time(level 3) / time(level 0): what truncation saves.
Random weights (throughput does not depend on them). Not a test: run it by hand:

    python benchmarks/bench_encoders.py --encoders resnet18,densenet121 --batch 32 --iters 3
"""

from __future__ import annotations

import argparse
import time

import torch

from featstore.encoders import autocast, create_encoder, prepare_encoder, resolve_precision


def _time_levels(enc, x, precision, device, iters: int, configs) -> list[float]:
    """Best-of-*iters* seconds per batch for each level set, configs interleaved so that
    load from other processes hits them alike (min, not mean: the machine may be shared)."""
    best = [float("inf")] * len(configs)
    with torch.inference_mode(), autocast(precision, device):
        enc(x)  # warm-up
        for _ in range(iters):
            for i, levels in enumerate(configs):
                enc.set_levels(levels)
                t0 = time.perf_counter()
                enc(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default="resnet18,densenet121,resnet50,efficientnet_b0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    low = resolve_precision("auto", device)
    if low == "fp32":
        low = "bf16" if device.type == "cpu" else "fp16"
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} "
          f"size={args.size} iters={args.iters} reduced={low}")
    head = (f"{'encoder':<16}{'fp32 img/s':>11}{low + '+cl img/s':>15}{'speed-up':>10}"
            f"{'m0-3/m0 fp32':>14}{f'm0-3/m0 {low}':>14}{'m3/m0 fp32':>12}")
    print(head)
    print("-" * len(head))
    for name in args.encoders.split(","):
        row = {}
        for prec in ("fp32", low):
            enc = create_encoder(name, levels=(0,))
            prepare_encoder(enc, prec, device)
            xx = x.contiguous(memory_format=torch.channels_last) if enc.channels_last else x
            t0, t0123, t3 = _time_levels(enc, xx, prec, device, args.iters,
                                         [(0,), (0, 1, 2, 3), (3,)])
            row[prec] = (args.batch / t0, t0123 / t0, t3 / t0)
        f, r = row["fp32"], row[low]
        print(f"{name:<16}{f[0]:>11.1f}{r[0]:>15.1f}{r[0] / f[0]:>9.2f}x"
              f"{f[1]:>14.2f}{r[1]:>14.2f}{f[2]:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
