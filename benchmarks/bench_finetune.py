"""Throughput of the top-k fine-tune step: tile reader vs encoder compute (tiles/s).

Writes one synthetic pyramidal slide, then times
  * reader: k tiles read from the WSI and normalised by ``--workers`` threads (featstore.read.tilesource.TileSource);
  * embed:  a no-gradient forward of the k tiles (what scoring and --reselect cost);
  * train:  one bag step (checkpointed micro-batches: forward, recomputed forward, backward, Adam).

    python benchmarks/bench_finetune.py --encoder resnet18 --minus 1 --k 32 --precision bf16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--minus", type=int, default=1)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--size", type=int, default=224, help="encoder input size (px)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    from featstore.encoders import create_encoder, prepare_encoder, resolve_precision
    from featstore.synth import rectangles_slide, write_pyramid_tiff
    from featstore.read.tilesource import TileSource
    from mil.bagmodel import BagModel
    from mil.models import create_mil_model

    dev = torch.device("cpu")
    precision = resolve_precision(args.precision, dev)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.tif"
        write_pyramid_tiff(path, rectangles_slide((4096, 4096), [(0, 0, 4096, 4096)]), mpp=0.5)
        size0 = 2 * args.size          # tiles at 1.0 um/px read from a 0.5 um/px slide
        grid = np.stack(np.meshgrid(np.arange(0, 4096 - size0, size0), np.arange(0, 4096 - size0, size0)), -1)
        coords = grid.reshape(-1, 2)[: args.k]
        enc = prepare_encoder(create_encoder(args.encoder, "random", levels=(args.minus,)), precision, dev)
        head = create_mil_model("abmil", enc.dims[args.minus])
        model = BagModel(enc, head, args.minus, precision, args.micro_batch)
        reader = TileSource({**enc.preprocessing(), "input_size": args.size}, workers=args.workers)
        reader.add("s", path, size0, 0.5)
        opt = torch.optim.Adam([{"params": list(enc.trainable_parameters()), "lr": 1e-5},
                                {"params": list(head.parameters()), "lr": 1e-4}])

        def timed(fn) -> float:
            fn()  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            return args.steps * len(coords) / (time.perf_counter() - t0)

        x = reader.read("s", coords)

        def embed() -> None:
            with torch.no_grad():
                model.eval().embed(x)

        def train() -> None:
            model.train_mode()
            opt.zero_grad(set_to_none=True)
            logits, _ = model(x)
            torch.nn.functional.cross_entropy(logits.float().unsqueeze(0), torch.tensor([1])).backward()
            opt.step()

        rates = {"reader": timed(lambda: reader.read("s", coords)), "embed": timed(embed), "train": timed(train)}
        reader.close()
    print(f"{args.encoder} minus{args.minus} {args.size}px k={args.k} micro-batch {args.micro_batch} "
          f"{precision}, {args.workers} reader threads, {torch.get_num_threads()} torch threads")
    for name, r in rates.items():
        print(f"  {name:7s} {r:8.1f} tiles/s")


if __name__ == "__main__":
    main()
