"""Model-only encoder throughput: fp32 vs reduced precision, and the cost of extra levels.

For each encoder it measures, in one run on this machine:
  * images/s at level 0 in fp32 and in the reduced precision ``auto`` picks (bf16 +
    channels_last on CPUs with native bf16, fp16 on CUDA);
  * time(every level of the set) / time(level 0): the one-pass promise, should be ~1.0;
  * time(deepest truncation of the set) / time(level 0): what truncation saves.
The level set is 0,1,2,3 for a CNN and 0,4,8 for a ViT (``--levels`` overrides it).
Random weights (throughput does not depend on them). Not a test: run it by hand:

    python benchmarks/bench_encoders.py --encoders resnet18,densenet121 --batch 32 --iters 3
    python benchmarks/bench_encoders.py --encoders vit_small_patch16_224,vit_base_patch16_224 --batch 16
"""

from __future__ import annotations

import argparse
import time

import torch

from featstore.encoders import autocast, create_encoder, get_spec, prepare_encoder, resolve_precision
from featstore.encoders.runners import runner_class
from featstore.encoders.vit import TokenRunner

# the multi-level set per runner (CNN stages / ViT blocks): a registry, not an if-chain
_LEVEL_SETS = {TokenRunner: (0, 4, 8)}
_CNN_LEVELS = (0, 1, 2, 3)


def level_set(name: str, override: str | None) -> tuple[int, ...]:
    """``--levels`` if given, else the set of *name*'s family (0,4,8 for a ViT, 0,1,2,3 for a CNN)."""
    if override:
        return tuple(int(v) for v in override.split(","))
    return _LEVEL_SETS.get(runner_class(get_spec(name)), _CNN_LEVELS)


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
    ap.add_argument("--levels", default=None, help="multi-level set, e.g. 0,4,8 (default: per family)")
    args = ap.parse_args()
    device = torch.device(args.device)
    low = resolve_precision("auto", device)
    if low == "fp32":
        low = "bf16" if device.type == "cpu" else "fp16"
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} "
          f"size={args.size} iters={args.iters} reduced={low}")
    head = (f"{'encoder':<30}{'fp32 img/s':>11}{low + ' img/s':>12}{'speed-up':>10}{'levels':>9}"
            f"{'all/m0 fp32':>13}{f'all/m0 {low}':>13}{'deep/m0 fp32':>14}")
    print(head)
    print("-" * len(head))
    for name in args.encoders.split(","):
        levels, row = level_set(name, args.levels), {}
        for prec in ("fp32", low):
            enc = create_encoder(name, levels=(0,))
            prepare_encoder(enc, prec, device)
            xx = x.contiguous(memory_format=torch.channels_last) if enc.channels_last else x
            t0, t_all, t_deep = _time_levels(enc, xx, prec, device, args.iters,
                                             [(0,), levels, (max(levels),)])
            row[prec] = (args.batch / t0, t_all / t0, t_deep / t0)
        f, r = row["fp32"], row[low]
        print(f"{name:<30}{f[0]:>11.1f}{r[0]:>12.1f}{r[0] / f[0]:>9.2f}x{','.join(map(str, levels)):>9}"
              f"{f[1]:>13.2f}{r[1]:>13.2f}{f[2]:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
